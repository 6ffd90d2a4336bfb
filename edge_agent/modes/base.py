"""What a mode is, the registry of modes, and the context a mode runs in.

A mode is a small class (one module each, registered in edge_agent/modes/__init__.py):

    name         what a request calls it (the registry's key)
    check        the request's fields that concern this mode (AskError), before any work
    on_device    the device's work for this request, under the agent's device lock (timed
                 steps through the context); its result is `context.seen`
    run          the rest (the link and the cloud), filling the record

and a few facts the agent and the page read instead of testing names: `needs_cloud`,
`converses` (a conversation may keep the frame at the cloud), `cuttable` (cut_after_layer
applies), `refines` (the cloud answers as layers arrive: a watcher sees refinements). The agent
keeps the lock, the deadline, the timing and the record around them (edge_agent/agent.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from progvlm.net.protocol import to_ms

from ..errors import AskError

class Mode:
    name: str = ""
    needs_cloud = True
    converses = False
    cuttable = False
    refines = False

    def check(self, request, num_layers: int):
        """Raise AskError for a field this mode cannot serve as asked."""
        if request.conversation and not self.converses:
            raise AskError(f"conversation applies to {', '.join(modes_where('converses'))}; mode "
                           f"{self.name} sends its frame whole every time")
        if request.cut_after_layer is not None and (request.conversation or not self.cuttable):
            raise AskError(f"cut_after_layer applies to {' and '.join(modes_where('cuttable'))} only, "
                           "without conversation")

    def on_device(self, context: "RunContext"):
        """The device's work (under the device lock); returns what `run` needs."""

    def run(self, context: "RunContext"):
        """The rest of the request: fill context.record."""
        raise NotImplementedError


MODES: dict[str, Mode] = {}  # in the order the page shows them


def register(mode: Mode) -> Mode:
    """Add a mode (an instance) to the registry: requests, the CLI and the page offer it."""
    if not mode.name or mode.name in MODES:
        raise ValueError(f"a mode needs a name of its own, got {mode.name!r}")
    MODES[mode.name] = mode
    return mode


def unregister(name: str):
    MODES.pop(name, None)


def modes_where(fact: str) -> list[str]:
    """The registered modes for which `fact` (a Mode attribute) holds."""
    return [name for name, mode in MODES.items() if getattr(mode, fact)]


@dataclass
class RunContext:
    """One request under way: what a mode reads (the checked request, the agent's runtime,
    cloud and memories) and writes (the record, the stage times)."""
    agent: object  # the EdgeAgent: runtime, cloud, frames, estimates, cloud_adaptive
    ask: object  # the CheckedAsk (edge_agent/request.py)
    record: dict
    stages: dict  # stage → ms, in the order they happened
    memo: dict  # the device's work on this frame: kept across the modes of one comparison
    shared: bool = False  # the memo is a comparison's: the device's work is shared by its modes
    on_refinement: object = None  # called with each answer the cloud sends as layers arrive
    seen: object = None  # what the mode's on_device returned

    @property
    def runtime(self):
        return self.agent.runtime

    @property
    def request(self):
        return self.ask.request

    def timed(self, stage: str, fn, *args):
        """fn(*args), its time the stage's (scaled by the device profile)."""
        t0 = time.perf_counter()
        out = fn(*args)
        self.stages[stage] = to_ms(time.perf_counter() - t0) * self.ask.profile.compute_factor
        return out

    def step(self, key: str, fn, *args, stage: str | None = None, add: bool = False):
        """`timed`, done once per memo `key`: a repeat reuses the result and its measured time.
        The time goes to `stage` (default: the key), added to what it holds with `add`."""
        if key not in self.memo:
            t0 = time.perf_counter()
            self.memo[key] = (fn(*args), to_ms(time.perf_counter() - t0))
        out, ms = self.memo[key]
        stage = stage or key
        self.stages[stage] = (self.stages[stage] if add else 0.0) + ms * self.ask.profile.compute_factor
        return out

    def see(self):
        """The frame through the device's vision half: (visual tokens, grid)."""
        pixels = self.step("edge_preprocess_model", self.runtime.preprocess, self.ask.image,
                           stage="edge_preprocess", add=True)
        return self.step("edge_vision", self.runtime.vision, pixels)

    def encode(self, tokens, k: int) -> list[bytes]:
        """Visual tokens → the payloads of MAE layers 1..k."""
        return self.step(f"mae_encode {k}", self.runtime.mae_encode, tokens, k, stage="mae_encode")

    def check_link_time(self, payload_bytes: int):
        """AskError or DeadlineError if the payload's time on the link does not fit."""
        self.agent.check_link_time(self.ask.link, payload_bytes, self.ask)

    def exchanged(self, ex):
        """The stages of an exchange with the cloud: connect (0 on a kept-open session),
        uplink, the cloud's own, downlink, overhead; they sum to its measured wall time."""
        cloud = {f"cloud_{name.removesuffix('_ms')}": v for name, v in ex.reply["stage_ms"].items()}
        if ex.cloud_waited_ms is not None:  # steered: the earlier answers the edge waited for
            if ex.cloud_waited_ms > 0:
                cloud["cloud_earlier_layers"] = ex.cloud_waited_ms
        elif len(ex.refinements) > 1:  # the cloud answered earlier layers first, in the same stream
            cloud["cloud_earlier_layers"] = round(sum(sum(r["stage_ms"].values())
                                                      for r in ex.refinements[:-1]), 3)
        link = ex.link_stages_ms(sum(cloud.values()))
        self.stages.update(connect=link["connect"], uplink=link["uplink"], **cloud,
                           downlink=link["downlink"], overhead=link["overhead"])


def frame_sizes(runtime, memo: dict, num_layers: int) -> list[int]:
    """What a request for k = 1..L layers of the frame in `memo` sends (each its own header)."""
    (tokens, grid), _ = memo["edge_vision"]
    layers, _ = memo[f"mae_encode {num_layers}"]
    return runtime.stream_sizes(layers, tokens.shape[0], grid)
