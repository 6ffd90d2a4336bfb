"""The edge agent: one question about one image, in the mode asked, as one timed record.

    full-cloud   frame → JPEG (at the model's input size) → link → cloud runs the whole VLM
    full-edge    the whole VLM on the device; nothing crosses the link
    progressive  vision half → MAE layers 1..k → link (layer by layer) → cloud answers
    auto         progressive with the largest k whose predicted end-to-end time fits the budget

The record's stage times (ms) add up to its total: edge stages measured here (scaled, and
listed in `projected_stages`, under a projected device profile), link stages measured through
the shaped link, cloud stages measured by the cloud.
"""
from __future__ import annotations

import io
import math
import threading
import time

from progvlm.bitstream import parse
from progvlm.images import load_image, resize_for_model
from progvlm.link import LinkProfile
from progvlm.transport import CloudError, CloudLink, to_ms

from .profiles import DeviceProfile, get_profile
from .runtime import EdgeRuntime

MODES = ("full-cloud", "full-edge", "progressive", "auto")
JPEG_QUALITY = 90
DEFAULT_BUDGET_MS = 500.0
REPLY_BYTES_ESTIMATE = 250  # a JSON answer on the downlink, for auto's prediction
# The most time one request may spend on the shaped link (round trip + payload + reply at the
# asked bandwidth); a request that would take longer is refused before anything is sent. The
# link's own ranges (progvlm.link: 0.01–10000 Mbps, RTT 0–10000 ms) are checked first.
MAX_LINK_S = 120.0


class AskError(ValueError):
    """A request the agent cannot serve as asked; str(e) says why."""


class PairingError(RuntimeError):
    """The cloud runs another VLM or MAE than this device: their answers cannot be compared."""


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
                 max_link_s: float = MAX_LINK_S):
        self.runtime = runtime
        self.max_link_s = max_link_s
        self.profile = profile or get_profile("host")
        self.cloud = CloudLink(cloud_url, token, timeout_s) if cloud_url else None
        self._cloud_checked = False
        if self.cloud is not None:  # at start: the two halves must be one model
            try:
                self._check_cloud()
            except CloudError:
                pass  # down for now: full-edge still answers; checked again before cloud use
        self._device = threading.Lock()  # one camera, one frame at a time
        # auto's model of what it cannot measure before sending: the cloud's compute and the
        # protocol overhead, learned from the answers so far (priors until the first one)
        self.cloud_ms_estimate = 30.0
        self.overhead_ms_estimate = 5.0
        if self.profile.threads:
            runtime.set_threads(self.profile.threads)
        self._warm_up()

    def _check_cloud(self):
        """Raise PairingError if the cloud runs another VLM or MAE (CloudError if it is down)."""
        if not self._cloud_checked:
            check_same_models(self.runtime.info(), self.cloud.info(), self.cloud.base_url)
            self._cloud_checked = True

    def _warm_up(self):
        """One blank frame through the device's models: the first call of a runtime pays for
        lazy initialisation, which no later request would."""
        from PIL import Image
        blank = Image.new("RGB", (self.runtime.image_size,) * 2)
        tokens, grid = self.runtime.vision(self.runtime.preprocess(blank))
        self.runtime.mae_encode(tokens, self.runtime.num_layers)
        self.runtime.language(tokens, "describe the scene .", grid, max_new_tokens=2)

    # ---- the device's stages, timed ------------------------------------------------------
    def _timed(self, stages: dict, factor: float, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        stages[name] = to_ms(time.perf_counter() - t0) * factor
        return out

    def _jpeg(self, image) -> bytes:
        buf = io.BytesIO()
        resize_for_model(image, self.runtime.image_size).save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    # ---- one request -----------------------------------------------------------------------
    def ask(self, image, question: str, mode: str = "progressive", k: int | None = None,
            bandwidth_mbps: float = 1.0, rtt_ms: float = 20.0, budget_ms: float | None = None,
            cut_after_layer: int | None = None, on_refinement=None,
            device_profile: str | None = None) -> dict:
        """`device_profile` (host, imx95-emulated) overrides the agent's own for this request;
        both run on one thread, so only the scaling and the labels change."""
        L = self.runtime.num_layers
        try:
            profile = get_profile(device_profile) if device_profile else self.profile
        except ValueError as e:
            raise AskError(str(e)) from None
        if mode not in MODES:
            raise AskError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(question, str) or not question.strip():
            raise AskError("a question is required")
        try:
            self.runtime.check_question(question)  # e.g. longer than the model reads
        except ValueError as e:
            raise AskError(str(e)) from None
        try:  # every mode: full-edge sends nothing, but a caller's values are checked alike
            link = LinkProfile.checked(bandwidth_mbps, rtt_ms)
        except ValueError as e:
            raise AskError(str(e)) from None
        if mode != "full-edge":
            self._check_link_time(link, 0)  # the round trip alone
        k = L if k is None else k
        if mode == "progressive" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= L):
            raise AskError(f"k must be an integer in 1..{L}, got {k!r}")
        budget_ms = DEFAULT_BUDGET_MS if budget_ms is None else budget_ms
        if mode == "auto" and not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms)
                                   and budget_ms > 0):
            raise AskError(f"the latency budget must be a positive number of ms, got {budget_ms!r}")
        if cut_after_layer is not None and mode not in ("progressive", "auto"):
            raise AskError("cut_after_layer applies to progressive and auto only")
        if mode != "full-edge" and self.cloud is None:
            raise AskError(f"mode {mode} needs a cloud backend; this agent has none configured")
        if mode != "full-edge":
            self._check_cloud()

        t_start = time.perf_counter()
        stages: dict[str, float] = {}
        record = {"mode": mode, "question": question, "runtime": self.runtime.name,
                  "vlm_id": self.runtime.model_id,
                  "device_profile": profile.name, "timing_source": profile.source,
                  "link": {"bandwidth_mbps": bandwidth_mbps, "rtt_ms": rtt_ms}}
        with self._device:
            factor = profile.compute_factor
            image = self._timed(stages, factor, "edge_preprocess", load_image, image)
            # is this frame like what the model knows? (the bundled model: generated scenes)
            note = self._timed(stages, factor, "edge_domain_check", self.runtime.domain_note, image)
            stages["edge_preprocess"] += stages.pop("edge_domain_check")
            if mode == "full-cloud":
                payload = self._timed(stages, factor, "serialize", self._jpeg, image)
            else:
                pixels = self._timed(stages, factor, "edge_preprocess_model", self.runtime.preprocess, image)
                stages["edge_preprocess"] += stages.pop("edge_preprocess_model")
                tokens, grid = self._timed(stages, factor, "edge_vision", self.runtime.vision, pixels)
                if mode == "full-edge":
                    answer = self._timed(stages, factor, "edge_language", self.runtime.language,
                                         tokens, question, grid)
                else:
                    k_coded = L if mode == "auto" else k  # auto needs every layer's size to choose
                    layers = self._timed(stages, factor, "mae_encode", self.runtime.mae_encode,
                                         tokens, k_coded)
        projected = list(stages) if profile.projected else []
        if note:
            record["domain_note"] = note

        if mode == "full-edge":
            record.update(answer=answer, payload_bytes=0)
        elif mode == "full-cloud":
            record["payload"] = f"JPEG q{JPEG_QUALITY} at {self.runtime.image_size}×{self.runtime.image_size} (the model's input size)"
            self._check_link_time(link, len(payload))
            ex = self.cloud.full(payload, question, link)
            record.update(answer=ex.reply["answer"], payload_bytes=len(payload))
            self._add_link_and_cloud(stages, ex)
        else:
            num_tokens = tokens.shape[0]
            if mode == "auto":
                k, record["auto"] = self._choose_k(stages, layers, num_tokens, grid, link, budget_ms)
            data = self.runtime.frame_bytes(layers[:k], num_tokens, grid)
            sent = parse(data)
            if cut_after_layer is not None and not 0 <= cut_after_layer <= k:
                raise AskError(f"cut_after_layer must be in 0..{k}, got {cut_after_layer}")
            self._check_link_time(link, len(data))
            # a caller that watches the refinements gets one per layer; otherwise the cloud
            # answers once, when the layers are in (the final answer comes sooner)
            ex = self.cloud.progressive(data, question, link, cut_after_layer, on_refinement,
                                        refine=on_refinement is not None)
            self._add_link_and_cloud(stages, ex)
            reply = ex.reply
            record.update(answer=reply["answer"], k=k, layers_used=reply["layers"],
                          partial=reply["partial"], payload_bytes=len(data),
                          layer_bytes=[b - a for a, b in zip([sent.header_bytes] + sent.layer_ends(),
                                                             sent.layer_ends())],
                          header_bytes=sent.header_bytes,
                          refinements=[{"layers": r["layers"], "answer": r["answer"],
                                        "edge_t_ms": r["edge_t_ms"]} for r in ex.refinements])
            if cut_after_layer is not None:
                record["link_cut_after_layer"] = cut_after_layer
                record["note"] = (f"the link was cut after layer {cut_after_layer}: the answer is "
                                  f"from layers 1..{reply['layers']} of {k}")
            self.cloud_ms_estimate = sum(v for n, v in stages.items() if n.startswith("cloud_"))
            self.overhead_ms_estimate = stages["overhead"]
        record["stage_ms"] = {name: round(v, 3) for name, v in stages.items()}
        record["projected_stages"] = projected
        record["total_ms"] = round(sum(stages.values()), 3)
        record["wall_ms"] = to_ms(time.perf_counter() - t_start)
        if mode == "auto":
            record["auto"]["actual_ms"] = record["total_ms"]
        return record

    def _check_link_time(self, link: LinkProfile, payload_bytes: int):
        """Refuse a request that would spend longer than max_link_s on the link."""
        t = link.link_time_s(payload_bytes + REPLY_BYTES_ESTIMATE)
        if t > self.max_link_s:
            what = (f"the {payload_bytes:,}-byte payload and its reply" if payload_bytes
                    else "the round trip and the reply alone")
            raise AskError(f"at {link.bandwidth_mbps:g} Mbps with an RTT of {link.rtt_ms:g} ms, "
                           f"{what} would take {t:.1f} s on the link, over this agent's limit of "
                           f"{self.max_link_s:g} s per request: raise the bandwidth, lower the "
                           "RTT or send fewer layers")

    def _add_link_and_cloud(self, stages: dict, ex):
        cloud = {f"cloud_{name.removesuffix('_ms')}": v for name, v in ex.reply["stage_ms"].items()}
        if len(ex.refinements) > 1:  # the cloud answered earlier layers first, in the same stream
            cloud["cloud_earlier_layers"] = round(sum(sum(r["stage_ms"].values())
                                                      for r in ex.refinements[:-1]), 3)
        stages["uplink"] = ex.uplink_ms
        stages.update(cloud)
        stages["downlink"] = ex.downlink_ms
        stages["overhead"] = round(ex.overhead_ms(sum(cloud.values())), 3)

    def _choose_k(self, stages: dict, layers: list[bytes], num_tokens: int, grid,
                  link: LinkProfile, budget_ms: float):
        """The largest k whose predicted end-to-end time fits the budget (k = 1 if none does)."""
        edge_ms = sum(stages.values())
        predicted = {}
        for k in range(1, len(layers) + 1):
            nbytes = len(self.runtime.frame_bytes(layers[:k], num_tokens, grid))
            predicted[k] = round(edge_ms + link.rtt_ms + 1e3 * link.serialisation_s(nbytes + REPLY_BYTES_ESTIMATE)
                                 + self.cloud_ms_estimate + self.overhead_ms_estimate, 3)
        fits = [k for k, t in predicted.items() if t <= budget_ms]
        k = max(fits) if fits else 1
        return k, {"budget_ms": budget_ms, "predicted_ms": predicted, "chosen_k": k,
                   "predicted_chosen_ms": predicted[k], "fits_budget": bool(fits)}


__all__ = ["EdgeAgent", "AskError", "CloudError", "PairingError", "MODES"]
