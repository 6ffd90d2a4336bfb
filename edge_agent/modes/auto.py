"""auto: progressive with the largest k whose predicted end-to-end time fits the budget."""
from __future__ import annotations

from .layered import Layered, send
from .progressive import check_cut


class Auto(Layered):
    name = "auto"
    cuttable = True

    def check(self, request, num_layers):
        super().check(request, num_layers)
        check_cut(request, num_layers)  # auto chooses its k later

    def run(self, context):
        ask, seen = context.ask, context.seen
        estimates = context.agent.estimates.estimate(ask.client, ask.link, context.on_refinement is not None)
        sizes = context.runtime.stream_sizes(seen.layers, seen.num_tokens, seen.grid)
        k, context.record["auto"] = choose_k(sum(context.stages.values()), sizes, ask.link,
                                             context.request.budget_ms, estimates)
        send(context, seen, k)


def choose_k(edge_ms: float, sizes: list[int], link, budget_ms: float, estimates: dict):
    """The largest k whose predicted end-to-end time fits the budget (k = 1 if none does): the
    edge's measured time, the link's time for the k-layer stream (`sizes[k - 1]` bytes) and a
    reply, and the client's estimates of the cloud and the overhead (LinkEstimates; the record
    shows them)."""
    unmeasured_ms = estimates["cloud_ms"]["ms"] + estimates["overhead_ms"]["ms"]
    predicted = {k: round(edge_ms + 1e3 * link.request_time_s(nbytes) + unmeasured_ms, 3)
                 for k, nbytes in enumerate(sizes, start=1)}
    fits = [k for k, t in predicted.items() if t <= budget_ms]
    k = max(fits) if fits else 1
    return k, {"budget_ms": budget_ms, "predicted_ms": predicted, "chosen_k": k,
               "predicted_chosen_ms": predicted[k], "fits_budget": bool(fits),
               "edge_ms": round(edge_ms, 3), "estimates": estimates}
