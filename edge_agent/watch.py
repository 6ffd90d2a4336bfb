"""The device's side of a camera that watches: frames in, each coded and sent on one stream to the
cloud, the standing questions' events back.

    Watcher(runtime, cloud_url, questions, link, method, k).frame(image) -> one record per frame

Methods (WATCH_METHODS), what crosses the link per frame:
    temporal   layers 1..k coded against what the cloud holds (progvlm.codec.temporal: a key
               frame first, on a period, on a scene change and on a resync; else a delta)
    intra      layers 1..k of every frame from scratch (a key frame each time: today's coding)
    jpeg       the camera frame as JPEG; the cloud runs the whole VLM
    h264       the frame through an H.264 encoder at a bitrate (progvlm.video.h264); the cloud
               decodes the video stream and runs the whole VLM

The edge keeps the reference the cloud acknowledged last (each FrameAck says the frame is
held), never one it merely sent: a frame the cloud refuses as a Resync (it holds no
reference: a restarted or new stream) is sent again at once as a key frame, and the record says
so; a stream whose socket closes (a cut link, a cloud restart) is reopened once and the frame
goes as a key frame. Each record's stage times add up to its wall time: the edge's stages here,
the link's and the cloud's from progvlm.net.watch_link.
"""
from __future__ import annotations

import time

from PIL import Image
from dataclasses import dataclass

from progvlm.codec.temporal import DELTA_KIND, TemporalCoder
from progvlm.images import encode_jpeg, fit_jpeg, raw_frame
from progvlm.net.exchange import CloudError
from progvlm.net.link import LinkProfile
from progvlm.net.protocol import RESYNC, to_ms
from progvlm.net.watch_link import WatchLink

from .runtime import EdgeRuntime

WATCH_METHODS = {"temporal": "layers", "intra": "layers", "jpeg": "jpeg", "h264": "h264"}
KEY_EVERY = 64  # temporal: a key frame at least this often (frames), whatever else happens
JPEG_QUALITY = 85
DEFAULT_FPS = 5.0


@dataclass
class WatchSettings:
    """One stream's settings: its standing questions, how frames travel and the link."""
    questions: list[str]
    method: str = "temporal"
    k: int = 1
    bandwidth_mbps: float = 1.0
    rtt_ms: float = 20.0
    fps: float = DEFAULT_FPS
    key_every: int = KEY_EVERY
    h264_kbps: float | None = None  # h264: the encoder's bitrate (default: the link's)

    def check(self, num_layers: int):
        if self.method not in WATCH_METHODS:
            raise ValueError(f"method must be one of {', '.join(WATCH_METHODS)}, got {self.method!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= num_layers:
            raise ValueError(f"k must be an integer in 1..{num_layers}, got {self.k!r}")
        if not 0 < self.fps <= 60:
            raise ValueError(f"fps must be in (0, 60], got {self.fps!r}")
        if self.key_every < 0:
            raise ValueError(f"key_every must be ≥ 0, got {self.key_every}")
        LinkProfile.checked(self.bandwidth_mbps, self.rtt_ms)


class Watcher:
    """One stream from this device to the cloud. `link`: the shaped link (emulated by default)."""

    def __init__(self, runtime: EdgeRuntime, cloud_url: str, settings: WatchSettings,
                 token: str | None = None, link: LinkProfile | None = None, timeout_s: float = 30.0):
        settings.check(runtime.num_layers)
        self.runtime, self.settings = runtime, settings
        self.cloud_url, self.token, self.timeout_s = cloud_url, token, timeout_s
        self.link = link or LinkProfile.checked(settings.bandwidth_mbps, settings.rtt_ms)
        self.codec = WATCH_METHODS[settings.method]
        self.coder = TemporalCoder(runtime.codec, settings.key_every)
        self.reference = None  # what the cloud acknowledged holding
        self.since_key = 0
        self.index = 0
        self._h264 = None
        self.stream = self._open()

    def _open(self) -> WatchLink:
        return WatchLink(self.cloud_url, self.settings.questions, self.link, self.codec,
                         self.token, self.timeout_s)

    def close(self):
        self.stream.close()

    # ---- the edge's stages ---------------------------------------------------------------------
    def _tokens(self, image, stages: dict):
        t0 = time.perf_counter()
        model_input = self.runtime.preprocess(image)
        t1 = time.perf_counter()
        tokens, grid = self.runtime.vision(model_input)
        t2 = time.perf_counter()
        latent = self.runtime.latent(tokens)
        stages.update(edge_preprocess=to_ms(t1 - t0), edge_vision=to_ms(t2 - t1),
                      mae_encode=to_ms(time.perf_counter() - t2))
        return latent, grid

    def _h264_packet(self, image) -> bytes:
        from progvlm.video.h264 import H264Stream
        if self._h264 is None:
            kbps = self.settings.h264_kbps or self.settings.bandwidth_mbps * 1000
            w, h = image.size
            self._h264 = H264Stream(w, h, self.settings.fps, int(kbps * 1000))
        return self._h264.encode(image)

    def _payload(self, image, stages: dict, latent_grid=None, force_key: str | None = None):
        """The frame's bytes and how they were coded (kind, reason, tokens changed)."""
        if self.codec == "jpeg":
            t0 = time.perf_counter()
            data = encode_jpeg(fit_jpeg(image), JPEG_QUALITY)
            stages["serialize"] = to_ms(time.perf_counter() - t0)
            return data, "jpeg", "", None, None
        if self.codec == "h264":
            t0 = time.perf_counter()
            data = self._h264_packet(image)
            stages["serialize"] = to_ms(time.perf_counter() - t0)
            return data, "h264", "", None, None
        latent, grid = latent_grid or self._tokens(image, stages)
        t0 = time.perf_counter()
        if force_key or self.settings.method == "intra":
            coded = self.coder.key(latent, self.settings.k, grid, force_key or "intra")
        else:
            coded = self.coder.code(latent, self.settings.k, self.reference, grid, self.since_key)
        stages["temporal_code" if self.settings.method == "temporal" else "serialize"] = \
            to_ms(time.perf_counter() - t0)
        return coded.data, coded.kind, coded.reason, coded, (latent, grid)

    # ---- one frame -----------------------------------------------------------------------------
    def frame(self, image) -> dict:
        """One camera frame (a PIL image, or an H×W×3 uint8 array) → its record: index, kind (key/delta/jpeg/h264), bytes
        sent, stage_ms (adding up to wall), the events the cloud pushed, and resync (why a key
        frame was forced: the cloud held no reference, or the stream was reopened)."""
        t0 = time.perf_counter()
        image = image.convert("RGB") if isinstance(image, Image.Image) else raw_frame(image)
        stages: dict = {}
        data, kind, reason, coded, latent_grid = self._payload(image, stages)
        resync, sent = None, len(data)
        try:
            reply, link_stages = self.stream.send(data)
        except CloudError as e:
            if getattr(e, "status", None) is not None:  # a refusal, not a lost stream
                raise
            self.stream = self._open()  # the cloud restarted or the link was cut: a new stream
            self.reference, resync = None, f"stream reopened ({e})"
            reply, link_stages = self._resend(image, stages, latent_grid)
            data, kind, reason, coded = reply.pop("_sent")
            sent += len(data)
        if reply["type"] == RESYNC:
            resync = reply["detail"]
            reply, link_stages2 = self._resend(image, stages, latent_grid)
            link_stages = {k: round(link_stages.get(k, 0) + v, 3) for k, v in link_stages2.items()}
            data, kind, reason, coded = reply.pop("_sent")
            sent += len(data)
        if coded is not None:  # the cloud holds this frame now
            self.reference = coded.reference
            self.since_key = self.since_key + 1 if coded.kind == DELTA_KIND else 0
        record = self._record(reply, kind, reason, sent, coded, stages, link_stages, t0, resync)
        self.index += 1
        return record

    def _resend(self, image, stages, latent_grid):
        """The frame again as a key frame (layers) or as it was (jpeg/h264) on the stream."""
        data, kind, reason, coded, _ = self._payload(image, stages, latent_grid, force_key="resync")
        reply, link_stages = self.stream.send(data)
        if reply["type"] == RESYNC:
            raise CloudError(f"the cloud refused a key frame: {reply['detail']}")
        reply["_sent"] = (data, kind, reason, coded)
        return reply, link_stages

    def _record(self, reply, kind, reason, sent, coded, stages, link_stages, t0, resync) -> dict:
        link_stages = dict(link_stages)
        link_stages.pop("wall", None)
        stage_ms = {**stages, **link_stages}
        wall = to_ms(time.perf_counter() - t0)
        stage_ms["agent"] = round(max(0.0, wall - sum(stage_ms.values())), 3)
        return {"index": self.index, "cloud_index": reply["index"], "method": self.settings.method,
                "kind": kind, "key_reason": reason or None, "bytes": sent,
                "tokens_changed": None if coded is None else coded.changed,
                "layers": reply.get("layers"), "events": reply["events"], "resync": resync,
                "stage_ms": stage_ms, "total_ms": wall}
