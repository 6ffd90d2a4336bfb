"""The edge agent: one question about one image, in the mode asked, as one timed record.

The request is one declared model (edge_agent/request.py); the modes are classes in a registry
(edge_agent/modes: full-cloud, full-edge, progressive, auto, adaptive, each a module). The
agent keeps what every mode shares: the check of a whole request before any work, the device
lock, the deadline, the timing and the record.

The record's stage times (ms) add up to its total: edge stages measured here (scaled, and
listed in `projected_stages`, under a projected device profile), link stages measured through
the shaped link, cloud stages measured by the cloud.

A request is checked whole (`check`: every field, the image decoded, the cloud's models) before
any work (`run`), so that a caller streaming the answer gets its errors as real statuses. Every
wait in a request is bounded by one deadline set when it arrives (`request_timeout_s`).
"""
from __future__ import annotations

import dataclasses
import io
import threading
import time

from progvlm.adaptive import DEFAULT_RULE
from progvlm.images import load_image, raw_frame
from progvlm.net.link import LinkProfile
from progvlm.net.protocol import COMPUTE_ALLOWANCE_S, MAX_LINK_S, to_ms
from progvlm.net.transport import CloudLink, Transport

from . import conversation
from .errors import AskError, BusyError, CloudError, DeadlineError, PairingError
from .estimates import LinkEstimates
from .modes import LADDER, MODES, REFERENCE, RunContext, frame_sizes
from .modes.full_cloud import frame_jpeg
from .profiles import PROFILES, DeviceProfile, get_profile
from .request import JPEG_QUALITY, AskRequest, CheckedAsk, CompareRequest, parse
from .runtime import EdgeRuntime

DECODE_SLOTS = 2  # uploads decoded at the same time; more wait (each may cost ~300 MB at the cap)
# stages that are no device compute, so a projected device profile never scales them: decoding
# a file (the host's container work), waiting for the device, the agent's own bookkeeping
HOST_STAGES = ("file_decode", "device_queue", "agent")


def check_same_models(edge: dict, cloud: dict, cloud_url: str):
    """Refuse a cloud whose VLM or MAE differs from the edge's, naming both."""
    for key, what in (("vlm_id", "VLM"), ("mae_fingerprint", "MAE")):
        if edge.get(key) != cloud.get(key):
            raise PairingError(f"the cloud at {cloud_url} runs {what} {cloud.get(key)}, this "
                               f"device runs {what} {edge.get(key)}: start both with the same "
                               "--vlm and --mae")


class EdgeAgent:
    def __init__(self, runtime: EdgeRuntime, cloud: str | Transport | None = None,
                 token: str | None = None, profile: DeviceProfile | None = None,
                 timeout_s: float = 10.0, max_link_s: float = MAX_LINK_S,
                 request_timeout_s: float | None = None):
        """`cloud`: the cloud's URL (a CloudLink to it, with `token` and `timeout_s`), any
        progvlm.net.transport.Transport, or None (full-edge only)."""
        self.runtime = runtime
        self.max_link_s = max_link_s
        self.request_timeout_s = max_link_s + COMPUTE_ALLOWANCE_S if request_timeout_s is None else request_timeout_s
        self.profile = profile or get_profile("host")
        self.cloud = CloudLink(cloud, token, timeout_s) if isinstance(cloud, str) else cloud
        self._cloud_checked = False
        if self.cloud is not None:  # at start: the two halves must be one model
            try:
                self._check_cloud()
            except CloudError:
                pass  # down for now: full-edge still answers; checked again before cloud use
        self.device_lock = self._device = threading.Lock()  # one camera, one frame at a time
        # uploads decoded at once: a file of a few KB can decode to the pixel cap's ~120 MB
        # (and more while Pillow works), so concurrent uploads must not multiply it unbounded
        self._decoding = threading.BoundedSemaphore(DECODE_SLOTS)
        # conversations: per frame, the stream made for it and the layers the cloud holds
        self.frames = conversation.new_memory()
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
        if self.runtime.has_language:
            self.runtime.language(tokens, "describe the scene .", grid, max_new_tokens=2)

    def info(self) -> dict:
        """What GET /v1/info says of this agent: its runtime and models, L (num_layers), its
        modes (in the registry's order) and the device profiles a request may ask for."""
        return {"runtime": self.runtime.name, "device_profile": self.profile.name,
                "timing_source": self.profile.source, **self.runtime.info(),
                "modes": list(MODES), "device_profiles": list(PROFILES),
                "cloud_url": self.cloud.base_url if self.cloud else None}

    def _jpeg(self, image, frame: str, quality: int = JPEG_QUALITY) -> tuple[bytes, tuple[int, int]]:
        """Full-cloud's payload for this device (modes/full_cloud.frame_jpeg)."""
        return frame_jpeg(image, frame, quality, self.runtime.image_size)

    # ---- one request -----------------------------------------------------------------------
    def ask(self, image, question: str, mode: str | None = None, *, on_refinement=None,
            client: str = "local", **fields) -> dict:
        """Check the request, then run it (see `check` and `run`)."""
        return self.run(self.check(image, question, mode, client=client, **fields), on_refinement)

    def check(self, image, question: str, mode: str | None = None, *, client: str = "local",
              **fields) -> CheckedAsk:
        """Everything about a request that can be checked before its work: the fields of
        AskRequest (edge_agent/request.py: their defaults, ranges and meaning; `mode` None:
        its default) (AskError), the image (ImageInputError), the cloud's models (PairingError,
        or CloudError when it is down). `client` names who asks: auto learns its estimates
        per client."""
        fields |= {"mode": mode} if mode is not None else {}
        return self.checked(image, parse(AskRequest, question=question, **fields), client)

    def checked(self, image, request: AskRequest, client: str = "local") -> CheckedAsk:
        """`check` for a request whose fields are validated already (the HTTP form's)."""
        return self._checked(image, [request], client)

    def _checked(self, image, asks: list[AskRequest], client: str) -> CheckedAsk:
        """The checks beyond the fields (the model's question limit, each mode's own, the
        cloud), then the image decoded: the CheckedAsk of the first mode that needs the cloud."""
        t_arrived, deadline = time.perf_counter(), time.monotonic() + self.request_timeout_s
        L = self.runtime.num_layers
        try:  # what the model reads (the protocol's limit is the request's own check)
            self.runtime.check_question(asks[0].question)
        except ValueError as e:
            raise AskError(str(e)) from None
        for ask in asks:
            MODES[ask.mode].check(ask, L)
        cloud_asks = [ask for ask in asks if MODES[ask.mode].needs_cloud]
        if cloud_asks:
            if self.cloud is None:
                raise AskError(f"mode {cloud_asks[0].mode} needs a cloud backend; this agent has "
                               "none configured")
            self.check_link_time(asks[0].link, 0)  # the round trip alone
        request = (cloud_asks or asks)[0]
        if not self._decoding.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise BusyError(f"{DECODE_SLOTS} other uploads were being decoded for this request's "
                            f"whole deadline of {self.request_timeout_s:g} s")
        try:
            t0 = time.perf_counter()
            from_file = request.image_format == "file"
            decoded = load_image(image) if from_file else raw_frame(image, request.width, request.height)
            decode_ms = to_ms(time.perf_counter() - t0)
        finally:
            self._decoding.release()
        if cloud_asks:
            self._check_cloud()
        profile = get_profile(request.device_profile) if request.device_profile else self.profile
        return CheckedAsk(request, MODES[request.mode], L if request.k is None else request.k,
                          decoded, decode_ms, from_file, profile, client, deadline, t_arrived)

    def run(self, ask: CheckedAsk, on_refinement=None, shared: dict | None = None) -> dict:
        """One checked request → its record. Raises BusyError when the device stays taken until
        the deadline, DeadlineError when what is left of it cannot hold the link time.
        `shared`: the device's work on this frame, kept across the modes of one comparison
        (`compare`), so the frame is preprocessed, seen and encoded once; each record then
        carries those stages' measured times and says they were shared."""
        mode, link, profile = ask.mode, ask.link, ask.profile
        record = {"mode": mode.name, "question": ask.request.question, "runtime": self.runtime.name,
                  **({"delegate": self.runtime.delegate} if self.runtime.delegate else {}),
                  "vlm_id": self.runtime.model_id,
                  "device_profile": profile.name, "timing_source": profile.source,
                  "link": {"bandwidth_mbps": link.bandwidth_mbps, "rtt_ms": link.rtt_ms,
                           "emulated": link.emulated}}
        context = RunContext(self, ask, record, {}, {} if shared is None else shared,
                             shared is not None, on_refinement)
        stages = context.stages
        t_wait = time.perf_counter()
        if not self._device.acquire(timeout=max(ask.remaining_s(), 0.0)):
            raise BusyError(f"the device was busy with other requests for this request's whole "
                            f"deadline of {self.request_timeout_s:g} s")
        waited_ms = to_ms(time.perf_counter() - t_wait)
        if waited_ms >= 0.05:  # another request had the device (one camera, one frame at a time)
            stages["device_queue"] = waited_ms
        try:
            if ask.from_file:  # a container to decode: the host's work, not the device's compute
                stages["file_decode"] = ask.decode_ms
                stages["edge_preprocess"] = 0.0
            else:
                stages["edge_preprocess"] = ask.decode_ms * profile.compute_factor
            # is this frame like what the model knows? (the bundled model: generated scenes)
            note = context.step("edge_domain_check", self.runtime.domain_note, ask.image,
                                stage="edge_preprocess", add=True)
            context.seen = mode.on_device(context)
        finally:
            self._device.release()
        if shared is not None and "edge_vision" in stages:
            record["note_shared"] = ("edge stages measured once for this frame and shared by the "
                                     "modes of one comparison")
        projected = [name for name in stages if name not in HOST_STAGES] if profile.projected else []
        if note:
            record["domain_note"] = note
        mode.run(context)
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
        if isinstance(record.get(mode.name), dict):  # a mode's own prediction, beside the actual
            record[mode.name]["actual_ms"] = record["total_ms"]
        return record

    # ---- one frame, every mode ----------------------------------------------------------
    def check_compare(self, image, question: str, modes=None, *, client: str = "local",
                      **fields) -> tuple[CheckedAsk, list[str]]:
        """`check` for a comparison: the fields of CompareRequest (`modes`: a non-empty subset
        of MODES, a list or comma-separated); the deadline covers every mode's run."""
        return self.checked_compare(image, parse(CompareRequest, question=question, modes=modes,
                                                 **fields), client)

    def checked_compare(self, image, request: CompareRequest,
                        client: str = "local") -> tuple[CheckedAsk, list[str]]:
        """`check_compare` for a request whose fields are validated already (the HTTP form's)."""
        modes = request.mode_names
        checked = self._checked(image, [request.for_mode(m) for m in modes], client)
        runs = len(modes) + 2  # the modes, the reference answer and the ladder's stream
        return dataclasses.replace(checked, deadline=time.monotonic() + runs * self.request_timeout_s), modes

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

        def as_mode(name, **kw):
            return dataclasses.replace(checked, request=checked.request.model_copy(update={"mode": name}),
                                       mode=MODES[name], t_arrived=time.perf_counter(), **kw)
        reference = self.run(as_mode(REFERENCE.name), shared=shared)
        out["reference"] = reference["answer"]
        on_event({"type": "reference", "answer": reference["answer"]})
        ladder_record = None
        for mode in modes:
            if mode == REFERENCE.name:
                record = reference  # the same answer, the same stages
            else:
                watch = lambda msg, mode=mode: on_event({"type": "refinement", "mode": mode,
                                                         "layers": msg["layers"], "answer": msg["answer"],
                                                         "edge_t_ms": msg["edge_t_ms"]})
                record = self.run(as_mode(mode), on_refinement=watch if MODES[mode].refines else None,
                                  shared=shared)
                if mode == LADDER.name and checked.k == L:
                    ladder_record = record
            out["records"][mode] = record
            on_event({"type": "result", "mode": mode, "record": record})
        if self.cloud is not None and any(MODES[m].needs_cloud for m in modes):
            if ladder_record is None:  # one stream of every layer, each answered as it arrives
                ladder_record = self.run(as_mode(LADDER.name, k=L), on_refinement=lambda msg: None,
                                         shared=shared)
            # what a request for k layers sends (its own header: a k = L stream's prefix differs)
            sizes = frame_sizes(self.runtime, shared, L)
            out["ladder"] = [{"k": r["layers"], "payload_bytes": sizes[r["layers"] - 1],
                              "answer": r["answer"], "edge_t_ms": r["edge_t_ms"]}
                             for r in ladder_record["refinements"]]
            on_event({"type": "ladder", "rows": out["ladder"]})
        return out

    def check_link_time(self, link: LinkProfile, payload_bytes: int, ask: CheckedAsk | None = None):
        """Refuse a request that would spend longer than max_link_s on the link, or (once
        `ask` is under way) longer than what is left of its deadline."""
        t = link.request_time_s(payload_bytes)
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


__all__ = ["EdgeAgent", "AskError", "BusyError", "CheckedAsk", "CloudError", "DeadlineError",
           "HOST_STAGES", "JPEG_QUALITY", "LinkEstimates", "PairingError", "MODES"]
