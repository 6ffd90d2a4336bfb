"""The edge agent: one question about one image, in the mode asked, as one timed record.

    full-cloud   frame → JPEG (the camera frame as it is, by default; or at the model's input
                 size) → link → cloud runs the whole VLM
    full-edge    the whole VLM on the device; nothing crosses the link
    progressive  vision half → MAE layers 1..k → link (layer by layer) → cloud answers
    auto         progressive with the largest k whose predicted end-to-end time fits the budget
    adaptive     receiver-driven: header + layer 1, then one more layer after each answer the
                 cloud is not sure of (confidence < threshold), while the budget still fits one
                 (see `_adaptive_stop`); the record says why it stopped

Conversation (`conversation=True`, progressive, auto and adaptive): the frame gets an id, a
content hash of its MAE stream (all L layers, the MAE's fingerprint in the header); the cloud
keeps what it received under it (progvlm.net.frame_cache) and the agent remembers, per frame (its
pixels' hash), the stream it made and how many layers the cloud holds. A follow-up question
about the same pixels resumes: no edge compute, no image bytes unless more layers are needed;
a cloud that lost the frame says so and the frame is sent again (the same answer, more bytes).

The record's stage times (ms) add up to its total: edge stages measured here (scaled, and
listed in `projected_stages`, under a projected device profile), link stages measured through
the shaped link, cloud stages measured by the cloud.

A request is checked whole (`check`: every field, the image decoded, the cloud's models) before
any work (`run`), so that a caller streaming the answer gets its errors as real statuses. Every
wait in a request is bounded by one deadline set when it arrives (`request_timeout_s`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

from progvlm.codec.bitstream import parse
from progvlm.net.frame_cache import FRAME_TTL_S, CachedFrame, FrameCache
from progvlm.images import JPEG_MAX_SIDE, encode_jpeg, fit_jpeg, load_image, raw_frame, resize_for_model
from progvlm.net.link import LinkProfile
from progvlm.net.protocol import COMPUTE_ALLOWANCE_S, MAX_LINK_S, check_question
from progvlm.adaptive import DEFAULT_RULE
from progvlm.net.transport import CloudError, CloudLink, to_ms

from .profiles import DeviceProfile, get_profile
from .runtime import EdgeRuntime

MODES = ("full-cloud", "full-edge", "progressive", "auto", "adaptive")
CONVERSATION_MODES = ("progressive", "auto", "adaptive")
# frames this agent remembers for conversations (their streams are a few hundred bytes each);
# the cloud forgets a frame after progvlm.net.frame_cache.FRAME_TTL_S, so the agent does too
EDGE_FRAMES = 32
JPEG_QUALITY = 90  # full-cloud's default; a caller may ask 1..95 (Pillow's useful range)
# full-cloud's frame: the camera's own (what a device without the model would send), or the
# frame already resized to the model's input (which presumes the device knows the model)
FRAMES = ("camera", "model")
DEFAULT_BUDGET_MS = 500.0
DECODE_SLOTS = 2  # uploads decoded at the same time; more wait (each may cost ~300 MB at the cap)
REPLY_BYTES_ESTIMATE = 250  # a JSON answer on the downlink, for auto's prediction
# stages that are no device compute, so a projected device profile never scales them: decoding
# a file (the host's container work), waiting for the device, the agent's own bookkeeping
HOST_STAGES = ("file_decode", "device_queue", "agent")


class AskError(ValueError):
    """A request the agent cannot serve as asked; str(e) says why."""


class PairingError(RuntimeError):
    """The cloud runs another VLM or MAE than this device: their answers cannot be compared."""


class DeadlineError(RuntimeError):  # (not TimeoutError: asyncio.wait_for raises that one)
    """The request could not finish within its deadline; str(e) says where it stood."""


class BusyError(DeadlineError):
    """Other requests held the device until this one's deadline."""


class LinkEstimates:
    """auto's model of what it cannot measure before sending, the cloud's compute and the
    protocol overhead, per client: the median of that client's last WINDOW clean requests
    (answered, nothing cut) on the same link, else on any link, else a prior. A median over a
    window per client is not moved by one slow or cut request, nor by another client's."""

    WINDOW = 15
    PRIORS = {"cloud_ms": 30.0, "overhead_ms": 5.0}

    def __init__(self):
        self._samples: dict[tuple, deque] = {}
        self._lock = threading.Lock()

    def add(self, client: str, link: LinkProfile, watched: bool, cloud_ms: float, overhead_ms: float):
        """One clean request's measured cloud and overhead times (`watched`: the cloud answered
        every layer, so its time holds the earlier layers' answers)."""
        with self._lock:
            window = self._samples.setdefault((client, watched), deque(maxlen=self.WINDOW))
            window.append(((link.bandwidth_mbps, link.rtt_ms), cloud_ms, overhead_ms))

    def estimate(self, client: str, link: LinkProfile, watched: bool) -> dict:
        """{"cloud_ms": {"ms", "samples", "source"}, "overhead_ms": {…}, "method"}."""
        with self._lock:
            window = list(self._samples.get((client, watched), ()))
        same_link = [s for s in window if s[0] == (link.bandwidth_mbps, link.rtt_ms)]
        used, source = ((same_link, "this client's requests on this link") if same_link else
                        (window, "this client's requests on other links") if window else
                        ([], "prior (no clean request from this client yet)"))
        out = {"method": f"median of the client's last {self.WINDOW} answered requests with "
                         "nothing cut (cut or failed ones never count)"}
        for i, name in ((1, "cloud_ms"), (2, "overhead_ms")):
            value = statistics.median(s[i] for s in used) if used else self.PRIORS[name]
            out[name] = {"ms": round(value, 3), "samples": len(used), "source": source}
        return out


@dataclass
class CheckedAsk:
    """One request, checked and its image decoded: what `EdgeAgent.run` needs."""
    image: object  # PIL image
    decode_ms: float  # measured (not yet scaled by the profile)
    from_file: bool  # decoded from a file (host work, its own stage) or a raw camera frame
    question: str
    mode: str
    k: int
    link: LinkProfile
    budget_ms: float
    cut_after_layer: int | None
    frame: str  # full-cloud's JPEG: "camera" or "model" size
    jpeg_quality: int
    profile: DeviceProfile
    client: str
    deadline: float  # time.monotonic() by which the record must be ready
    t_arrived: float  # time.perf_counter() when the check began: the record's wall_ms counts from it
    conversation: bool = False  # keep the frame at the cloud; resume it if it is there
    new_conversation: bool = False  # a conversation's first question: send the frame afresh
    adaptive_threshold: float | None = None  # None: the cloud's (calibrated or default)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


def _check_budget(budget_ms):
    if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
        raise AskError(f"the latency budget must be a positive number of ms, got {budget_ms!r}")


def check_same_models(edge: dict, cloud: dict, cloud_url: str):
    """Refuse a cloud whose VLM or MAE differs from the edge's, naming both."""
    for key, what in (("vlm_id", "VLM"), ("mae_fingerprint", "MAE")):
        if edge.get(key) != cloud.get(key):
            raise PairingError(f"the cloud at {cloud_url} runs {what} {cloud.get(key)}, this "
                               f"device runs {what} {edge.get(key)}: start both with the same "
                               "--vlm and --mae")


class EdgeAgent:
    def __init__(self, runtime: EdgeRuntime, cloud_url: str | None = None, token: str | None = None,
                 profile: DeviceProfile | None = None, timeout_s: float = 10.0,
                 max_link_s: float = MAX_LINK_S, request_timeout_s: float | None = None):
        self.runtime = runtime
        self.max_link_s = max_link_s
        self.request_timeout_s = max_link_s + COMPUTE_ALLOWANCE_S if request_timeout_s is None else request_timeout_s
        self.profile = profile or get_profile("host")
        self.cloud = CloudLink(cloud_url, token, timeout_s) if cloud_url else None
        self._cloud_checked = False
        if self.cloud is not None:  # at start: the two halves must be one model
            try:
                self._check_cloud()
            except CloudError:
                pass  # down for now: full-edge still answers; checked again before cloud use
        self._device = threading.Lock()  # one camera, one frame at a time
        # uploads decoded at once: a file of a few KB can decode to the pixel cap's ~120 MB
        # (and more while Pillow works), so concurrent uploads must not multiply it unbounded
        self._decoding = threading.BoundedSemaphore(DECODE_SLOTS)
        # conversations: per frame, the stream made for it and the layers the cloud holds
        self.frames = FrameCache(ttl_s=FRAME_TTL_S, max_frames_per_client=EDGE_FRAMES)
        self.estimates = LinkEstimates()  # auto's, learnt per client from clean answers
        if self.profile.threads:
            runtime.set_threads(self.profile.threads)
        self._warm_up()

    def _check_cloud(self):
        """Raise PairingError if the cloud runs another VLM or MAE (CloudError if it is down)."""
        if not self._cloud_checked:
            info = self.cloud.info()
            check_same_models(self.runtime.info(), info, self.cloud.base_url)
            self.cloud_adaptive = info.get("adaptive") or {
                "threshold": DEFAULT_RULE.threshold,
                "source": "default (the cloud names no threshold: progvlm.adaptive.DEFAULT_RULE)"}
            self._cloud_checked = True

    def _warm_up(self):
        """One blank frame through the device's models: the first call of a runtime pays for
        lazy initialisation, which no later request would."""
        from PIL import Image
        blank = Image.new("RGB", (self.runtime.image_size,) * 2)
        png = io.BytesIO()
        blank.save(png, "PNG")
        load_image(png.getvalue())  # the decoders' first use
        self.runtime.domain_note(blank)
        tokens, grid = self.runtime.vision(self.runtime.preprocess(blank))
        self.runtime.mae_encode(tokens, self.runtime.num_layers)
        self.runtime.language(tokens, "describe the scene .", grid, max_new_tokens=2)

    # ---- the device's stages, timed ------------------------------------------------------
    def _timed(self, stages: dict, factor: float, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        stages[name] = to_ms(time.perf_counter() - t0) * factor
        return out

    def _step(self, memo: dict, stages: dict, factor: float, name: str, fn, *args):
        """`_timed`, done once per `memo`: a repeat reuses the result and its measured time."""
        if name not in memo:
            t0 = time.perf_counter()
            memo[name] = (fn(*args), to_ms(time.perf_counter() - t0))
        out, ms = memo[name]
        stages[name] = ms * factor
        return out

    def _jpeg(self, image, frame: str, quality: int) -> tuple[bytes, tuple[int, int]]:
        """Full-cloud's payload and the size it was encoded at: the camera frame (downscaled
        where a side is over JPEG's limit, images.fit_jpeg) or the model's input size."""
        image = resize_for_model(image, self.runtime.image_size) if frame == "model" else fit_jpeg(image)
        return encode_jpeg(image, quality), image.size

    # ---- one request -----------------------------------------------------------------------
    def ask(self, image, question: str, mode: str = "progressive", k: int | None = None,
            bandwidth_mbps: float = 1.0, rtt_ms: float = 20.0, budget_ms: float | None = None,
            cut_after_layer: int | None = None, on_refinement=None,
            device_profile: str | None = None, client: str = "local", **options) -> dict:
        """Check the request, then run it (see `check` and `run`)."""
        return self.run(self.check(image, question, mode, k, bandwidth_mbps, rtt_ms, budget_ms,
                                   cut_after_layer, device_profile, client, **options), on_refinement)

    def check(self, image, question: str, mode: str = "progressive", k: int | None = None,
              bandwidth_mbps: float = 1.0, rtt_ms: float = 20.0, budget_ms: float | None = None,
              cut_after_layer: int | None = None, device_profile: str | None = None,
              client: str = "local", frame: str = "camera", jpeg_quality: int = JPEG_QUALITY,
              link_emulation: bool = True, image_format: str = "file", width: int | None = None,
              height: int | None = None, conversation: bool = False, new_conversation: bool = False,
              adaptive_threshold: float | None = None) -> CheckedAsk:
        """Everything about a request that can be checked before its work: the fields and their
        ranges (AskError), the image (ImageInputError), the cloud's models (PairingError, or
        CloudError when it is down). `device_profile` (host, imx95-emulated) overrides the
        agent's own for this request; both run on one thread, so only the scaling and the labels
        change. `client` names who asks: auto learns its estimates per client. `frame` and
        `jpeg_quality`: full-cloud's JPEG. `link_emulation=False`: a real shaped network lies
        between this agent and the cloud (progvlm.net.kernel_link), so the agent paces and sleeps
        nothing; bandwidth and RTT then describe that network. `image_format`: "file" (PNG,
        JPEG, …: decoding it is the host's work, stage `file_decode`, never projected) or
        "rgb24" (a raw camera frame of `width` × `height`, as a camera delivers it: the device's
        stages start from its pixels). `conversation`: keep the frame at the cloud for
        follow-up questions, and resume it if the cloud holds it (progressive, auto, adaptive).
        `adaptive_threshold` (0..1): adaptive's confidence to stop at, instead of the cloud's."""
        t_arrived, deadline = time.perf_counter(), time.monotonic() + self.request_timeout_s
        L = self.runtime.num_layers
        try:
            profile = get_profile(device_profile) if device_profile else self.profile
        except ValueError as e:
            raise AskError(str(e)) from None
        if mode not in MODES:
            raise AskError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        try:  # what the cloud will read (the protocol's limits), then what the model reads
            check_question(question)
            self.runtime.check_question(question)
        except ValueError as e:
            raise AskError(str(e)) from None
        try:  # every mode: full-edge sends nothing, but a caller's values are checked alike
            link = LinkProfile.checked(bandwidth_mbps, rtt_ms, emulated=bool(link_emulation))
        except ValueError as e:
            raise AskError(str(e)) from None
        if frame not in FRAMES:
            raise AskError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")
        if not isinstance(jpeg_quality, int) or isinstance(jpeg_quality, bool) or not 1 <= jpeg_quality <= 95:
            raise AskError(f"jpeg_quality must be an integer in 1..95, got {jpeg_quality!r}")
        if mode != "full-edge":
            self._check_link_time(link, 0)  # the round trip alone
        k = L if k is None else k
        if mode == "progressive" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= L):
            raise AskError(f"k must be an integer in 1..{L}, got {k!r}")
        budget_ms = DEFAULT_BUDGET_MS if budget_ms is None else budget_ms
        _check_budget(budget_ms)  # every mode: only auto and adaptive use it, but a value is a value
        if not isinstance(conversation, bool):
            raise AskError(f"conversation must be true or false, got {conversation!r}")
        if new_conversation and not conversation:
            raise AskError("new_conversation starts a conversation: it needs conversation=true")
        if conversation and mode not in CONVERSATION_MODES:
            raise AskError(f"conversation applies to {', '.join(CONVERSATION_MODES)}; mode {mode} "
                           "sends its frame whole every time")
        if adaptive_threshold is not None and not (
                isinstance(adaptive_threshold, (int, float)) and not isinstance(adaptive_threshold, bool)
                and 0 <= adaptive_threshold <= 1):
            raise AskError(f"adaptive_threshold must be a number in 0..1, got {adaptive_threshold!r}")
        if cut_after_layer is not None:
            if conversation or mode not in ("progressive", "auto"):
                raise AskError("cut_after_layer applies to progressive and auto only, without "
                               "conversation")
            top = k if mode == "progressive" else L  # auto chooses its k later
            if not 0 <= cut_after_layer <= top:
                raise AskError(f"cut_after_layer must be in 0..{top}, got {cut_after_layer}")
        if mode != "full-edge" and self.cloud is None:
            raise AskError(f"mode {mode} needs a cloud backend; this agent has none configured")
        if image_format not in ("file", "rgb24"):
            raise AskError(f"image_format must be file or rgb24, got {image_format!r}")
        if not self._decoding.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise BusyError(f"{DECODE_SLOTS} other uploads were being decoded for this request's "
                            f"whole deadline of {self.request_timeout_s:g} s")
        try:
            t0 = time.perf_counter()
            decoded = load_image(image) if image_format == "file" else raw_frame(image, width, height)
            decode_ms = to_ms(time.perf_counter() - t0)
        finally:
            self._decoding.release()
        if mode != "full-edge":
            self._check_cloud()
        return CheckedAsk(decoded, decode_ms, image_format == "file", question, mode, k, link, budget_ms, cut_after_layer,
                          frame, jpeg_quality, profile, client, deadline, t_arrived, conversation,
                          new_conversation, adaptive_threshold)

    def run(self, ask: CheckedAsk, on_refinement=None, shared: dict | None = None) -> dict:
        """One checked request → its record. Raises BusyError when the device stays taken until
        the deadline, DeadlineError when what is left of it cannot hold the link time.
        `shared`: the device's work on this frame, kept across the modes of one comparison
        (`compare`), so the frame is preprocessed, seen and encoded once; each record then
        carries those stages' measured times and says they were shared."""
        L = self.runtime.num_layers
        mode, question, link, profile, k = ask.mode, ask.question, ask.link, ask.profile, ask.k
        stages: dict[str, float] = {}
        record = {"mode": mode, "question": question, "runtime": self.runtime.name,
                  "vlm_id": self.runtime.model_id,
                  "device_profile": profile.name, "timing_source": profile.source,
                  "link": {"bandwidth_mbps": link.bandwidth_mbps, "rtt_ms": link.rtt_ms,
                           "emulated": link.emulated}}
        memo = {} if shared is None else shared
        t_wait = time.perf_counter()
        if not self._device.acquire(timeout=max(ask.remaining_s(), 0.0)):
            raise BusyError(f"the device was busy with other requests for this request's whole "
                            f"deadline of {self.request_timeout_s:g} s")
        waited_ms = to_ms(time.perf_counter() - t_wait)
        if waited_ms >= 0.05:  # another request had the device (one camera, one frame at a time)
            stages["device_queue"] = waited_ms
        try:
            factor = profile.compute_factor
            step = lambda name, fn, *args: self._step(memo, stages, factor, name, fn, *args)
            image = ask.image
            if ask.from_file:  # a container to decode: the host's work, not the device's compute
                stages["file_decode"] = ask.decode_ms
                stages["edge_preprocess"] = 0.0
            else:
                stages["edge_preprocess"] = ask.decode_ms * factor
            # is this frame like what the model knows? (the bundled model: generated scenes)
            note = step("edge_domain_check", self.runtime.domain_note, image)
            stages["edge_preprocess"] += stages.pop("edge_domain_check")
            if mode == "full-cloud":
                payload, jpeg_size = self._timed(stages, factor, "serialize", self._jpeg, image,
                                                 ask.frame, ask.jpeg_quality)
            else:
                frame_key = remembered = None
                if ask.conversation:  # a follow-up about these pixels reuses the stream made for them
                    frame_key = self._timed(stages, factor, "frame_hash", self._pixels_key, image)
                    if ask.new_conversation:  # whatever the cloud holds of it, start over
                        self.frames.forget("cloud", frame_key)
                    remembered = self.frames.get("cloud", frame_key)
                if remembered is not None:
                    stream = parse(remembered.data)
                    layers, num_tokens, grid = stream.layers, stream.num_tokens, stream.grid
                else:
                    pixels = step("edge_preprocess_model", self.runtime.preprocess, image)
                    stages["edge_preprocess"] += stages.pop("edge_preprocess_model")
                    tokens, grid = step("edge_vision", self.runtime.vision, pixels)
                    num_tokens = tokens.shape[0]
                if mode == "full-edge":
                    answer = step(f"edge_language {question}", self.runtime.language, tokens, question, grid)
                    stages["edge_language"] = stages.pop(f"edge_language {question}")
                elif remembered is None:
                    # auto needs every layer's size to choose, adaptive and a conversation may
                    # send any layer; a comparison encodes once for all
                    k_coded = L if mode in ("auto", "adaptive") or ask.conversation or shared is not None else k
                    layers = step(f"mae_encode {k_coded}", self.runtime.mae_encode, tokens, k_coded)
                    stages["mae_encode"] = stages.pop(f"mae_encode {k_coded}")
        finally:
            self._device.release()
        if shared is not None and mode != "full-cloud":
            record["note_shared"] = ("edge stages measured once for this frame and shared by the "
                                     "modes of one comparison")
        projected = [name for name in stages if name not in HOST_STAGES] if profile.projected else []
        if note:
            record["domain_note"] = note

        if mode == "full-edge":
            record.update(answer=answer, payload_bytes=0)
        elif mode == "full-cloud":
            (w, h), (cw, ch) = jpeg_size, image.size
            what = "the model input size" if ask.frame == "model" else "the camera frame" + (
                f" of {cw}×{ch} downscaled to fit JPEG's {JPEG_MAX_SIDE:,} px sides"
                if (w, h) != (cw, ch) else "")
            record["payload"] = f"JPEG q{ask.jpeg_quality} at {w}×{h} ({what})"
            self._check_link_time(link, len(payload), ask)
            ex = self.cloud.full(payload, question, link)
            record.update(answer=ex.reply["answer"], payload_bytes=len(payload))
            self._add_link_and_cloud(stages, ex)
        else:
            watched = on_refinement is not None
            if mode == "auto":
                k, record["auto"] = self._choose_k(stages, layers, num_tokens, grid, link,
                                                   ask.budget_ms, self.estimates.estimate(ask.client, link, watched))
        if mode in ("progressive", "auto", "adaptive") and (mode == "adaptive" or ask.conversation):
            self._run_steered(ask, record, stages, layers, num_tokens, grid, k, frame_key,
                              remembered, on_refinement)
        elif mode in ("progressive", "auto"):
            data = self.runtime.frame_bytes(layers[:k], num_tokens, grid)
            sent = parse(data)
            # a cut at or after the last layer sent cuts nothing: the whole frame goes
            cut = ask.cut_after_layer if ask.cut_after_layer is not None and ask.cut_after_layer < k else None
            self._check_link_time(link, len(data), ask)
            # a caller that watches the refinements gets one per layer; otherwise the cloud
            # answers once, when the layers are in (the final answer comes sooner)
            ex = self.cloud.progressive(data, question, link, cut, on_refinement, refine=watched)
            self._add_link_and_cloud(stages, ex)
            reply = ex.reply
            record.update(answer=reply["answer"], k=k, layers_used=reply["layers"],
                          partial=reply["partial"], payload_bytes=len(data),
                          layer_bytes=[b - a for a, b in zip([sent.header_bytes] + sent.layer_ends(),
                                                             sent.layer_ends())],
                          header_bytes=sent.header_bytes,
                          refinements=[{"layers": r["layers"], "answer": r["answer"],
                                        "edge_t_ms": r["edge_t_ms"]} for r in ex.refinements])
            if cut is not None:
                record["link_cut_after_layer"] = cut
                record["note"] = (f"the link was cut after layer {cut}: the answer is from layers "
                                  f"1..{reply['layers']} of {k}")
            else:
                if ask.cut_after_layer is not None:
                    record["note"] = (f"a cut was asked after layer {ask.cut_after_layer}, at or "
                                      f"after the last layer sent ({k}): nothing was cut, the "
                                      f"answer is the full one from layers 1..{reply['layers']}")
                # only clean answers teach auto: a cut one's overhead holds its wait for the
                # layers that never came
                self.estimates.add(ask.client, link, watched,
                                   sum(v for n, v in stages.items() if n.startswith("cloud_")),
                                   stages["overhead"])
        wall_ms = to_ms(time.perf_counter() - ask.t_arrived)
        # the rest of the wall time is the agent's own: the request's checks, thread hand-offs,
        # assembling the record; so the stages, as measured here, add up to the wall time
        measured = sum(v / (profile.compute_factor if name in projected else 1.0)
                       for name, v in stages.items())
        if wall_ms - measured >= 0.001:
            stages["agent"] = wall_ms - measured
        record["stage_ms"] = {name: round(v, 3) for name, v in stages.items()}
        record["projected_stages"] = projected
        record["total_ms"] = round(sum(stages.values()), 3)
        record["wall_ms"] = wall_ms
        if mode in ("auto", "adaptive"):
            record[mode]["actual_ms"] = record["total_ms"]
        return record

    def _pixels_key(self, image) -> str:
        """Which frame this is, for a conversation: its pixels' hash, under this device's models
        (another VLM or MAE makes another stream of the same pixels)."""
        info = self.runtime.info()
        h = hashlib.sha256(f"{info.get('vlm_id')}/{info.get('mae_fingerprint')}/{image.mode}/"
                           f"{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()

    def _run_steered(self, ask: CheckedAsk, record: dict, stages: dict, layers: list[bytes],
                     num_tokens: int, grid, k: int, frame_key: str | None,
                     remembered: CachedFrame | None, on_refinement):
        """adaptive, or any progressive request in a conversation: CloudLink.steered with every
        layer in the stream's header, so that the cloud's copy is a prefix of any later turn's."""
        link, adaptive = ask.link, ask.mode == "adaptive"
        data = remembered.data if remembered else self.runtime.frame_bytes(layers, num_tokens, grid)
        sent = parse(data)
        ends = sent.layer_ends()
        layer_bytes = [b - a for a, b in zip([sent.header_bytes] + ends, ends)]
        frame_id = hashlib.sha256(data).hexdigest()[:32] if ask.conversation else None
        held = remembered.layers if remembered else 0
        steps: list[dict] = []
        more = threshold = source = None
        if adaptive:
            threshold, source = ((ask.adaptive_threshold, "this request")
                                 if ask.adaptive_threshold is not None else
                                 (self.cloud_adaptive["threshold"], self.cloud_adaptive["source"]))
            edge_ms = sum(stages.values())

            def more(answer: dict, elapsed_ms: float) -> bool:
                step, stop = self._adaptive_stop(answer, edge_ms + elapsed_ms, threshold,
                                                 layer_bytes, link, ask.budget_ms)
                steps.append(step)
                return stop is None
        self._check_link_time(link, len(data), ask)
        ex = self.cloud.steered(data, ask.question, link, 1 if adaptive else min(k, sent.k), more,
                                frame_id, resume=held > 0, on_refinement=on_refinement)
        self._add_link_and_cloud(stages, ex)
        reply = ex.reply
        used = reply["layers"]
        record.update(answer=reply["answer"], k=used if adaptive else k, layers_used=used,
                      partial=False, payload_bytes=ex.bytes_sent, confidence=reply["confidence"],
                      confidences=[{"layers": r["layers"], "confidence": r.get("confidence")}
                                   for r in ex.refinements],
                      layer_bytes=layer_bytes[:used], header_bytes=sent.header_bytes,
                      refinements=[{"layers": r["layers"], "answer": r["answer"],
                                    "confidence": r.get("confidence"), "edge_t_ms": r["edge_t_ms"]}
                                   for r in ex.refinements])
        if ask.conversation:
            # the cloud now holds the layers its answer used (it keeps every complete layer)
            self.frames.put("cloud", frame_key, CachedFrame("progressive", data, layers=used))
            record.update(conversation=True, frame_id=frame_id, resumed=bool(ex.resumed),
                          layers_held_before=ex.layers_held, bytes_sent_this_turn=ex.bytes_sent,
                          edge_stream_reused=remembered is not None)
            if held and not ex.resumed:
                record["note"] = ("the cloud no longer held this frame (expired, evicted or "
                                  "restarted): it was sent again from its start")
        if adaptive:
            last_step = steps[-1] if steps and steps[-1]["layers"] == used else None
            conf = reply["confidence"]
            stopped = (last_step["decision"] if last_step else
                       "sure" if conf is not None and conf >= threshold else "all layers")
            sends = [s for s in steps if s["decision"] == "send"]
            record["adaptive"] = {
                "threshold": threshold, "source": source, "budget_ms": ask.budget_ms,
                "stopped_because": stopped, "layers_sent": used, "steps": steps,
                "predicted_ms": sends[-1]["predicted_next_ms"] if sends else None,
                "rule": "after each answer: stop if confidence ≥ threshold; else send the next "
                        "layer if elapsed + RTT + its bytes and a reply at the bandwidth + the "
                        "last answer's cloud time fit the budget"}
            if stopped == "budget":
                record["adaptive"]["best_so_far"] = True
                record["note"] = (f"the latency budget of {ask.budget_ms:g} ms ran out after layer "
                                  f"{used}: the best answer so far (confidence {conf} < {threshold})")

    @staticmethod
    def _adaptive_stop(answer: dict, elapsed_ms: float, threshold: float, layer_bytes: list[int],
                       link: LinkProfile, budget_ms: float) -> tuple[dict, str | None]:
        """After the answer to layer j: the step as the record shows it, and why to stop
        ("sure", "budget") or None to send layer j + 1. A backend that cannot tell its
        confidence (None) is never sure: its layers go while the budget fits."""
        j, conf = answer["layers"], answer.get("confidence")
        step = {"layers": j, "confidence": conf, "elapsed_ms": round(elapsed_ms, 3)}
        if conf is not None and conf >= threshold:
            return step | {"decision": "sure"}, "sure"
        predicted = (elapsed_ms + link.rtt_ms + sum(answer["stage_ms"].values())
                     + 1e3 * link.serialisation_s(layer_bytes[j] + REPLY_BYTES_ESTIMATE))
        step["predicted_next_ms"] = round(predicted, 3)
        if predicted > budget_ms:
            return step | {"decision": "budget"}, "budget"
        return step | {"decision": "send"}, None

    # ---- one frame, every mode ----------------------------------------------------------
    def check_compare(self, image, question: str, modes, k: int | None = None,
                      budget_ms: float | None = None, **fields) -> tuple[CheckedAsk, list[str]]:
        """`check` for a comparison: the modes (a non-empty subset of MODES), k, the budget and
        every field of `check`; the deadline covers every mode's run."""
        if isinstance(modes, str):
            modes = [m.strip() for m in modes.split(",") if m.strip()]
        modes = list(dict.fromkeys(modes))
        unknown = [m for m in modes if m not in MODES]
        if not modes or unknown:
            raise AskError(f"modes must be a non-empty list of {', '.join(MODES)}"
                           + (f"; unknown: {', '.join(map(repr, unknown))}" if unknown else ""))
        cloud_mode = next((m for m in modes if m != "full-edge"), None)
        checked = self.check(image, question, "progressive" if cloud_mode else "full-edge", k,
                             budget_ms=budget_ms, **fields)
        runs = len(modes) + 2  # the modes, the reference answer and the ladder's stream
        deadline = time.monotonic() + runs * self.request_timeout_s
        return dataclasses.replace(checked, deadline=deadline,
                                   budget_ms=DEFAULT_BUDGET_MS if budget_ms is None else budget_ms), modes

    def compare(self, checked: CheckedAsk, modes: list[str], on_event=lambda event: None) -> dict:
        """Every mode for one frame and question, the device's work on the frame done once
        (`run(shared=…)`). Events, in order, through `on_event`:
            {"type": "reference", "answer"}  the answer from uncompressed visual tokens (full-edge)
            {"type": "refinement", "mode", "layers", "answer", "edge_t_ms"}  as layers are answered
            {"type": "result", "mode", "record"}  per mode
            {"type": "ladder", "rows": [{"k", "payload_bytes", "answer", "edge_t_ms"}]}  k = 1..L,
                from one progressive stream of every layer, answered after each
        Returns {"reference", "records", "ladder"}."""
        L = self.runtime.num_layers
        shared: dict = {}
        out = {"records": {}}
        as_mode = lambda mode, **kw: dataclasses.replace(checked, mode=mode, t_arrived=time.perf_counter(), **kw)
        reference = self.run(as_mode("full-edge"), shared=shared)
        out["reference"] = reference["answer"]
        on_event({"type": "reference", "answer": reference["answer"]})
        ladder_record = None
        for mode in modes:
            if mode == "full-edge":
                record = reference  # the same answer, the same stages
            else:
                watch = lambda msg, mode=mode: on_event({"type": "refinement", "mode": mode,
                                                         "layers": msg["layers"], "answer": msg["answer"],
                                                         "edge_t_ms": msg["edge_t_ms"]})
                record = self.run(as_mode(mode), on_refinement=watch if mode != "full-cloud" else None,
                                  shared=shared)
                if mode == "progressive" and checked.k == L:
                    ladder_record = record
            out["records"][mode] = record
            on_event({"type": "result", "mode": mode, "record": record})
        if self.cloud is not None and any(m != "full-edge" for m in modes):
            if ladder_record is None:  # one stream of every layer, each answered as it arrives
                ladder_record = self.run(as_mode("progressive", k=L), on_refinement=lambda msg: None,
                                         shared=shared)
            # what a request for k layers sends (its own header: a k = L stream's prefix differs)
            (tokens, grid), _ = shared["edge_vision"]
            layers, _ = shared[f"mae_encode {L}"]
            sizes = [len(self.runtime.frame_bytes(layers[:j], tokens.shape[0], grid)) for j in range(1, L + 1)]
            out["ladder"] = [{"k": r["layers"], "payload_bytes": sizes[r["layers"] - 1],
                              "answer": r["answer"], "edge_t_ms": r["edge_t_ms"]}
                             for r in ladder_record["refinements"]]
            on_event({"type": "ladder", "rows": out["ladder"]})
        return out

    def _check_link_time(self, link: LinkProfile, payload_bytes: int, ask: CheckedAsk | None = None):
        """Refuse a request that would spend longer than max_link_s on the link, or (once
        `ask` is under way) longer than what is left of its deadline."""
        t = link.link_time_s(payload_bytes + REPLY_BYTES_ESTIMATE)
        if t > self.max_link_s:  # first: over the limit is a 422 however long the deadline
            what = (f"the {payload_bytes:,}-byte payload and its reply" if payload_bytes
                    else "the round trip and the reply alone")
            raise AskError(f"at {link.bandwidth_mbps:g} Mbps with an RTT of {link.rtt_ms:g} ms, "
                           f"{what} would take {t:.1f} s on the link, over this agent's limit of "
                           f"{self.max_link_s:g} s per request: raise the bandwidth, lower the "
                           "RTT or send fewer layers")
        if ask is not None and t > ask.remaining_s():
            raise DeadlineError(f"{t:.1f} s on the link would pass this request's deadline of "
                                f"{self.request_timeout_s:g} s ({max(ask.remaining_s(), 0):.1f} s left)")

    def _add_link_and_cloud(self, stages: dict, ex):
        cloud = {f"cloud_{name.removesuffix('_ms')}": v for name, v in ex.reply["stage_ms"].items()}
        if ex.cloud_waited_ms is not None:  # steered: the earlier answers the edge waited for
            if ex.cloud_waited_ms > 0:
                cloud["cloud_earlier_layers"] = ex.cloud_waited_ms
        elif len(ex.refinements) > 1:  # the cloud answered earlier layers first, in the same stream
            cloud["cloud_earlier_layers"] = round(sum(sum(r["stage_ms"].values())
                                                      for r in ex.refinements[:-1]), 3)
        # connect (0 on a kept-open session), uplink, downlink, overhead: with the cloud's own
        # stages they sum to the exchange's measured wall time
        link = ex.link_stages_ms(sum(cloud.values()))
        stages.update(connect=link["connect"], uplink=link["uplink"], **cloud,
                      downlink=link["downlink"], overhead=link["overhead"])

    def _choose_k(self, stages: dict, layers: list[bytes], num_tokens: int, grid,
                  link: LinkProfile, budget_ms: float, estimates: dict):
        """The largest k whose predicted end-to-end time fits the budget (k = 1 if none does):
        the edge's measured time, the link's time for k layers and a reply, and the client's
        estimates of the cloud and the overhead (`LinkEstimates`; the record shows them)."""
        edge_ms = sum(stages.values())
        unmeasured_ms = estimates["cloud_ms"]["ms"] + estimates["overhead_ms"]["ms"]
        predicted = {}
        for k in range(1, len(layers) + 1):
            nbytes = len(self.runtime.frame_bytes(layers[:k], num_tokens, grid))
            predicted[k] = round(edge_ms + link.rtt_ms + 1e3 * link.serialisation_s(nbytes + REPLY_BYTES_ESTIMATE)
                                 + unmeasured_ms, 3)
        fits = [k for k, t in predicted.items() if t <= budget_ms]
        k = max(fits) if fits else 1
        return k, {"budget_ms": budget_ms, "predicted_ms": predicted, "chosen_k": k,
                   "predicted_chosen_ms": predicted[k], "fits_budget": bool(fits),
                   "edge_ms": round(edge_ms, 3), "estimates": estimates}


__all__ = ["EdgeAgent", "AskError", "BusyError", "CheckedAsk", "CloudError", "DeadlineError",
           "LinkEstimates", "PairingError", "MODES"]
