"""The refinement probe (issue 20): after layer 1, would a plausible layer 2 change the answer?

The cloud holds the quantiser's codebooks. After layer 1 it draws `samples` plausible layer-2
refinements itself, each token's layer-2 code from P(layer-2 code | that token's layer-1 code)
(`transitions`, counted on calibration frames: `fit`), decodes them as k = 2 and asks the
VLM, in one batch, whether each would give the answer from layer 1 (`VLMBackend.gives_answers`:
the bundled VLM tells from one teacher-forced pass, without generating), with nothing more from
the edge. `agreement` is the fraction that would. An adaptive rule with a probe
(progvlm.adaptive.AdaptiveRule.probe) is never sure of a layer-1 answer that a refinement
changes; the edge's stop rule and the round trips are unchanged (the cloud computes it before
it replies).

Measured (docs/adaptive/refinement_probe.py, README "Adaptive: how sure is sure"): the answer's
token probabilities miss most of what layer 1 lost; these refinements catch much of it, at the
cost of `samples` more prompt passes per layer-1 answer (on a CPU, about `samples` times one
answer's prefill; on a GPU, one batch). The draws are seeded by the layer's bytes, so
a frame always gets the same confidence. The table is plain JSON inside adaptive.json.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

# torch is imported where the probe runs (the cloud, calibration): the rule and its table load
# without it, on an edge that has no PyTorch
if TYPE_CHECKING:
    import torch

PROBE = "probe"
#: the layer the probe runs after (its refinements are of the next one)
PROBE_LAYER = 1
#: refinements per answer
DEFAULT_SAMPLES = 8


@dataclass(frozen=True, eq=False)
class RefinementProbe:
    """transitions[a][b]: P(layer-2 code b | layer-1 code a), each row summing to 1."""
    samples: int
    transitions: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        t = np.asarray(self.transitions, dtype=float)
        if self.samples < 1:
            raise ValueError(f"refinement probe: samples must be ≥ 1, got {self.samples}")
        if t.ndim != 2 or t.shape[0] != t.shape[1] or not np.isfinite(t).all() or (t < 0).any():
            raise ValueError("refinement probe: transitions must be a square table of probabilities")
        if not np.allclose(t.sum(1), 1.0, atol=1e-3):
            raise ValueError("refinement probe: every row of transitions must sum to 1")

    @property
    def codebook_size(self) -> int:
        return len(self.transitions)

    @cached_property
    def table(self) -> "torch.Tensor":
        """transitions as a float32 tensor, made once (from 16k Python floats: about 1 ms)."""
        import torch
        return torch.tensor(self.transitions, dtype=torch.float32)

    def to_json(self) -> dict:
        return {"samples": self.samples, "layer": PROBE_LAYER,
                "transitions": [[round(p, 6) for p in row] for row in self.transitions]}

    def rounded(self) -> "RefinementProbe":
        """The probe as adaptive.json stores it (6 decimals): what every cloud loads."""
        return RefinementProbe.from_json(self.to_json())

    @classmethod
    def from_json(cls, meta) -> "RefinementProbe":
        """ValueError where `meta` is not a probe this code can run."""
        if not isinstance(meta, dict) or meta.get("layer") != PROBE_LAYER:
            raise ValueError(f"refinement probe: expected {{'layer': {PROBE_LAYER}, ...}}")
        try:
            rows = tuple(tuple(float(p) for p in row) for row in meta["transitions"])
            return cls(int(meta["samples"]), rows)  # multinomial draws renormalise the rounding
        except (KeyError, TypeError) as e:
            raise ValueError(f"refinement probe: missing or malformed field ({e})") from None

    def check_fits(self, mae) -> None:
        """ValueError unless this table is for `mae`'s codebooks (and it has a layer 2)."""
        K = mae.quantiser.codebooks.shape[1]
        if mae.num_layers <= PROBE_LAYER or self.codebook_size != K:
            raise ValueError(f"refinement probe: a table of {self.codebook_size} codes does not fit "
                             f"this MAE ({K} codes, {mae.num_layers} layers)")

    def refinements(self, mae, layer1_indices: torch.Tensor, seed: int) -> torch.Tensor:
        """Layer-1 codes (M,) → `samples` latents (samples, M, d) of layer 1 plus a drawn layer 2."""
        import torch
        q = mae.quantiser
        gen = torch.Generator().manual_seed(seed)
        table = self.table[layer1_indices]
        base = q.codebooks[0][layer1_indices]
        return torch.stack([base + q.codebooks[1][torch.multinomial(table, 1, generator=gen)[:, 0]]
                            for _ in range(self.samples)])


def fit(mae, token_blocks, samples: int = DEFAULT_SAMPLES, prior: float = 0.1) -> RefinementProbe:
    """The table from calibration tokens (an iterable of (M, D) tensors): how often each layer-2
    code follows each layer-1 code as the edge codes them, `prior` added to every count."""
    K = mae.quantiser.codebooks.shape[1]
    counts = np.full((K, K), prior)
    for tokens in token_blocks:
        idx = mae.edge_codec().decode_indices(mae.compress(tokens, PROBE_LAYER + 1), tokens.shape[0])
        np.add.at(counts, (idx[0], idx[1]), 1.0)
    table = counts / counts.sum(1, keepdims=True)
    return RefinementProbe(samples, tuple(tuple(map(float, row)) for row in table)).rounded()


def frame_seed(layers: list[bytes]) -> int:
    """The draws' seed: the frame's layer-1 bytes, so a frame always gets the same refinements."""
    return zlib.crc32(layers[0]) if layers else 0


def codes_seed(codes: np.ndarray) -> int:
    """The draws' seed for layer-1 codes the cloud holds rather than received as bytes (a
    watched stream's, progvlm.codec.temporal): the same codes, the same refinements."""
    return zlib.crc32(np.ascontiguousarray(codes, dtype=np.int32).tobytes())


@dataclass(frozen=True, eq=False)
class LayerOne:
    """What the probe needs of a frame: its layer-1 code indices (M,), the draws' seed and the
    tokens' grid (the VLM's tile layout, None for a fixed one)."""
    codes: np.ndarray
    seed: int
    grid: object = None

    @classmethod
    def of_frame(cls, mae, frame) -> "LayerOne":
        """A Frame's layer 1, decoded from its bytes and seeded by them."""
        return cls(mae.edge_codec().decode_indices(frame.layers[:PROBE_LAYER], frame.num_tokens)[0],
                   frame_seed(frame.layers), frame.grid)


def agreement(split, probe: RefinementProbe, frames, questions, answers, max_new_tokens: int = 32) -> list:
    """For each (frame, question, answer from that frame): the fraction of `probe.samples`
    refinements that would give `answer`, where the frame has exactly PROBE_LAYER layers of an
    MAE with more; None elsewhere. One Frame object asked several questions is drawn and
    decoded once (`agreement_of`)."""
    probed = [i for i, f in enumerate(frames) if f.k == PROBE_LAYER < split.num_layers]
    items: list[LayerOne | None] = [None] * len(frames)
    for i, first in zip(probed, layer_ones(split.mae, [frames[i] for i in probed])):
        items[i] = first
    return agreement_of(split, probe, items, questions, answers, max_new_tokens)


def layer_ones(mae, frames) -> list[LayerOne]:
    """Each frame's LayerOne, decoded once per Frame object: a frame asked several questions
    gets one LayerOne, so `agreement_of` draws and decodes its refinements once."""
    made: dict[int, LayerOne] = {}
    for f in frames:
        if id(f) not in made:
            made[id(f)] = LayerOne.of_frame(mae, f)
    return [made[id(f)] for f in frames]


def agreement_of(split, probe: RefinementProbe, firsts: list[LayerOne | None], questions, answers,
                 max_new_tokens: int = 32) -> list:
    """For each (layer 1, question, answer from it): the fraction of refinements that would give
    the answer (None where layer 1 is None). Items sharing one LayerOne share its refinements;
    all are decoded as one MAE batch and checked as one `gives_answers` batch."""
    import torch
    with torch.no_grad():
        return _agreement(torch, split, probe, firsts, questions, answers, max_new_tokens)


def _agreement(torch, split, probe, firsts, questions, answers, max_new_tokens) -> list:
    mae = split.mae
    out: list = [None] * len(firsts)
    frames = list({id(f): f for f in firsts if f is not None}.values())  # each once, in order
    if not frames:
        return out
    probe.check_fits(mae)
    N = mae.cfg.num_tokens
    lats, blocks = [], []
    for f in frames:
        drawn = probe.refinements(mae, torch.from_numpy(np.asarray(f.codes)), f.seed)  # (S, M, d)
        lats.append(drawn.reshape(-1, N, drawn.shape[-1]))
        blocks.append(len(f.codes) // N)
    decoded = mae.decode_latent(torch.cat(lats), PROBE_LAYER + 1)
    refined, start = {}, 0  # frame → its refinements' tokens, each (M, D)
    for f, b in zip(frames, blocks):
        refined[id(f)] = [decoded[start + s * b:start + (s + 1) * b].reshape(-1, decoded.shape[-1])
                          for s in range(probe.samples)]
        start += probe.samples * b
    requests = [(i, t) for i, f in enumerate(firsts) if f is not None for t in refined[id(f)]]
    same = split.vlm.gives_answers([t for _, t in requests], [questions[i] for i, _ in requests],
                                   [answers[i] for i, _ in requests], max_new_tokens,
                                   [firsts[i].grid for i, _ in requests])
    agree: dict[int, list[bool]] = {}
    for (i, _), vote in zip(requests, same):
        agree.setdefault(i, []).append(vote)
    for i, votes in agree.items():
        out[i] = float(math.fsum(votes) / len(votes))
    return out
