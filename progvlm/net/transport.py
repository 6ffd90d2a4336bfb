"""The transport from the edge to the cloud backend: real bytes, paced, over one kept-open
WebSocket session.

Every request, progressive stream or full-cloud image, goes over the cloud's WebSocket; the
socket stays open afterwards and carries the next request, so only the first request (or one
after the cloud dropped an idle socket, or restarted) pays for a handshake. A CloudLink keeps
a small pool of open sockets, one per concurrent caller. HTTP is used for /v1/info only.

Every request pays the round trip as half before its first byte (the request propagating) and
half after its reply (the answer propagating back); the bytes themselves leave at the shaped
bandwidth through `progvlm.net.link.paced_chunks`, and the reply's bytes are held back until a link
of that bandwidth would have delivered them. Each stage time is measured wall time, and the
stages of an Exchange add up to its wall time:

    connect   0 on a reused socket; else opening one: HANDSHAKE_RTTS round trips of the emulated
              link (TCP, then the HTTP upgrade; TLS adds one) and the real handshake (on a
              real link, with rtt_ms=0, the real one alone). A reused socket found closed
              (the cloud dropped it) is replaced once, transparently; that costs connect too.
    uplink    RTT/2 + the transfer, until the cloud has the last byte: a kernel buffer in front
              of a slow real link takes the bytes long before they arrive, so the end is the
              later of the paced sending and the cloud's first-to-last-byte receive time (for a
              watched stream, where the cloud computes while layers arrive, the sending alone)
    cloud     the cloud's own stage times (in the reply)
    downlink  reply bytes paced at the bandwidth + RTT/2
    overhead  the rest (framing, JSON, waiting for the cloud's lock)

`CloudLink.steered` is the progressive exchange the edge steers by what it hears back: it
waits for the answer to the newest layer before sending the next (adaptive mode), and it can
ask the cloud to resume a frame it already holds (a conversation). Every wait is a named stage
there too: one uplink per round of sending, one downlink per answer waited for, the cloud's
stages of each answer waited for.
"""
from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State
from websockets.sync.client import connect as ws_connect

from ..codec.bitstream import parse
from .link import LinkProfile, paced_chunks, paced_segments
from .protocol import INFO_PATH, STREAM_PATH

HANDSHAKE_RTTS = {"ws": 2, "wss": 3}  # round trips before a new socket carries a request
MAX_IDLE_SOCKETS = 4  # open sockets kept for reuse; more concurrent callers open and close their own
PACING_SLACK_S = 0.001  # a paced round's own bookkeeping, counted as uplink


class CloudError(RuntimeError):
    """The cloud could not be reached or refused the request; str(e) says which and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Exchange:
    reply: dict
    uplink_ms: float
    downlink_ms: float
    wall_ms: float
    refinements: list[dict] = field(default_factory=list)
    cut_after_layer: int | None = None
    connect_ms: float = 0.0  # 0 on a reused socket
    # steered exchanges (CloudLink.steered) only:
    bytes_sent: int | None = None  # the frame's bytes sent in this request (0: all resumed)
    resumed: bool | None = None  # None: not asked; else whether the cloud held the frame
    layers_held: int = 0  # layers the cloud already held when the request began
    cloud_waited_ms: float | None = None  # cloud time of the earlier answers the edge waited for

    def overhead_ms(self, cloud_ms: float) -> float:
        """The wall time no other stage accounts for (cloud_ms: the cloud stages counted)."""
        return max(0.0, self.wall_ms - self.connect_ms - self.uplink_ms - self.downlink_ms - cloud_ms)

    def link_stages_ms(self, cloud_ms: float) -> dict[str, float]:
        """connect, uplink, downlink and overhead: with the cloud's stages, the wall time."""
        return {"connect": self.connect_ms, "uplink": self.uplink_ms, "downlink": self.downlink_ms,
                "overhead": round(self.overhead_ms(cloud_ms), 3)}


def to_ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class _Stale(Exception):
    """A reused socket turned out closed before the cloud saw the request: open another."""


class _Reader:
    """Reads one request's replies on a thread as they arrive, until the final or error
    message (the socket then carries the next request) or until the socket closes."""

    def __init__(self, ws, on_message):
        self.ws, self.on_message = ws, on_message
        self.received = 0
        self.closed = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                raw = self.ws.recv()
                arrived = time.perf_counter()
                msg = json.loads(raw)
                self.received += 1
                self.on_message(msg, len(raw), arrived)
                if msg.get("type") in ("final", "error"):
                    return
        except ConnectionClosed:
            self.closed = True
        finally:
            self.done.set()


class CloudLink:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0,
                 keep_open: bool = True):
        """keep_open=False opens (and pays for) a new socket for every request."""
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self.keep_open = keep_open
        self.sockets_opened = 0
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)
        self._ws_url = _ws_url(self.base_url) + STREAM_PATH
        self._idle: list = []
        self._pool_lock = threading.Lock()

    def close(self):
        """Close the HTTP client and every idle socket (sockets in use close when their request ends)."""
        self._http.close()
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for ws in idle:
            ws.close()

    def _fail(self, e: Exception) -> CloudError:
        return CloudError(f"cloud backend at {self.base_url} unreachable: {type(e).__name__}: {e}")

    def _checked(self, response: httpx.Response) -> dict:
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise CloudError(f"cloud refused the request ({response.status_code}): {detail}",
                             response.status_code)
        return response.json()

    def info(self) -> dict:
        """The cloud's /v1/info. A kept-alive connection that the cloud dropped meanwhile
        (a read error before any reply) is retried once on a fresh one, as a dropped
        WebSocket is (`_request`)."""
        for attempt in (1, 2):
            try:
                return self._checked(self._http.get(INFO_PATH))
            except (httpx.ReadError, httpx.RemoteProtocolError) as e:
                if attempt == 2:
                    raise self._fail(e) from None
            except httpx.HTTPError as e:
                raise self._fail(e) from None

    # ---- the socket pool ---------------------------------------------------------------------
    def _open(self, link: LinkProfile):
        # the handshake's round trips on the emulated link (a real link pays its own)
        if link.emulated:
            time.sleep(HANDSHAKE_RTTS[urlsplit(self._ws_url).scheme] * link.rtt_ms / 1000)
        try:
            # websockets ≥ 17 wants connect() entered as a context manager; a pooled socket
            # outlives any one block, so it is entered here and closed when dropped
            # no permessage-deflate: the payload is already coded, and on a kept-open socket
            # deflate's shared window would send a repeated frame as a back-reference, bytes
            # no camera's next frame would ever save
            ws = ws_connect(self._ws_url, additional_headers=self.headers, compression=None,
                            open_timeout=self.timeout_s, max_size=1 << 20).__enter__()
        except (OSError, WebSocketException, TimeoutError) as e:
            if isinstance(e, InvalidStatus):
                raise CloudError(f"cloud refused the stream: {e}") from None
            raise self._fail(e) from None
        self.sockets_opened += 1
        return ws

    def _reused(self):
        with self._pool_lock:
            while self._idle:
                ws = self._idle.pop()
                if ws.protocol.state is State.OPEN:
                    return ws
                ws.close()  # the cloud dropped it while idle
        return None

    def _release(self, ws):
        if self.keep_open and ws.protocol.state is State.OPEN:
            with self._pool_lock:
                if len(self._idle) < MAX_IDLE_SOCKETS:
                    self._idle.append(ws)
                    return
        ws.close()

    def _request(self, link: LinkProfile, attempt):
        """attempt(ws, t0, connect_s, reused) on a reused socket, or on a new one if there is
        none or the reused one turned out closed; t0 is the request's start."""
        t0 = time.perf_counter()
        ws = self._reused() if self.keep_open else None
        if ws is not None:
            try:
                return attempt(ws, t0, 0.0, True)
            except _Stale:
                ws.close()
        ws = self._open(link)
        return attempt(ws, t0, time.perf_counter() - t0, False)

    def _send_request(self, ws, reader: _Reader, start: dict, chunks, reused: bool):
        """The start message, the paced body, and the time its last byte left. Raises _Stale
        when a reused socket was closed before any reply."""
        try:
            ws.send(json.dumps({**start, "keep_open": self.keep_open}))
            for chunk in chunks:
                ws.send(chunk)
        except ConnectionClosed:
            reader.done.wait(1.0)  # the cloud hung up: an error message may say why
            if reused and not reader.received:
                raise _Stale from None
        return time.perf_counter()

    def _refused(self, errors: list[dict], what: str) -> CloudError:
        e = errors[-1]
        return CloudError(f"cloud refused the {what} ({e['status']}): {e['detail']}", e["status"])

    # ---- requests ----------------------------------------------------------------------------
    def full(self, image: bytes, question: str, link: LinkProfile) -> Exchange:
        """Send a camera frame through the shaped link; the cloud runs the whole VLM."""
        return self._request(link, lambda ws, t0, connect_s, reused: self._full(
            ws, t0, connect_s, reused, image, question, link))

    def _full(self, ws, t0, connect_s, reused, image, question, link) -> Exchange:
        replies = []
        reader = _Reader(ws, lambda msg, nbytes, arrived: replies.append((msg, nbytes, arrived)))
        t_up = time.perf_counter()
        link.propagate()
        t_sent = self._send_request(ws, reader, {"question": question, "kind": "full"},
                                    paced_chunks(image, link), reused)
        try:
            ws.send(json.dumps({"end": True}))
        except ConnectionClosed:
            pass  # the error message, if any, is already in
        reader.done.wait(self.timeout_s)
        if not replies:
            ws.close()
            if reused and reader.closed:
                raise _Stale
            raise CloudError(f"no answer from the cloud within {self.timeout_s:g} s")
        reply, nbytes, t_reply = replies[-1]
        if reply.get("type") == "error":
            ws.close()
            raise self._refused([reply], "request")
        self._release(ws)
        self._pace_reply(nbytes, link, t_reply)
        t_end = time.perf_counter()
        uplink = max(t_sent - t_up, link.rtt_ms / 2000 + reply.get("receive_ms", 0.0) / 1e3)
        # a real network delivered the reply already; its share is the link's nominal time
        downlink = t_end - t_reply if link.emulated else link.rtt_ms / 2000 + link.serialisation_s(nbytes)
        return Exchange(reply, to_ms(uplink), to_ms(downlink), to_ms(t_end - t0),
                        connect_ms=to_ms(connect_s))

    def progressive(self, bitstream: bytes, question: str, link: LinkProfile,
                    cut_after_layer: int | None = None, on_refinement=None,
                    grace_s: float = 2.0, refine: bool = True) -> Exchange:
        """Stream the layers in order; the cloud answers after each complete layer. With
        `cut_after_layer` = j the uplink dies after layer j (fault injection): the answer is
        the cloud's answer from layers 1..j, and the exchange says so; the cut socket is
        closed, never reused. Without `refine`, the cloud answers once, when the layers are in
        (or the uplink falls silent)."""
        stream = parse(bitstream)
        ends = stream.layer_ends()
        if cut_after_layer is not None and not 0 <= cut_after_layer <= len(ends):
            raise ValueError(f"cut_after_layer must be in 0..{len(ends)}, got {cut_after_layer}")
        # header + layer 1 travel as one segment, then one segment per layer (a cut at 0 sends
        # the header alone)
        cuts = (ends if cut_after_layer is None else ends[:cut_after_layer]) or [stream.header_bytes]
        segments = [bitstream[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
        return self._request(link, lambda ws, t0, connect_s, reused: self._progressive(
            ws, t0, connect_s, reused, stream, segments, question, link, cut_after_layer,
            on_refinement, grace_s, refine))

    def _progressive(self, ws, t0, connect_s, reused, stream, segments, question, link,
                     cut_after_layer, on_refinement, grace_s, refine) -> Exchange:
        refinements, final, errors = [], {}, []

        def on_message(msg, nbytes, arrived):
            _stamp(msg, nbytes, arrived, t0, link)
            if msg.get("type") == "refinement":
                refinements.append(msg)
                if on_refinement:
                    on_refinement(msg)
            elif msg.get("type") == "final":
                final.update(msg)
            elif msg.get("type") == "error":
                errors.append(msg)

        reader = _Reader(ws, on_message)
        t_up = time.perf_counter()
        link.propagate()
        t_sent = self._send_request(ws, reader, {"question": question, "refine": refine,
                                                 "kind": "progressive"},
                                    paced_segments(segments, link), reused)
        if cut_after_layer is None:
            try:
                ws.send(json.dumps({"end": True}))
            except ConnectionClosed:
                pass  # the error message, if any, is already in
            reader.done.wait(self.timeout_s)
        else:  # the uplink is gone; answers already on their way down still arrive
            deadline = time.perf_counter() + grace_s
            while (not refinements or refinements[-1]["layers"] < cut_after_layer) \
                    and time.perf_counter() < deadline and not reader.done.is_set():
                time.sleep(0.002)
        if reused and reader.closed and not reader.received:
            ws.close()
            raise _Stale
        # a cut link, a refusal or no answer: this socket carries nothing more (closed once the
        # exchange is measured: a device whose uplink died would not wait for a close handshake)
        reusable = not errors and cut_after_layer is None and bool(final)
        try:
            return self._progressive_result(t0, connect_s, t_sent - t_up, stream, link,
                                            cut_after_layer, refine, refinements, final, errors)
        finally:
            if reusable:
                self._release(ws)
            else:
                ws.close()

    def _progressive_result(self, t0, connect_s, sending_s, stream, link, cut_after_layer,
                            refine, refinements, final, errors) -> Exchange:
        if errors:
            raise self._refused(errors, "stream")
        last = refinements[-1] if refinements else None
        if last is None and cut_after_layer is not None:
            raise CloudError("the link was cut before layer 1 arrived: no answer")
        if last is None:
            raise CloudError(f"no answer from the cloud within {self.timeout_s:g} s")
        wait = t0 + last["edge_t_ms"] / 1e3 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        reply = final or {"type": "final", "layers": last["layers"], "answer": last["answer"],
                          "layers_announced": stream.k, "partial": last["layers"] < stream.k}
        reply["stage_ms"] = last["stage_ms"]
        uplink = sending_s
        if not refine:  # the cloud computed nothing while layers arrived: its receive time is clean
            uplink = max(uplink, link.rtt_ms / 2000 + last.get("received_ms", 0.0) / 1e3)
        return Exchange(reply, to_ms(uplink), last["downlink_ms"],
                        max(last["edge_t_ms"], to_ms(time.perf_counter() - t0)), refinements,
                        cut_after_layer, to_ms(connect_s))

    def steered(self, bitstream: bytes, question: str, link: LinkProfile, send_until: int,
                more=None, frame_id: str | None = None, resume: bool = False,
                on_refinement=None) -> Exchange:
        """A progressive exchange steered by the answers. Layers 1..send_until go at once;
        then, while layers remain and `more(refinement, elapsed_ms)` says so, the edge waits
        for the answer to its newest layer and sends one more (receiver-driven refinement).
        `frame_id`: the cloud keeps the frame for follow-ups; with `resume` it is asked for it
        first and, if it holds j layers, answers from them at once and the stream goes on from
        layer j + 1 (if the cloud has lost it, the frame goes from its start: the same answer,
        more bytes). The exchange ends when the answer is in hand: the cloud's final message
        only frees the socket for the next request. `bitstream` must announce every layer
        that might be sent (the cloud's copy of a frame is a prefix of it)."""
        stream = parse(bitstream)
        if not 1 <= send_until <= stream.k:
            raise ValueError(f"send_until must be in 1..{stream.k}, got {send_until}")
        if resume and not frame_id:
            raise ValueError("resume needs a frame_id")
        return self._request(link, lambda ws, t0, connect_s, reused: self._steered(
            ws, t0, connect_s, reused, bitstream, stream, question, link, send_until, more,
            frame_id, resume, on_refinement))

    def _steered(self, ws, t0, connect_s, reused, bitstream, stream, question, link, send_until,
                 more, frame_id, resume, on_refinement) -> Exchange:
        ends, L = stream.layer_ends(), stream.k
        inbox: queue.Queue = queue.Queue()
        refinements, final = [], {}

        def on_message(msg, nbytes, arrived):
            _stamp(msg, nbytes, arrived, t0, link)
            if msg.get("type") == "refinement":
                refinements.append(msg)
                if on_refinement:
                    on_refinement(msg)
            elif msg.get("type") == "final":
                final.update(msg)
            inbox.put(msg)

        reader = _Reader(ws, on_message)
        # downlink: a message the edge waits for counts when the edge acts on it (sends, or has
        # its answer); one it only waits past (the "resumed" before its answer) travelled while
        # the cloud computed that answer, so its time is the cloud's
        spent = {"uplink": 0.0, "downlink": 0.0, "cloud_waited": 0.0, "latest_downlink": 0.0}
        start = {"question": question, "refine": True, "kind": "progressive", "keep_open": self.keep_open}
        if frame_id:
            start |= {"frame_id": frame_id, "resume": bool(resume)}

        def send(messages):
            """One round of sending: the request's propagation, then the bytes, paced. On the
            emulated link the round's uplink is what the link takes (half the round trip and
            the bytes at the bandwidth): a delay past that is no link's, it is overhead (e.g.
            this thread waiting for the cloud's, in one process, which has begun computing)."""
            spent["downlink"] += spent["latest_downlink"]
            spent["latest_downlink"] = 0.0
            t, nbytes = time.perf_counter(), 0
            link.propagate()
            try:
                for message in messages:
                    ws.send(message)
                    nbytes += len(message)
            except ConnectionClosed:
                reader.done.wait(1.0)  # the cloud hung up: an error message may say why
                if reused and not reader.received:
                    raise _Stale from None
            measured = time.perf_counter() - t
            spent["uplink"] += min(measured, link.rtt_ms / 2000 + link.serialisation_s(nbytes)
                                   + PACING_SLACK_S) if link.emulated else measured

        def wait_for(wanted) -> dict:
            """The first message `wanted` accepts, as the edge has it (delivered down the link)."""
            t_wait = time.perf_counter()
            deadline = t_wait + self.timeout_s
            while True:
                try:
                    msg = inbox.get(timeout=max(0.0, min(0.05, deadline - time.perf_counter())))
                except queue.Empty:
                    if reader.done.is_set() and inbox.empty():
                        if reused and not reader.received:
                            raise _Stale from None
                        raise CloudError("the cloud closed the stream before answering")
                    if time.perf_counter() > deadline:
                        raise CloudError(f"no answer from the cloud within {self.timeout_s:g} s")
                    continue
                if msg.get("type") == "error":
                    raise self._refused([msg], "stream")
                if wanted(msg):
                    wait = t0 + msg["edge_t_ms"] / 1e3 - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    down = msg["downlink_ms"]
                    if not link.emulated:  # a real network's share: the nominal one, at most
                        # what the wait left after the cloud's compute
                        waited = to_ms(time.perf_counter() - t_wait) - sum(msg.get("stage_ms", {}).values())
                        down = round(min(down, max(0.0, waited)), 3)
                    spent["latest_downlink"] = down
                    return msg

        def answer_to(layers: int) -> dict:
            msg = wait_for(lambda m: m.get("type") == "refinement" and m["layers"] == layers)
            spent["cloud_waited"] += sum(msg["stage_ms"].values())
            return msg

        def layers(a: int, b: int):  # layers a+1..b (the header with layer 1), paced as sent
            return paced_segments([bitstream[ends[a - 1] if a else 0:ends[b - 1]]], link)

        finished = False
        try:
            held, answer = 0, None
            if resume:
                send([json.dumps(start)])
                reply = wait_for(lambda m: m.get("type") in ("resumed", "missing"))
                if reply["type"] == "resumed":
                    held = reply["layers"]
                    if not 1 <= held <= L or reply["received_bytes"] != ends[held - 1]:
                        raise CloudError(f"the cloud holds {reply['received_bytes']} bytes of frame "
                                         f"{frame_id}, which is no layer boundary of this stream")
                    if send_until <= held or more is not None:
                        answer = answer_to(held)
                start = None
            sent, target = held, max(send_until, held)
            while True:
                if sent < target:
                    send(itertools.chain([json.dumps(start)] if start else [], layers(sent, target)))
                    start, sent = None, target
                    answer = answer_to(sent)
                if more is None or sent >= L or not more(answer, to_ms(time.perf_counter() - t0)):
                    break
                target = sent + 1
            t_answer = time.perf_counter()
            try:
                ws.send(json.dumps({"end": True}))
            except ConnectionClosed:
                pass
            finished = True
        finally:
            self._free_after_final(ws, reader, final, finished)
        cloud_ms = sum(answer["stage_ms"].values())
        reply = {"type": "final", "layers": answer["layers"], "answer": answer["answer"],
                 "confidence": answer.get("confidence"), "layers_announced": L,
                 "partial": False, "stage_ms": answer["stage_ms"], "resumed": held > 0}
        waited_before = round(spent["cloud_waited"] - cloud_ms, 3)
        return Exchange(reply, to_ms(spent["uplink"]), round(spent["downlink"] + spent["latest_downlink"], 3),
                        to_ms(t_answer - t0), refinements, None, to_ms(connect_s),
                        bytes_sent=(ends[sent - 1] - (ends[held - 1] if held else 0)) if sent > held else 0,
                        resumed=(held > 0) if resume else None, layers_held=held,
                        cloud_waited_ms=max(0.0, waited_before))

    def _free_after_final(self, ws, reader: _Reader, final: dict, finished: bool):
        """Back to the pool once the cloud's final message is in (a thread waits for it, so the
        caller has its answer a round trip sooner); closed if the request failed."""
        if not finished:
            ws.close()
            return

        def wait():
            reader.done.wait(self.timeout_s)
            if final:
                self._release(ws)
            else:
                ws.close()
        threading.Thread(target=wait, daemon=True, name="cloudlink-final").start()

    @staticmethod
    def _pace_reply(nbytes: int, link: LinkProfile, t_reply: float):
        if not link.emulated:
            return
        due = t_reply + link.serialisation_s(nbytes) + link.rtt_ms / 2000
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


def _stamp(msg: dict, nbytes: int, arrived: float, t0: float, link: LinkProfile):
    """A cloud message as the edge sees it: its downlink (RTT/2 and its bytes at the link's
    bandwidth) and when it is in hand, `edge_t_ms` after the request began (after that downlink
    on the emulated link; a real network has delivered it when it arrived)."""
    msg["downlink_ms"] = to_ms(link.rtt_ms / 2000 + link.serialisation_s(nbytes))
    msg["edge_t_ms"] = round(to_ms(arrived - t0) + (msg["downlink_ms"] if link.emulated else 0), 3)


def _ws_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit(("wss" if parts.scheme == "https" else "ws",) + tuple(parts[1:]))
