"""The device's side of a camera that watches: frames in, each coded and sent on one stream to the
cloud, the standing questions' events back.

    Watcher(runtime, cloud_url, WatchSettings(questions, method, k, …)).frame(image) -> a record

Methods (WATCH_METHODS), what crosses the link per frame:
    temporal   layers 1..k coded against what the cloud holds (progvlm.codec.temporal: a key
               frame first, on a period, on a scene change and on a resync; else a delta)
    adaptive   temporal, starting at the layers the last frame needed (one fewer after a frame
               that was sure at once), one more layer of the same frame while the cloud's least
               sure answer is under its adaptive threshold (an extra round trip per layer)
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

from progvlm.codec.temporal import DELTA_KIND, KEY_EVERY, TemporalCoder
from progvlm.video.reader import DEFAULT_FPS
from progvlm.images import encode_jpeg, fit_jpeg, raw_frame
from progvlm.net.exchange import CloudError
from progvlm.net.link import LinkProfile
from progvlm.codec.bitstream import MAX_LAYERS
from progvlm.net.protocol import MAX_STANDING_QUESTIONS, RESYNC, check_question, to_ms
from progvlm.net.watch_link import WatchLink

from .profiles import DeviceProfile, get_profile
from .runtime import EdgeRuntime

WATCH_METHODS = {"temporal": "layers", "adaptive": "layers", "intra": "layers", "jpeg": "jpeg",
                 "h264": "h264"}
JPEG_QUALITY = 85


class WatchSettings(BaseModel):
    """One stream's settings, declared once: the agent's /v1/watch form, the CLI and the page
    build from these fields, their defaults and ranges."""
    model_config = ConfigDict(extra="forbid")
    questions: list[str] = Field(description="the standing questions, answered on every frame")
    method: Literal[tuple(WATCH_METHODS)] = Field("temporal", description="how frames travel: "
                                                  + ", ".join(WATCH_METHODS))
    k: int = Field(1, ge=1, le=MAX_LAYERS, description="layers per frame (temporal, intra; "
                   "adaptive chooses its own)")
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
        self.answers: dict[str, str] = {}  # each standing question's latest answer
        self.k_next = 1  # adaptive: the layers the next frame starts with
        self.since_key = 0
        self.index = 0
        self._h264 = None
        self.stream = self._open()

    def _open(self) -> WatchLink:
        return WatchLink(self.cloud_url, self.settings.questions, self.link, self.codec,
                         self.token, self.timeout_s, refines=self.settings.method == "adaptive")

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

    def _payload(self, image, stages: dict, k: int, latent_grid=None, force_key: str | None = None):
        """The frame's bytes and how they were coded: (data, kind, key reason, Coded or None,
        (latent, grid) or None)."""
        if self.codec in ("jpeg", "h264"):
            t0 = time.perf_counter()
            data = (encode_jpeg(fit_jpeg(image), JPEG_QUALITY) if self.codec == "jpeg"
                    else self._h264_packet(image))
            stages["serialize"] = to_ms(time.perf_counter() - t0)
            return data, self.codec, "", None, None
        latent, grid = latent_grid or self._tokens(image, stages)
        t0 = time.perf_counter()
        if force_key or self.settings.method == "intra":
            coded = self.coder.key(latent, k, grid, force_key or "intra")
        else:
            coded = self.coder.code(latent, k, self.reference, grid, self.since_key)
        stage = "serialize" if self.settings.method == "intra" else "temporal_code"
        stages[stage] = stages.get(stage, 0.0) + to_ms(time.perf_counter() - t0)
        return coded.data, coded.kind, coded.reason, coded, (latent, grid)

    def _exchange(self, image, stages: dict, k: int, latent_grid=None) -> dict:
        """The frame at k layers sent and acknowledged: a lost stream is reopened and a refused
        delta resent as a key frame, both said in `resync`. The cloud's reference is this
        frame's once acknowledged."""
        data, kind, reason, coded, latent_grid = self._payload(image, stages, k, latent_grid)
        resync, sent, link = None, len(data), {}
        for attempt in (1, 2):
            try:
                reply, link_stages = self.stream.send(data)
            except CloudError as e:
                if getattr(e, "status", None) is not None or attempt == 2:  # a refusal, or down
                    raise
                self.stream = self._open()  # the cloud restarted or the link was cut: a new stream
                self.reference, resync = None, f"stream reopened ({e})"
            else:
                link = {n: round(link.get(n, 0.0) + v, 3) for n, v in link_stages.items()}
                if reply["type"] != RESYNC:
                    break
                if attempt == 2:
                    raise CloudError(f"the cloud refused a key frame: {reply['detail']}")
                resync = reply["detail"]
            data, kind, reason, coded, _ = self._payload(image, stages, k, latent_grid, "resync")
            sent += len(data)
        if coded is not None:  # the cloud holds this frame now
            self.reference = coded.reference
            self.since_key = self.since_key + 1 if coded.kind == DELTA_KIND else 0
        return {"reply": reply, "link": link, "bytes": sent, "kind": kind, "reason": reason,
                "coded": coded, "resync": resync, "latent_grid": latent_grid}

    # ---- one frame -----------------------------------------------------------------------------
    def frame(self, image) -> dict:
        """One camera frame (a PIL image, or an H×W×3 uint8 array) → its record: index, kind
        (key/delta/jpeg/h264), bytes sent, layers, stage_ms (adding up to its total), the
        standing questions' answers that changed (events), and resync (why a key frame was
        forced: the cloud held no reference, or the stream was reopened). Adaptive sends more
        layers of the same frame while the cloud is unsure of an answer."""
        t0 = time.perf_counter()
        image = image.convert("RGB") if isinstance(image, Image.Image) else raw_frame(image)
        stages: dict = {}
        adaptive = self.settings.method == "adaptive"
        k = self.k_next if adaptive else self.settings.k
        steps = [self._exchange(image, stages, k)]
        threshold = self.stream.adaptive_threshold
        while adaptive and k < self.runtime.num_layers and threshold is not None \
                and (steps[-1]["reply"].get("confidence_min") or 0.0) < threshold:
            k += 1
            steps.append(self._exchange(image, stages, k, steps[-1]["latent_grid"]))
        if adaptive:  # sure at once: try one layer fewer on the next frame
            self.k_next = max(1, k - 1) if len(steps) == 1 else k
        record = self._record(steps, stages, t0)
        self.index += 1
        return record

    def _events(self, steps: list[dict]) -> list[dict]:
        """The answers that changed over this frame: what the cloud pushed, netted over the
        refinements of one frame (an answer that changed and changed back is no event)."""
        before, latest = dict(self.answers), {}
        for step in steps:
            for e in step["reply"]["events"]:
                latest[e["question"]] = e
                self.answers[e["question"]] = e["answer"]
        return [{**e, "previous": before.get(q)} for q, e in latest.items() if e["answer"] != before.get(q)]

    def _record(self, steps: list[dict], stages: dict, t0: float) -> dict:
        link_stages: dict[str, float] = {}
        for step in steps:
            for name, ms in step["link"].items():
                if name != "wall":
                    link_stages[name] = round(link_stages.get(name, 0.0) + ms, 3)
        wall = to_ms(time.perf_counter() - t0)
        stage_ms = {**stages, **link_stages}
        stage_ms["agent"] = round(max(0.0, wall - sum(stage_ms.values())), 3)
        projected = list(stages) if self.profile.projected else []  # the device's compute
        for name in projected:
            stage_ms[name] = round(stage_ms[name] * self.profile.compute_factor, 3)
        first, last = steps[0], steps[-1]
        return {"index": self.index, "cloud_index": last["reply"]["index"],
                "method": self.settings.method, "kind": first["kind"],
                "key_reason": first["reason"] or None, "bytes": sum(s["bytes"] for s in steps),
                "tokens_changed": None if first["coded"] is None else first["coded"].changed,
                "layers": last["reply"].get("layers"), "sends": len(steps),
                "confidence_min": last["reply"].get("confidence_min"),
                "events": self._events(steps),
                "resync": "; ".join(s["resync"] for s in steps if s["resync"]) or None,
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
