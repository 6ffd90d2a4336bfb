"""Image → bitstream on the device, each stage timed where it runs (no link, no cloud).

    image → preprocess → vision encoder + projector (edge half) → MAE encode → bitstream

Times are measured on this host with whichever runtime is given (edge_agent/runtime.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from progvlm.bitstream import parse
from progvlm.images import load_image

from .runtime import EdgeRuntime


@dataclass
class EdgeResult:
    bitstream: bytes
    layer_bytes: list[int]
    k: int
    stage_ms: dict[str, float] = field(default_factory=dict)


class EdgeDevice:
    def __init__(self, runtime: EdgeRuntime):
        self.runtime = runtime

    @classmethod
    def bundled(cls) -> "EdgeDevice":
        from .runtime import PyTorchRuntime
        return cls(PyTorchRuntime.bundled())

    def encode(self, image, k: int) -> EdgeResult:
        L = self.runtime.num_layers
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= L:
            raise ValueError(f"k must be an integer in 1..{L}, got {k!r}")
        t0 = time.perf_counter()
        pixels = self.runtime.preprocess(load_image(image))
        t1 = time.perf_counter()
        tokens = self.runtime.vision(pixels)
        t2 = time.perf_counter()
        data = self.runtime.mae_encode(tokens, k)
        t3 = time.perf_counter()
        times = {"edge_preprocess": t1 - t0, "edge_vision": t2 - t1, "mae_encode": t3 - t2}
        layers = [len(p) for p in parse(data).layers]  # outside the timed stages
        return EdgeResult(data, layers, k, {n: round(v * 1e3, 3) for n, v in times.items()})
