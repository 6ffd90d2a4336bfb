"""What each progressive layer adds, as a picture over the image's patches.

For k = 1..L: how much of each visual token the decoder still misses after k layers,
‖T − T̂_k‖ / ‖T‖ per token (one token per image patch), drawn as a heat map over the frame.
Bright patches are where the next layer has work left; a good MAE spends its bytes on objects.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..images import load_image, to_rgb


def layer_residuals(split, image) -> np.ndarray | None:
    """(L, G, G) relative residual per patch after k = 1..L layers, over the last block of
    tokens (the whole image; with Idefics3 tiling, the global view comes last). None when a
    block is not a square grid of patches (no patch layout to draw)."""
    tokens, _ = split.vlm.edge_half_with_grid(load_image(image))
    block = split.mae.cfg.num_tokens
    grid = int(round(block ** 0.5))
    if grid * grid != block:
        return None
    norms = tokens.norm(dim=-1).clamp_min(1e-6)
    out = []
    for k in range(1, split.num_layers + 1):
        decoded = split.mae.decompress(split.mae.compress(tokens, k), tokens.shape[0])
        out.append(((tokens - decoded).norm(dim=-1) / norms)[-block:].reshape(grid, grid))
    return torch.stack(out).numpy()


def _heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB: dark blue (nothing left) → yellow (much left)."""
    v = np.clip(values, 0, 1)[..., None]
    low, mid, high = np.array([20, 30, 90]), np.array([200, 60, 80]), np.array([255, 230, 60])
    return np.where(v < 0.5, low + (mid - low) * v * 2, mid + (high - mid) * (v - 0.5) * 2)


def residual_strip(image, residuals: np.ndarray, size: int = 192, scale: float | None = None) -> Image.Image:
    """The frame with each k's residual map blended over it, side by side (k = 1..L), on one
    colour scale (the largest residual of k = 1 unless `scale` is given)."""
    frame = np.asarray(to_rgb(load_image(image)).resize((size, size), Image.BILINEAR), np.float32)
    scale = scale or float(residuals.max()) or 1.0
    panels = []
    for r in residuals:
        heat = Image.fromarray(_heat(r / scale).astype(np.uint8)).resize((size, size), Image.NEAREST)
        panels.append(0.45 * frame + 0.55 * np.asarray(heat, np.float32))
    gap = np.full((size, 6, 3), 255, np.float32)
    row = np.concatenate([p if i == 0 else np.concatenate([gap, p], 1) for i, p in enumerate(panels)], 1)
    return Image.fromarray(row.astype(np.uint8))
