"""The agent's modes, in the order the page shows them: one module per mode, one line each here.

A new mode is a Mode subclass in a module of its own (edge_agent/modes/base.py says what it
defines) and its `register` line below (or a `register` call from anywhere, e.g. a test);
requests, the CLI's choices, GET /v1/info and the page offer it from there.
"""
from .adaptive import Adaptive
from .auto import Auto
from .base import MODES, Mode, RunContext, frame_sizes, register, unregister
from .full_cloud import FullCloud
from .full_edge import FullEdge
from .progressive import Progressive

register(FullCloud())
REFERENCE = register(FullEdge())  # a comparison's reference: the answer from uncompressed tokens
LADDER = register(Progressive())  # a comparison's ladder: one stream of every layer, each answered
register(Auto())
register(Adaptive())

__all__ = ["MODES", "Mode", "RunContext", "REFERENCE", "LADDER", "frame_sizes",
           "register", "unregister"]
