"""The edge–cloud boundary of one (VLM, MAE) pair: the object every entry point builds on.

    edge:   Split.edge(image, k)            -> Frame(layers, num_tokens, grid, stage_ms)
    wire:   Split.pack(frame) / unpack(data) the versioned, checksummed framing (bitstream.py):
                                             the edge packs, the cloud unpacks
    cloud:  Split.cloud(frame, question)    -> Answer(text, stage_ms, confidence) (and, after
                                             layer 1, the rule's refinement probe: Split.probe)
            Split.decode_batch(frames) / language_batch([(tokens, question, grid), ...])
                                             the same for many requests as one batch
    whole:  Split.whole(image, question)    -> the unsplit VLM's answer, the reference the
                                             split path is checked against

Every answer's `confidence` is the one adaptive refinement stops on: the rule of the MAE
folder's adaptive.json (Split.adaptive_rule(), progvlm/adaptive.py), so the cloud and the
threshold the edge compares it with always go together.

`load_split(vlm_spec, mae_folder)` is the one loader: the agent, the cloud service, evaluation,
the benchmark and the page all call it, so they all run the same VLM with the same MAE, and a
pair that does not belong together is refused here, once.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from .codec import bitstream
from . import adaptive_probe
from .adaptive import ADAPTIVE_FILE, DEFAULT_RULE, AdaptiveRule
from .backends import MAE_ENV, VLMBackend, load_vlm
from .backends.base import Answer, Grid
from .codec.entropy import EntropyDecodeError
from .models.mae import DEFAULT_MAE, MAE, load_mae
from .net.protocol import to_ms


class SplitError(ValueError):
    """A VLM and an MAE that cannot be paired; str(e) says why and what to do."""


@dataclass
class Frame:
    """One image's progressive layers as the edge made them (no framing yet)."""
    layers: list[bytes]  # entropy-coded payloads of layers 1..k
    num_tokens: int  # N of this image (a multiple of the MAE's block)
    grid: Grid = None  # the tile layout the cloud needs to rebuild the prompt
    stage_ms: dict[str, float] = field(default_factory=dict)
    layers_announced: int | None = None  # k in the header: more than len(layers) if cut

    @property
    def k(self) -> int:
        return len(self.layers)

    @property
    def partial(self) -> bool:
        return self.layers_announced is not None and self.layers_announced > self.k

    def prefix(self, k: int) -> "Frame":
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be in 1..{self.k}, got {k}")
        return replace(self, layers=self.layers[:k], layers_announced=None, stage_ms={})


class Split:
    def __init__(self, vlm: VLMBackend, mae: MAE, mae_folder: str | Path | None = None):
        """`mae_folder`: where the MAE was loaded from, which holds its adaptive.json (None: an
        MAE built in memory, which has none)."""
        mae.check_belongs_to(vlm)
        if mae.cfg.token_dim != vlm.token_dim or mae.cfg.num_tokens != vlm.tokens_per_block:
            raise SplitError(f"MAE {mae.fingerprint().hex()} codes {mae.cfg.num_tokens}×"
                             f"{mae.cfg.token_dim} blocks; {vlm.model_id} makes "
                             f"{vlm.tokens_per_block}×{vlm.token_dim}")
        self.vlm, self.mae = vlm, mae
        self.fingerprint = mae.fingerprint()
        self.num_layers = mae.num_layers
        self.mae_folder = Path(mae_folder) if mae_folder is not None else None
        self._adaptive: tuple[AdaptiveRule, str] | None = None

    # ---- adaptive refinement -------------------------------------------------------------------
    def adaptive_rule(self) -> tuple[AdaptiveRule, str]:
        """The calibrated stopping rule and where it comes from: the MAE folder's adaptive.json
        (`python -m progvlm calibrate-adaptive` writes it), else progvlm.adaptive.DEFAULT_RULE
        (the rule and threshold calibrated for the bundled model; for another VLM only a
        starting point). A file that exists but is not valid raises ValueError naming it."""
        if self._adaptive is None:
            path = self.mae_folder / ADAPTIVE_FILE if self.mae_folder is not None else None
            if path is not None and path.is_file():
                rule = AdaptiveRule.load(self.mae_folder)
                if rule.probe is not None:
                    try:
                        rule.probe.check_fits(self.mae)
                    except ValueError as e:
                        raise ValueError(f"{path}: {e}") from None
                self._adaptive = rule, str(path)
            else:
                self._adaptive = DEFAULT_RULE, (f"default ({DEFAULT_RULE.rule} ≥ "
                                                f"{DEFAULT_RULE.threshold}: no {path or ADAPTIVE_FILE})")
        return self._adaptive

    def adaptive_threshold(self) -> tuple[float, str]:
        """(threshold, source): an answer whose confidence is ≥ threshold is sure enough to
        stop sending layers; source is the adaptive.json read, or says the default was used."""
        rule, source = self.adaptive_rule()
        return rule.threshold, source

    def _with_confidence(self, answer: Answer, question: str | None = None) -> Answer:
        answer.confidence = self.adaptive_rule()[0].confidence(answer, question)
        return answer

    def probe(self, frames: list[Frame], questions: list[str], answers: list[Answer],
              max_new_tokens: int = 32) -> list[Answer]:
        """The rule's refinement probe (progvlm.adaptive_probe) on the answers from layer 1 of
        these frames that are sure without it, where the edge may still send layer 2 (the
        header announced more layers: `Frame.partial`, as adaptive's stream does): each one's
        refinement_agreement, its confidence again and probe_ms (the probe's time, one batch
        for all) in stage_ms. Other answers (from more layers, from a frame whose layers are
        all in, unsure already), or a rule without a probe: unchanged. Returns `answers`.
        (Evaluation and calibration probe every answer: eval/ladder.py.)"""
        rule = self.adaptive_rule()[0]
        # only where the confidence decides something and the probe could change it: the edge
        # may send another layer (progressive k = 1 announced one layer and waits for nothing),
        # and the answer is sure without it (the probe can only make an answer unsure, so an
        # unsure one's decision, send the next layer, stands)
        todo = [i for i, (f, a) in enumerate(zip(frames, answers))
                if f.k == adaptive_probe.PROBE_LAYER and f.partial and rule.sure(a.confidence)]
        if rule.probe is None or not todo:
            return answers
        return self._gate(rule, todo, adaptive_probe.layer_ones(self.mae, [frames[i] for i in todo]),
                          questions, answers, max_new_tokens)

    def probe_codes(self, codes, grid, questions: list[str], answers: list[Answer],
                    max_new_tokens: int = 32) -> list[Answer]:
        """Split.probe for layer 1 held as code indices (M,) rather than received as bytes: a
        watched stream's frame at k = 1 whose edge may send layer 2 (WatchStart.refines), every
        standing question's answer from it. The draws are seeded by the codes."""
        rule = self.adaptive_rule()[0]
        todo = [i for i, a in enumerate(answers) if rule.sure(a.confidence)]
        if rule.probe is None or not todo or self.num_layers <= adaptive_probe.PROBE_LAYER:
            return answers
        first = adaptive_probe.LayerOne(codes, adaptive_probe.codes_seed(codes), grid)
        return self._gate(rule, todo, [first] * len(todo), questions, answers, max_new_tokens)

    def _gate(self, rule, todo: list[int], firsts: list, questions, answers, max_new_tokens):
        """The probe on answers[i] for i in todo (their layer 1: firsts): each one's
        refinement_agreement, its confidence again and probe_ms (one batch for all)."""
        t0 = time.perf_counter()
        got = adaptive_probe.agreement_of(self, rule.probe, firsts, [questions[i] for i in todo],
                                          [answers[i] for i in todo], max_new_tokens)
        probe_ms = to_ms(time.perf_counter() - t0)
        for i, agreement in zip(todo, got):
            answer = answers[i]
            answer.refinement_agreement = agreement
            answer.stage_ms = {**answer.stage_ms, "probe_ms": probe_ms}
            self._with_confidence(answer, questions[i])
        return answers

    def info(self) -> dict:
        """What the page shows and what the agent compares with the cloud's."""
        return {**self.vlm.describe(), "mae_fingerprint": self.fingerprint.hex(),
                "num_layers": self.num_layers, "num_tokens": self.mae.cfg.num_tokens}

    # ---- edge ------------------------------------------------------------------------------
    def edge(self, image: Image.Image, k: int | None = None) -> Frame:
        """Image → layers 1..k (default L), each stage timed where it runs."""
        t0 = time.perf_counter()
        model_input = self.vlm.preprocess(image)
        t1 = time.perf_counter()
        tokens, grid = self.vlm.vision(model_input)
        t2 = time.perf_counter()
        layers = self.mae.compress(tokens, k)
        t3 = time.perf_counter()
        return Frame(layers, tokens.shape[0], grid, {"edge_preprocess": to_ms(t1 - t0),
                                                     "edge_vision": to_ms(t2 - t1),
                                                     "mae_encode": to_ms(t3 - t2)})

    # ---- wire ------------------------------------------------------------------------------
    def pack(self, frame: Frame) -> bytes:
        return bitstream.pack(self.fingerprint, frame.num_tokens, self.num_layers, frame.layers,
                              frame.grid)

    def check_header(self, header: bitstream.Header | bitstream.Bitstream) -> None:
        """Raise BitstreamError unless this pair can take the stream the header announces: this
        MAE's L, and N tokens in a layout the VLM accepts. Read from the header alone, before
        any layer is decoded: decoding costs memory and time in proportion to N, which a
        header of a few bytes could otherwise set to 2^28."""
        if header.num_layers != self.num_layers:
            raise bitstream.BitstreamError(f"stream of L={header.num_layers} layers; this MAE "
                                           f"has L={self.num_layers}")
        try:
            self.vlm.check_layout(header.num_tokens, header.grid)
        except ValueError as e:
            raise bitstream.BitstreamError(f"stream shape does not fit this model: {e}") from None

    def unpack(self, data: bytes) -> Frame:
        """Wire bytes (a whole stream or a prefix cut after a layer) → Frame. Raises
        BitstreamError for anything this pair cannot decode (check_header)."""
        bs = bitstream.parse(data, expected_fingerprint=self.fingerprint)
        self.check_header(bs)
        return Frame(bs.layers, bs.num_tokens, bs.grid, layers_announced=bs.k)

    # ---- cloud -----------------------------------------------------------------------------
    def decode(self, frame: Frame) -> torch.Tensor:
        """Layers 1..k → visual tokens (decode_batch of one frame)."""
        return self.decode_batch([frame])[0]

    def decode_batch(self, frames: list[Frame]) -> list[torch.Tensor]:
        """decode() of many frames, the MAE decoder run once over all their blocks (each block
        with its own frame's k): MAE.decompress_batch, the one decoding path. Raises
        BitstreamError for the first frame that cannot be decoded."""
        try:
            return self.mae.decompress_batch([(f.layers, f.num_tokens) for f in frames])
        except EntropyDecodeError as e:
            raise bitstream.BitstreamError(f"corrupt layer data: {e}") from None
        except ValueError as e:  # layers or tokens this MAE does not take (MAE.check_layers)
            raise bitstream.BitstreamError(str(e)) from None

    def decode_latent(self, latent, k: int) -> torch.Tensor:
        """A latent summed from codes (M, d), M a multiple of the block (a stream's reference:
        progvlm.codec.temporal) → visual tokens (M, D), the decoder told k."""
        N = self.mae.cfg.num_tokens
        latent = torch.as_tensor(latent, dtype=torch.float32)
        with torch.inference_mode():
            tokens = self.mae.decode_latent(latent.view(-1, N, latent.shape[-1]), k)
        return tokens.reshape(-1, tokens.shape[-1])

    def cloud(self, frame: Frame, question: str, max_new_tokens: int = 32) -> Answer:
        """Layers 1..k + question → answer; stage_ms has mae_decode_ms and the LM's stages."""
        t0 = time.perf_counter()
        tokens = self.decode(frame)
        decode_ms = to_ms(time.perf_counter() - t0)
        answer = self.language(tokens, question, frame.grid, max_new_tokens)
        answer.stage_ms = {"mae_decode_ms": decode_ms, **answer.stage_ms}
        return self.probe([frame], [question], [answer], max_new_tokens)[0]

    def language(self, tokens: torch.Tensor, question: str, grid: Grid = None,
                 max_new_tokens: int = 32) -> Answer:
        """The language half; stage_ms is the backend's own split (prefill, generation) or,
        where it has none, language_ms; confidence under adaptive_rule()."""
        t0 = time.perf_counter()
        answer = self.vlm.cloud_half(tokens, question, max_new_tokens, grid=grid)
        answer.stage_ms = answer.stage_ms or {"language_ms": to_ms(time.perf_counter() - t0)}
        return self._with_confidence(answer, question)

    def language_batch(self, requests: list[tuple[torch.Tensor, str, Grid]],
                       max_new_tokens: int = 32) -> list[Answer]:
        """The language half of many requests (tokens, question, grid) at once: the answers
        language() gives one by one, in order. A backend that batches (batches_language)
        runs them as one batch, and every answer's stage_ms is then the batch's (prefill_ms
        and generation_ms, or language_ms), shared by all len(requests); otherwise they run
        one by one with stage_ms of their own. A ValueError (a question the model cannot
        read) fails the whole call: callers that must isolate requests retry them alone."""
        if not self.vlm.batches_language:
            return [self.language(t, q, g, max_new_tokens) for t, q, g in requests]
        if not requests:
            return []
        tokens, questions, grids = (list(column) for column in zip(*requests))
        t0 = time.perf_counter()
        answers = self.vlm.cloud_half_batch(tokens, questions, max_new_tokens, grids)
        batch_ms = {"language_ms": to_ms(time.perf_counter() - t0)}
        for answer, question in zip(answers, questions):
            answer.stage_ms = answer.stage_ms or dict(batch_ms)
            self._with_confidence(answer, question)
        return answers

    def whole(self, image: Image.Image, question: str, max_new_tokens: int = 32) -> Answer:
        """The unsplit VLM's answer (backend.answer): the reference that the split path's
        answers are compared with."""
        return self.vlm.answer(image, question, max_new_tokens)


def _mae_trained_for(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text())["mae"]["vlm_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_split(vlm: str | Path | VLMBackend | None = None, mae: str | Path | MAE | None = None) -> Split:
    """The one loader. `vlm`: a spec (see progvlm.backends) or a backend; None: PROGVLM_VLM or
    the bundled model. `mae`: a folder or an MAE; None: PROGVLM_MAE, or the bundled MAE when
    it was trained for this VLM."""
    backend = vlm if isinstance(vlm, VLMBackend) else load_vlm(vlm)
    folder = None
    if isinstance(mae, MAE):
        model = mae
    else:
        folder = mae if mae is not None else os.environ.get(MAE_ENV)
        if folder is None:
            if _mae_trained_for(DEFAULT_MAE) != backend.model_id:
                raise SplitError(
                    f"no MAE given for {backend.model_id}: the bundled MAE is for the bundled "
                    "VLM. Train one with `python -m progvlm train-mae --vlm SPEC --images DIR` "
                    f"and pass --mae FOLDER (or set {MAE_ENV})")
            folder = DEFAULT_MAE
        try:
            model = load_mae(folder)
        except FileNotFoundError as e:
            raise SplitError(str(e)) from None
    try:
        split = Split(backend, model, folder)
        split.adaptive_rule()  # a broken adaptive.json fails here, at start-up, not per answer
        return split
    except ValueError as e:
        raise SplitError(str(e)) from None
