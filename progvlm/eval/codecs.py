"""The codecs and baselines the evaluation ladder runs: one registry, as CompressAI's model zoo.

A codec turns one frame (a `Unit`: the camera image, its visual tokens and their tile layout)
into the bytes it would put on the link and what the VLM then sees: visual tokens for the
language half, or an image that the vision half sees first. `REGISTRY` maps an entry's name to
`rows(plan) -> [Codec]`; `codecs_for(plan)` lists one evaluation's rows in registry order.
Entries: the MAE's prefixes k = 1..L, raw fp16 tokens, JPEG at the model's input size and at
camera size, average-pooled tokens at about each k's bytes. A new baseline is one `register`.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import encode_jpeg, resize_for_model
from ..split import Frame


@dataclass(frozen=True)
class Plan:
    """What one evaluation asks of the registry."""
    num_layers: int
    jpeg_qualities: tuple[int, ...] = ()  # JPEG of the frame at the model's input size
    camera_jpeg_qualities: tuple[int, ...] = ()  # JPEG of the frame as captured
    pooling: bool = False  # pooled tokens (a square grid of tokens per frame)


class Unit:
    """One frame under evaluation: its index in the run, the camera image, the uncompressed
    visual tokens and their tile layout (None: fixed); `layers`: the L layer payloads when
    another edge coded them (eval-mae --edge-runtime), else the MAE codes `tokens` here."""

    def __init__(self, index: int, image: Image.Image, tokens: torch.Tensor, grid=None,
                 layers: list[bytes] | None = None):
        self.index, self.image, self.tokens, self.grid = index, image, tokens, grid
        self._layers = layers

    def layers(self, split) -> list[bytes]:
        """The MAE's L layer payloads of these tokens, coded once for every prefix."""
        if self._layers is None:
            self._layers = split.mae.compress(self.tokens)
        return self._layers


@dataclass(frozen=True)
class Coded:
    nbytes: int  # what crosses the link
    seen: torch.Tensor | Image.Image  # what the VLM then sees (Codec.sees says which)
    layer_bytes: list[int] | None = None  # per layer, for the MAE's rows


class Context:
    """What a codec may read besides its frame: the split, and the bytes of the rows coded so
    far (per frame; a second-pass codec sees every first-pass row whole)."""

    def __init__(self, split):
        self.split = split
        self.sizes: dict[str, list[int]] = {}

    def bytes_mean(self, name: str) -> float:
        return mean_or_nan(self.sizes[name])


def mean_or_nan(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


class Codec:
    """One row of the ladder. `encode(unit, ctx) -> Coded`."""
    name: str
    family: str  # the rate–accuracy plot's series: progressive, raw_fp16, jpeg_model, ...
    sees: str = "tokens"  # "tokens" (to the language half) or "image" (through the vision half)
    k: int | None = None  # the MAE's prefix length (the report's per_k rows); None: a baseline
    second_pass: bool = False  # coded after every frame's first pass (may read its rows' bytes)

    def encode(self, unit: Unit, ctx: Context) -> Coded:
        raise NotImplementedError

    def row_extra(self, ctx: Context) -> dict:
        """Settings the report states beside the row's figures."""
        return {}


class MAEPrefix(Codec):
    """The first k layers, through the wire form: packed, parsed and decoded as the cloud does."""
    family = "progressive"

    def __init__(self, k: int):
        self.k, self.name = k, f"k={k}"

    def encode(self, unit, ctx):
        split = ctx.split
        frame = Frame(unit.layers(split)[:self.k], len(unit.tokens), unit.grid)
        wire = split.pack(frame)
        return Coded(len(wire), split.decode(split.unpack(wire)), [len(p) for p in frame.layers])


def raw_fp16(tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Split without compression: the tokens as fp16 (bytes, what the cloud receives)."""
    t = tokens.half()
    return t.numel() * 2, t.float()


class RawFP16(Codec):
    name = family = "raw_fp16"

    def encode(self, unit, ctx):
        return Coded(*raw_fp16(unit.tokens))


def jpeg(image: Image.Image, quality: int) -> tuple[int, Image.Image]:
    data = encode_jpeg(image, quality)
    return len(data), Image.open(io.BytesIO(data)).convert("RGB")


class JPEG(Codec):
    """The frame as JPEG at `quality`: at the model's input size (what full-cloud sends) or as
    captured (the cloud resizes)."""
    sees = "image"

    def __init__(self, quality: int, camera: bool = False):
        self.quality, self.camera = quality, camera
        self.name = f"jpeg_camera_q{quality}" if camera else f"jpeg_q{quality}"
        self.family = "jpeg_camera" if camera else "jpeg_model"

    def encode(self, unit, ctx):
        image = unit.image if self.camera else resize_for_model(unit.image, ctx.split.vlm.input_size)
        return Coded(*jpeg(image, self.quality))


POOL_GRIDS = (1, 2, 4)
POOL_BITS = (1, 2, 3, 4, 6, 8)
_SCALE_BYTES = 8  # min and max as fp32


def pooled_bytes(num_dims: int, grid: int, bits: int) -> int:
    return math.ceil(grid * grid * num_dims * bits / 8) + _SCALE_BYTES


def pooling_setting_for(target_bytes: float, num_dims: int) -> tuple[int, int]:
    """The (grid, bits) whose payload is closest to target_bytes."""
    return min(((g, b) for g in POOL_GRIDS for b in POOL_BITS),
               key=lambda gb: abs(pooled_bytes(num_dims, *gb) - target_bytes))


def pooled(tokens: torch.Tensor, grid: int, bits: int) -> tuple[int, torch.Tensor]:
    """Average-pool the token grid to grid×grid, quantise uniformly to `bits`, upsample back."""
    n, d = tokens.shape
    side = int(round(n ** 0.5))
    x = tokens.T.reshape(1, d, side, side)
    p = F.adaptive_avg_pool2d(x, grid)
    lo, hi = p.min(), p.max()
    levels = 2 ** bits - 1
    q = torch.round((p - lo) / (hi - lo).clamp_min(1e-8) * levels)
    deq = q / levels * (hi - lo) + lo
    up = F.interpolate(deq, size=(side, side), mode="nearest")
    return pooled_bytes(d, grid, bits), up.reshape(d, n).T


class Pooling(Codec):
    """Average-pooled, uniformly quantised tokens at about the mean bytes of the MAE's k."""
    family = "pooling"
    second_pass = True  # k's mean bytes are known once every frame has been coded

    def __init__(self, k: int):
        self.of_k, self.name = k, f"pool_k{k}"

    def setting(self, ctx) -> tuple[int, int]:
        return pooling_setting_for(ctx.bytes_mean(f"k={self.of_k}"), ctx.split.mae.cfg.token_dim)

    def encode(self, unit, ctx):
        return Coded(*pooled(unit.tokens, *self.setting(ctx)))

    def row_extra(self, ctx):
        grid, bits = self.setting(ctx)
        return {"grid": grid, "bits": bits}


#: entry name → rows(plan): the codecs of that entry for one evaluation, in this order
REGISTRY: dict[str, Callable[[Plan], list[Codec]]] = {}


def register(name: str, rows: Callable[[Plan], list[Codec]]) -> None:
    """Add (or replace) an entry; its rows come after the earlier entries' in every report."""
    REGISTRY[name] = rows


register("mae", lambda plan: [MAEPrefix(k) for k in range(1, plan.num_layers + 1)])
register("raw_fp16", lambda plan: [RawFP16()])
register("jpeg", lambda plan: [JPEG(q) for q in plan.jpeg_qualities])
register("jpeg_camera", lambda plan: [JPEG(q, camera=True) for q in plan.camera_jpeg_qualities])
register("pooling", lambda plan: [Pooling(k) for k in range(1, plan.num_layers + 1)] if plan.pooling else [])


def codecs_for(plan: Plan, entries=None) -> list[Codec]:
    """The rows of one evaluation: every entry's (or only those named in `entries`)."""
    return [c for name, rows in REGISTRY.items() if entries is None or name in entries
            for c in rows(plan)]
