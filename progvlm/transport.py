"""The transport from the edge to the cloud backend: real bytes, paced, over HTTP/WebSocket.

Every request pays the round trip as half before its first byte (the request propagating) and
half after its reply (the answer propagating back); the bytes themselves leave at the shaped
bandwidth through `progvlm.link.paced_chunks`, and the reply's bytes are held back until a link
of that bandwidth would have delivered them. Connections are kept alive between requests, as a
device with a steady uplink would. Each stage time is measured wall time:

    uplink    RTT/2 + the transfer, until the cloud has the last byte: a kernel buffer in front
              of a slow real link takes the bytes long before they arrive, so the end is the
              later of the paced sending and the cloud's first-to-last-byte receive time (for a
              watched stream, where the cloud computes while layers arrive, the sending alone)
    downlink  reply bytes paced at the bandwidth + RTT/2
    overhead  the rest of the measured exchange (HTTP framing, JSON, waiting for the cloud's lock)
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import connect as ws_connect

from .bitstream import parse
from .link import LinkProfile, paced_chunks, paced_segments


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

    def overhead_ms(self, cloud_ms: float) -> float:
        return max(0.0, self.wall_ms - self.uplink_ms - self.downlink_ms - cloud_ms)


def to_ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class CloudLink:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)

    def close(self):
        self._http.close()

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
        try:
            return self._checked(self._http.get("/v1/info"))
        except httpx.HTTPError as e:
            raise self._fail(e) from None

    def full(self, image: bytes, question: str, link: LinkProfile) -> Exchange:
        """Send a camera frame through the shaped link; the cloud runs the whole VLM."""
        t0 = time.perf_counter()
        time.sleep(link.rtt_ms / 2000)
        sent = {}

        def body():
            yield from paced_chunks(image, link)
            sent["t"] = time.perf_counter()

        try:
            response = self._http.post("/v1/full", params={"question": question}, content=body(),
                                       headers={"Content-Type": "application/octet-stream"})
        except httpx.HTTPError as e:
            raise self._fail(e) from None
        reply = self._checked(response)
        t_reply = time.perf_counter()
        self._pace_reply(len(response.content), link, t_reply)
        t_end = time.perf_counter()
        uplink = max(sent["t"] - t0, link.rtt_ms / 2000 + reply.get("receive_ms", 0.0) / 1e3)
        return Exchange(reply, to_ms(uplink), to_ms(t_end - t_reply), to_ms(t_end - t0))

    def progressive(self, bitstream: bytes, question: str, link: LinkProfile,
                    cut_after_layer: int | None = None, on_refinement=None,
                    grace_s: float = 2.0, refine: bool = True) -> Exchange:
        """Stream the layers in order; the cloud answers after each complete layer. With
        `cut_after_layer` = j the uplink dies after layer j (fault injection): the answer is
        the cloud's answer from layers 1..j, and the exchange says so. Without `refine`, the
        cloud answers once, when the layers are in (or the uplink falls silent)."""
        stream = parse(bitstream)
        ends = stream.layer_ends()
        if cut_after_layer is not None and not 0 <= cut_after_layer <= len(ends):
            raise ValueError(f"cut_after_layer must be in 0..{len(ends)}, got {cut_after_layer}")
        # header + layer 1 travel as one segment, then one segment per layer (a cut at 0 sends
        # the header alone)
        cuts = (ends if cut_after_layer is None else ends[:cut_after_layer]) or [stream.header_bytes]
        segments = [bitstream[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
        url = _ws_url(self.base_url) + "/v1/progressive/stream"
        try:
            ws = ws_connect(url, additional_headers=self.headers, open_timeout=self.timeout_s,
                            max_size=1 << 20)
        except (OSError, WebSocketException, TimeoutError) as e:
            if isinstance(e, InvalidStatus):
                raise CloudError(f"cloud refused the stream: {e}") from None
            raise self._fail(e) from None
        refinements, final, errors = [], {}, []
        t0 = time.perf_counter()

        def reader():
            try:
                for message in ws:
                    msg = json.loads(message)
                    # as the edge sees it: after the reply's serialisation and propagation
                    msg["downlink_ms"] = to_ms(link.rtt_ms / 2000 + link.serialisation_s(len(message)))
                    msg["edge_t_ms"] = round(to_ms(time.perf_counter() - t0) + msg["downlink_ms"], 3)
                    if msg.get("type") == "refinement":
                        refinements.append(msg)
                        if on_refinement:
                            on_refinement(msg)
                    elif msg.get("type") == "final":
                        final.update(msg)
                    elif msg.get("type") == "error":
                        errors.append(msg)
            except ConnectionClosed:
                pass

        with ws:  # closes the connection however the exchange ends
            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            try:
                time.sleep(link.rtt_ms / 2000)
                ws.send(json.dumps({"question": question, "refine": refine}))
                for chunk in paced_segments(segments, link):
                    ws.send(chunk)
                t_sent = time.perf_counter()
                if cut_after_layer is None:
                    ws.send(json.dumps({"end": True}))
                    thread.join(self.timeout_s)
                else:  # the uplink is gone; answers already on their way down still arrive
                    deadline = time.perf_counter() + grace_s
                    while (not refinements or refinements[-1]["layers"] < cut_after_layer) \
                            and time.perf_counter() < deadline and not errors:
                        time.sleep(0.002)
            except ConnectionClosed:
                t_sent = time.perf_counter()  # the cloud hung up (an error message says why)
                thread.join(1.0)
        thread.join(1.0)
        if errors:
            e = errors[-1]
            raise CloudError(f"cloud refused the stream ({e['status']}): {e['detail']}", e["status"])
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
        uplink = t_sent - t0
        if not refine:  # the cloud computed nothing while layers arrived: its receive time is clean
            uplink = max(uplink, link.rtt_ms / 2000 + last.get("received_ms", 0.0) / 1e3)
        return Exchange(reply, to_ms(uplink), last["downlink_ms"],
                        max(last["edge_t_ms"], to_ms(time.perf_counter() - t0)), refinements,
                        cut_after_layer)

    @staticmethod
    def _pace_reply(nbytes: int, link: LinkProfile, t_reply: float):
        due = t_reply + link.serialisation_s(nbytes) + link.rtt_ms / 2000
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


def _ws_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit(("wss" if parts.scheme == "https" else "ws",) + tuple(parts[1:]))
