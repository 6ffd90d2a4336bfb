"""Reference points for the MAE: raw fp16 tokens, JPEG frames, average-pooled tokens."""
from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from PIL import Image

from ..images import encode_jpeg


def raw_fp16(tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Split without compression: the tokens as fp16 (bytes, what the cloud receives)."""
    t = tokens.half()
    return t.numel() * 2, t.float()


def jpeg(image: Image.Image, quality: int) -> tuple[int, Image.Image]:
    data = encode_jpeg(image, quality)
    return len(data), Image.open(io.BytesIO(data)).convert("RGB")


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
