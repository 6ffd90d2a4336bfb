"""progressive: vision half → MAE layers 1..k → link (layer by layer) → the cloud answers."""
from __future__ import annotations

from ..errors import AskError
from .layered import Layered, send


class Progressive(Layered):
    name = "progressive"
    cuttable = True

    def check(self, request, num_layers):
        super().check(request, num_layers)
        k = num_layers if request.k is None else request.k
        if not 1 <= k <= num_layers:  # (the one place k's range is checked: it is the model's L)
            raise AskError(f"k must be an integer in 1..{num_layers}, got {k!r}")
        check_cut(request, k)

    def coded(self, context):
        # a conversation may send any layer later, and a comparison encodes once for all
        request = context.request
        return context.runtime.num_layers if request.conversation or context.shared else context.ask.k

    def run(self, context):
        send(context, context.seen, context.ask.k)


def check_cut(request, top: int):
    """cut_after_layer within the layers a request may send (0: the header alone)."""
    cut = request.cut_after_layer
    if cut is not None and not 0 <= cut <= top:
        raise AskError(f"cut_after_layer must be in 0..{top}, got {cut}")
