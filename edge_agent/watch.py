"""The device's side of a camera that watches: frames in, each coded and sent on one stream to the
cloud, the standing questions' events back.

    Watcher(runtime, cloud_url, WatchSettings(questions, method, k, …)).frame(image) -> a record

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
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing import Literal

from progvlm.codec.temporal import DELTA_KIND, TemporalCoder
from progvlm.images import encode_jpeg, fit_jpeg, raw_frame
from progvlm.net.exchange import CloudError
from progvlm.net.link import LinkProfile
from progvlm.codec.bitstream import MAX_LAYERS
from progvlm.net.protocol import MAX_STANDING_QUESTIONS, RESYNC, check_question, to_ms
from progvlm.net.watch_link import WatchLink

from .profiles import DeviceProfile, get_profile
from .runtime import EdgeRuntime

WATCH_METHODS = {"temporal": "layers", "intra": "layers", "jpeg": "jpeg", "h264": "h264"}
KEY_EVERY = 64  # temporal: a key frame at least this often (frames), whatever else happens
JPEG_QUALITY = 85
DEFAULT_FPS = 5.0


class WatchSettings(BaseModel):
    """One stream's settings, declared once: the agent's /v1/watch form, the CLI and the page
    build from these fields, their defaults and ranges."""
    model_config = ConfigDict(extra="forbid")
    questions: list[str] = Field(description="the standing questions, answered on every frame")
    method: Literal[tuple(WATCH_METHODS)] = Field("temporal", description="how frames travel: "
                                                  + ", ".join(WATCH_METHODS))
    k: int = Field(1, ge=1, le=MAX_LAYERS, description="layers per frame (temporal, intra)")
    bandwidth_mbps: float = Field(1.0, description="the link's bandwidth (0.01–10000 Mbps)")
    rtt_ms: float = Field(20.0, description="the link's round-trip time (0–10000 ms)")
    fps: float = Field(DEFAULT_FPS, gt=0, le=60, description="frames per second of a clip (its "
                       "time stamps, and the H.264 encoder's rate)")
    key_every: int = Field(KEY_EVERY, ge=0, le=10_000, description="temporal: a key frame at least "
                           "every this many frames (0: only when needed)")
    h264_kbps: float | None = Field(None, gt=0, le=100_000, description="h264: the encoder's "
                                    "bitrate (default: the link's bandwidth)")

    @field_validator("questions")
    @classmethod
    def _questions(cls, questions):
        if not 1 <= len(questions) <= MAX_STANDING_QUESTIONS:
            raise ValueError(f"a stream has 1..{MAX_STANDING_QUESTIONS} standing questions, got "
                             f"{len(questions)}")
        return [check_question(q, "questions") for q in questions]

    @model_validator(mode="after")
    def _link(self):
        LinkProfile.checked(self.bandwidth_mbps, self.rtt_ms)  # LinkError (a ValueError) names the range
        return self

    def check(self, num_layers: int):
        """ValueError unless k fits this device's MAE."""
        if self.k > num_layers:
            raise ValueError(f"k must be in 1..{num_layers} (this MAE's L), got {self.k}")


class Watcher:
    """One stream from this device to the cloud. `link`: the shaped link (emulated by default)."""

    def __init__(self, runtime: EdgeRuntime, cloud_url: str, settings: WatchSettings,
                 token: str | None = None, link: LinkProfile | None = None, timeout_s: float = 30.0,
                 profile: DeviceProfile | None = None):
        """`profile`: the device profile whose compute factor scales the edge's stages (host:
        measured as is; imx95-emulated: PROJECTED, and the record lists them)."""
        settings.check(runtime.num_layers)
        self.profile = profile or get_profile("host")
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
        wall = to_ms(time.perf_counter() - t0)
        stage_ms = {**stages, **link_stages}
        stage_ms["agent"] = round(max(0.0, wall - sum(stage_ms.values())), 3)
        projected = list(stages) if self.profile.projected else []  # the device's compute
        for name in projected:
            stage_ms[name] = round(stage_ms[name] * self.profile.compute_factor, 3)
        return {"index": self.index, "cloud_index": reply["index"], "method": self.settings.method,
                "kind": kind, "key_reason": reason or None, "bytes": sent,
                "tokens_changed": None if coded is None else coded.changed,
                "layers": reply.get("layers"), "events": reply["events"], "resync": resync,
                "stage_ms": stage_ms, "projected_stages": projected,
                "total_ms": round(sum(stage_ms.values()), 3), "wall_ms": wall}


def summarise(records: list[dict], settings: WatchSettings) -> dict:
    """A played stream in a few numbers: frames, bytes (all, key and delta frames), the mean of
    each stage, the frame rate the stream sustained (frames / their measured wall time), and every
    event with its frame index and clip time (index / fps)."""
    if not records:
        return {"frames": 0, "events": []}
    n = len(records)
    by_kind: dict[str, list[int]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r["bytes"])
    stages: dict[str, float] = {}
    for r in records:
        for name, ms in r["stage_ms"].items():
            stages[name] = stages.get(name, 0.0) + ms / n
    wall_s = sum(r["wall_ms"] for r in records) / 1e3
    return {"frames": n, "method": settings.method, "k": settings.k,
            "bytes_total": sum(r["bytes"] for r in records),
            "bytes_per_frame": round(sum(r["bytes"] for r in records) / n, 2),
            "bytes_per_frame_by_kind": {k: round(sum(v) / len(v), 2) for k, v in by_kind.items()},
            "frames_by_kind": {k: len(v) for k, v in by_kind.items()},
            "resyncs": sum(1 for r in records if r["resync"]),
            "stage_ms_mean": {k: round(v, 3) for k, v in stages.items()},
            "sustained_fps": round(n / wall_s, 2) if wall_s else None,
            "events": [{"index": r["index"], "t_s": round(r["index"] / settings.fps, 3), **e}
                       for r in records for e in r["events"]]}
