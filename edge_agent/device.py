"""What the camera device does for one frame, each stage timed where it runs.

    image → preprocess → vision encoder + projector (edge half) → MAE encode → bitstream

Times are measured on this host. Nothing here is projected to i.MX95 speed; a device profile
that scales them will say so in the stage names it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from progvlm.images import load_image


@dataclass
class EdgeResult:
    bitstream: bytes
    layer_bytes: list[int]
    k: int
    stage_ms: dict[str, float] = field(default_factory=dict)


class EdgeDevice:
    def __init__(self, backend, mae):
        if mae.cfg.vlm_id != backend.model_id:
            raise ValueError(f"MAE {mae.fingerprint().hex()} belongs to {mae.cfg.vlm_id}, "
                             f"not to {backend.model_id}")
        self.backend, self.mae = backend, mae

    @classmethod
    def bundled(cls) -> "EdgeDevice":
        from progvlm.backends.tiny import TinyVLMBackend
        from progvlm.models.mae import DEFAULT_MAE, load_mae
        return cls(TinyVLMBackend.load(), load_mae(DEFAULT_MAE))

    def encode(self, image, k: int) -> EdgeResult:
        L = self.mae.cfg.num_layers
        if not isinstance(k, int) or not 1 <= k <= L:
            raise ValueError(f"k must be an integer in 1..{L}, got {k!r}")
        times = {}
        t0 = time.perf_counter()
        rgb = load_image(image)
        t1 = time.perf_counter()
        tokens = self.backend.edge_half(rgb)
        t2 = time.perf_counter()
        data = self.mae.compress(tokens, k)
        t3 = time.perf_counter()
        times.update(edge_preprocess=(t1 - t0) * 1e3, edge_vision=(t2 - t1) * 1e3,
                     mae_encode=(t3 - t2) * 1e3)
        from progvlm.bitstream import parse
        layers = [len(p) for p in parse(data).layers]
        return EdgeResult(data, layers, k, {n: round(v, 3) for n, v in times.items()})
