"""Wall-time helpers of the evaluation and the bench: one home for "run it, time it in ms".

Torch-free at import (a GPU is synchronised only where torch is already loaded)."""
from __future__ import annotations

import statistics
import sys
import time


def _sync():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args):
    """fn(*args) and its wall time in ms (GPU work included: synchronised before and after)."""
    _sync()
    t0 = time.perf_counter()
    out = fn(*args)
    _sync()
    return out, (time.perf_counter() - t0) * 1e3


def best_of(fn, *args, repeats: int):
    """`timed` for stages of a few ms: the last result and the best of `repeats` runs (as timeit
    does). On a shared host a stage this short is often preempted whole, and preemption only
    ever adds time."""
    runs = [timed(fn, *args) for _ in range(repeats)]
    return runs[-1][0], min(ms for _, ms in runs)


def median_ms(first, second, repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of first() and of second(first's result), run in turn: one
    frame through two consecutive stages, as the pipeline runs them (one warm-up first)."""
    second(first())
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = first()
        t1 = time.perf_counter()
        second(out)
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a) * 1000, statistics.median(b) * 1000
