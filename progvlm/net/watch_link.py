"""The edge's end of a watched stream (protocol.WATCH_PATH): one WebSocket per stream, a frame
out, its acknowledgement back, in order.

Each frame's time is split into stages that add up to its wall time, as for a request
(progvlm.net.transport): uplink (RTT/2 and the frame's bytes at the bandwidth, on the emulated
link; the real send on a real one), the cloud's own stages (from its FrameAck), downlink (the
ack's bytes at the bandwidth and RTT/2) and overhead (the rest). Opening the stream pays the
handshake's round trips once (connect).

A socket that closes mid-stream (a cut link, a restarted cloud) raises CloudError; the caller
opens a new stream, which holds no reference, so its first frame is a key frame.
"""
from __future__ import annotations

import json
import time

from websockets.exceptions import ConnectionClosed

from .exchange import CloudError
from .link import LinkProfile, paced_chunks
from .protocol import END, ERROR, FRAME, RESYNC, WATCH_PATH, WATCHING, WatchStart, to_ms
from .transport import open_socket


class WatchLink:
    """An open stream to the cloud: `send(frame)` → (the cloud's reply, stage times)."""

    def __init__(self, base_url: str, questions: list[str], link: LinkProfile, codec: str = "layers",
                 token: str | None = None, timeout_s: float = 30.0, refines: bool = False):
        self.base_url, self.link, self.timeout_s = base_url.rstrip("/"), link, timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        t0 = time.perf_counter()
        self.ws = open_socket(self.base_url, WATCH_PATH, link, headers, timeout_s)
        self.ws.send(WatchStart.model_construct(questions=questions, codec=codec,
                                                    refines=refines).model_dump_json())
        self.adaptive_threshold = self._expect(WATCHING).get("adaptive_threshold")
        self.connect_ms = to_ms(time.perf_counter() - t0)

    def _expect(self, *types: str) -> dict:
        try:
            msg = json.loads(self.ws.recv(timeout=self.timeout_s))
        except TimeoutError:
            raise CloudError(f"no answer from the cloud within {self.timeout_s:g} s") from None
        except ConnectionClosed as e:
            raise CloudError(f"the cloud closed the stream ({e.rcvd.code if e.rcvd else 'no code'}"
                             f"{': ' + e.rcvd.reason if e.rcvd and e.rcvd.reason else ''})") from None
        if msg.get("type") == ERROR:
            raise CloudError(f"cloud refused the stream ({msg['status']}): {msg['detail']}",
                             msg["status"])
        if msg.get("type") not in types:
            raise CloudError(f"unexpected message from the cloud: {str(msg)[:120]}")
        return msg

    def send(self, data: bytes) -> tuple[dict, dict[str, float]]:
        """One frame through the shaped link → (the FrameAck or Resync, stage_ms: uplink, the
        cloud's stages, downlink and overhead, adding up to `wall`). On the emulated link the
        propagation and the bytes' time are paid here; on a real one they happen while the edge
        waits, and that wait is split as a request's is (progvlm.net.exchange): what the link
        needs for the frame (RTT/2 and its bytes at the bandwidth) is uplink, what it needs for
        the reply is downlink, the cloud's stages are its own, the rest is overhead."""
        link = self.link
        t0 = time.perf_counter()
        link.propagate()
        for _ in paced_chunks(data, link):
            pass  # the frame leaves as one message once the link has carried its bytes
        try:
            self.ws.send(data)
        except ConnectionClosed:
            pass  # the reason, if any, is in the next read
        sent = time.perf_counter() - t0
        reply = self._expect(FRAME, RESYNC)
        t_reply = time.perf_counter()
        down_s = link.rtt_ms / 2000 + link.serialisation_s(len(json.dumps(reply)))
        if link.emulated:
            time.sleep(down_s)
        wall = time.perf_counter() - t0
        cloud = dict(reply.get("stage_ms", {}))
        rest = max(0.0, t_reply - t0 - sent - sum(cloud.values()) / 1e3)  # neither sending nor cloud
        uplink = sent
        if not link.emulated:
            up_more = min(rest, max(0.0, link.rtt_ms / 2000 + link.serialisation_s(len(data)) - sent))
            uplink, rest = sent + up_more, rest - up_more
            down_s = min(down_s, rest)
            rest -= down_s
        stages = {"uplink": to_ms(uplink), **cloud, "downlink": to_ms(down_s),
                  "overhead": to_ms(rest), "wall": to_ms(wall)}
        return reply, stages

    def close(self):
        try:
            self.ws.send(json.dumps(END))
            self.ws.close()
        except (ConnectionClosed, OSError):
            pass
