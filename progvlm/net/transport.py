"""The transport from the edge to the cloud backend: real bytes, paced, over a kept-open session.

`Transport` is what the edge depends on: `info()`, `full(image, question, link)`,
`progressive(bitstream, question, link, ...)`, `steered(...)`, `close()` and `base_url`. Each
request is a layer schedule (progvlm.net.exchange: full, progressive, steered) that its one
exchange loop, `Transport._exchange`, runs on a channel to the cloud's stream route (in
progvlm.net.protocol's messages): the loop owns the reader, the sending, the retry of a reused
channel found closed, and what becomes of the channel afterwards (kept for the next request,
or closed). A new transport is one subclass that opens channels (`open`), and may keep them
(`reused`, `release`).

`CloudLink` is the WebSocket transport. Every request, progressive stream or full-cloud image,
goes over the cloud's WebSocket; the socket stays open afterwards and carries the next request,
so only the first request (or one after the cloud dropped an idle socket, or restarted) pays
for a handshake. It keeps a small pool of open sockets, one per concurrent caller. HTTP is used
for /v1/info only. `open_socket` opens every WebSocket to the cloud: CloudLink's, and a watched
stream's (progvlm.net.watch_link).

Every request pays the round trip as half before its first byte (the request propagating) and
half after its reply (the answer propagating back); the bytes themselves leave at the shaped
bandwidth through `progvlm.net.link.paced_chunks`, and the reply's bytes are held back until a
link of that bandwidth would have delivered them. Each stage time is measured wall time, and
the stages of an Exchange add up to its wall time:

    connect   0 on a reused socket; else opening one: HANDSHAKE_RTTS round trips of the emulated
              link (TCP, then the HTTP upgrade; TLS adds one) and the real handshake (on a
              real link, with rtt_ms=0, the real one alone). A reused socket found closed
              (the cloud dropped it) is replaced once, transparently; that costs connect too.
    uplink    RTT/2 + the transfer, per round of sending (progvlm.net.exchange says how)
    cloud     the cloud's own stage times (in the reply)
    downlink  the reply's bytes at the bandwidth + RTT/2, for each message the edge acts on
    overhead  the rest (framing, JSON, waiting for the cloud's lock)
"""
from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State
from websockets.sync.client import connect as ws_connect

from ..codec.bitstream import parse_header
from . import exchange
from .exchange import Channel, ChannelClosed, CloudError, Exchange, Schedule, Session, Stale
from .link import LinkProfile
from .protocol import INFO_PATH, STREAM_PATH, Start, to_ms

__all__ = ["CloudError", "CloudLink", "Exchange", "HANDSHAKE_RTTS", "Transport", "open_socket", "to_ms"]

HANDSHAKE_RTTS = {"ws": 2, "wss": 3}  # round trips before a new socket carries a request
MAX_IDLE_SOCKETS = 4  # open sockets kept for reuse; more concurrent callers open and close their own


class Transport(ABC):
    """A way from the edge to the cloud's stream route: the requests the edge makes, each run
    by the one exchange loop on a channel that `open` (or `reused`) gives."""

    base_url: str
    timeout_s: float = 10.0  # the longest wait for any one answer
    keep_open: bool = False  # whether the cloud keeps a channel open after a request

    @abstractmethod
    def info(self) -> dict:
        """The cloud's /v1/info."""

    @abstractmethod
    def open(self, link: LinkProfile) -> Channel:
        """A new channel to the cloud's stream route (its set-up paid on `link`); CloudError
        if the cloud cannot be reached or refuses it."""

    def reused(self) -> Channel | None:
        """A channel kept open from an earlier request, if any."""
        return None

    def release(self, channel: Channel):
        """`channel` finished its request cleanly: keep it for the next, or close it."""
        channel.close()

    def close(self):
        """Release what the transport holds."""

    # ---- requests ----------------------------------------------------------------------------
    def full(self, image: bytes, question: str, link: LinkProfile) -> Exchange:
        """Send a camera frame through the shaped link; the cloud runs the whole VLM."""
        return self._exchange(link, self._start(question, kind="full"), partial(exchange.full, image),
                              "request")

    def progressive(self, bitstream: bytes, question: str, link: LinkProfile,
                    cut_after_layer: int | None = None, on_refinement=None,
                    grace_s: float = 2.0, refine: bool = True) -> Exchange:
        """Stream the layers in order; the cloud answers after each complete layer. With
        `cut_after_layer` = j the uplink dies after layer j (fault injection): the answer is
        the cloud's answer from layers 1..j, and the exchange says so; the cut socket is
        closed, never reused. Without `refine`, the cloud answers once, when the layers are in
        (or the uplink falls silent)."""
        header = parse_header(bitstream)
        ends = header.layer_ends()
        if cut_after_layer is not None and not 0 <= cut_after_layer <= len(ends):
            raise ValueError(f"cut_after_layer must be in 0..{len(ends)}, got {cut_after_layer}")
        # header + layer 1 travel as one segment, then one segment per layer (a cut at 0 sends
        # the header alone)
        cuts = (ends if cut_after_layer is None else ends[:cut_after_layer]) or [header.header_bytes]
        segments = [bitstream[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
        return self._exchange(link, self._start(question, refine=refine),
                              partial(exchange.progressive, segments, header.k, cut_after_layer,
                                      grace_s, refine), "stream", on_refinement)

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
        ends = parse_header(bitstream).layer_ends()
        if not 1 <= send_until <= len(ends):
            raise ValueError(f"send_until must be in 1..{len(ends)}, got {send_until}")
        if resume and not frame_id:
            raise ValueError("resume needs a frame_id")
        conversation = {"frame_id": frame_id, "resume": bool(resume)} if frame_id else {}
        return self._exchange(link, self._start(question, refine=True, **conversation),
                              partial(exchange.steered, bitstream, ends, send_until, more, resume),
                              "stream", on_refinement)

    def _start(self, question: str, **fields) -> str:
        return Start.message(question, keep_open=self.keep_open, **fields)

    # ---- the exchange loop -------------------------------------------------------------------
    def _exchange(self, link: LinkProfile, start: str, schedule: Schedule, what: str,
                  on_refinement=None) -> Exchange:
        """`schedule` run on a reused channel, or on a new one if there is none or the reused
        one turned out closed; connect is the time until the channel that served was open."""
        t0 = time.perf_counter()
        channel = self.reused()
        if channel is not None:
            try:
                return self._run(channel, link, start, schedule, Session(
                    channel, link, t0, 0.0, True, self.timeout_s, what, on_refinement))
            except Stale:
                pass
        channel = self.open(link)
        return self._run(channel, link, start, schedule, Session(
            channel, link, t0, time.perf_counter() - t0, False, self.timeout_s, what, on_refinement))

    def _run(self, channel: Channel, link: LinkProfile, start: str, schedule: Schedule,
             session: Session) -> Exchange:
        """The loop: each round of the schedule sent (the start message with the first), ended,
        and waited for; then the channel kept (its final message in, or coming: the end was
        sent) or closed (a refusal, a cut link, no answer)."""
        rounds, heard, pending_start = schedule(session), None, [start]
        try:
            while True:
                try:
                    step = rounds.send(heard)
                except StopIteration as done:
                    result = done.value
                    break
                if pending_start or step.send is not None:
                    session.send(itertools.chain(pending_start, step.send or ()))
                    pending_start = []
                if step.end:
                    session.end()
                heard = session.wait_for(step.wait, step.within_s, step.required) if step.wait else None
        except BaseException:
            channel.close()
            raise
        if session.final is not None:
            self.release(channel)
        elif session.ended:  # freed once the final message is in (a thread waits for it, so
            # the caller has its answer a round trip sooner)
            def wait():
                session.done.wait(self.timeout_s)
                if session.final is not None:
                    self.release(channel)
                else:
                    channel.close()
            threading.Thread(target=wait, daemon=True, name="cloud-final").start()
        else:  # closed once the exchange is measured: a device whose uplink died would not
            channel.close()  # wait for a close handshake
        return result


class _Socket:
    """A websockets connection as a Channel."""

    def __init__(self, ws):
        self.ws = ws

    def send(self, message):
        try:
            self.ws.send(message)
        except ConnectionClosed:
            raise ChannelClosed from None

    def recv(self) -> str:
        try:
            return self.ws.recv()
        except ConnectionClosed:
            raise ChannelClosed from None

    def close(self):
        self.ws.close()


class CloudLink(Transport):
    """The WebSocket transport, with a pool of kept-open sockets."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0,
                 keep_open: bool = True):
        """keep_open=False opens (and pays for) a new socket for every request."""
        self.base_url, self.token = base_url.rstrip("/"), token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self.keep_open = keep_open
        self.sockets_opened = 0
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)
        self._idle: list = []
        self._pool_lock = threading.Lock()

    def close(self):
        """Close the HTTP client and every idle socket (sockets in use close when their request ends)."""
        self._http.close()
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for ws in idle:
            ws.close()

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
        WebSocket is (`Transport._exchange`)."""
        for attempt in (1, 2):
            try:
                return self._checked(self._http.get(INFO_PATH))
            except (httpx.ReadError, httpx.RemoteProtocolError) as e:
                if attempt == 2:
                    raise _unreachable(self.base_url, e) from None
            except httpx.HTTPError as e:
                raise _unreachable(self.base_url, e) from None

    # ---- the socket pool ---------------------------------------------------------------------
    def open(self, link: LinkProfile) -> Channel:
        ws = open_socket(self.base_url, STREAM_PATH, link, self.headers, self.timeout_s)
        self.sockets_opened += 1
        return _Socket(ws)

    def reused(self) -> Channel | None:
        if not self.keep_open:
            return None
        with self._pool_lock:
            while self._idle:
                ws = self._idle.pop()
                if ws.protocol.state is State.OPEN:
                    return _Socket(ws)
                ws.close()  # the cloud dropped it while idle
        return None

    def release(self, channel: Channel):
        ws = channel.ws
        if self.keep_open and ws.protocol.state is State.OPEN:
            with self._pool_lock:
                if len(self._idle) < MAX_IDLE_SOCKETS:
                    self._idle.append(ws)
                    return
        ws.close()


def open_socket(base_url: str, path: str, link: LinkProfile, headers: dict, timeout_s: float):
    """A new WebSocket to `path` on the cloud at `base_url` (http → ws, https → wss), the
    handshake's round trips paid on the emulated link (a real link pays its own); CloudError if
    the cloud refuses it or cannot be reached. The caller closes it."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    if link.emulated:
        time.sleep(HANDSHAKE_RTTS[scheme] * link.rtt_ms / 1000)
    try:
        # websockets ≥ 17 wants connect() entered as a context manager; a kept-open socket
        # outlives any one block, so it is entered here and closed when dropped
        # no permessage-deflate: the payload is already coded, and on a kept-open socket
        # deflate's shared window would send a repeated frame as a back-reference, bytes
        # no camera's next frame would ever save
        return ws_connect(urlunsplit((scheme,) + tuple(parts[1:])) + path, additional_headers=headers,
                          compression=None, open_timeout=timeout_s, max_size=1 << 20).__enter__()
    except InvalidStatus as e:
        raise CloudError(f"cloud refused the stream: {e}") from None
    except (OSError, WebSocketException, TimeoutError) as e:
        raise _unreachable(base_url, e) from None


def _unreachable(base_url: str, e: Exception) -> CloudError:
    return CloudError(f"cloud backend at {base_url} unreachable: {type(e).__name__}: {e}")
