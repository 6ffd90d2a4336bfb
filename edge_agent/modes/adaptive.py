"""adaptive: receiver-driven. Header + layer 1, then one more layer after each answer the cloud is
not sure of (confidence < threshold), while the budget still fits one (`stop`); the record says
why it stopped."""
from __future__ import annotations

from .layered import Layered, steer, whole_stream

RULE = ("after each answer: stop if confidence ≥ threshold; else send the next layer if elapsed + "
        "RTT + its bytes and a reply at the bandwidth + the last answer's cloud time fit the budget")


class Adaptive(Layered):
    name = "adaptive"

    def run(self, context):
        ask, record, budget_ms = context.ask, context.record, context.request.budget_ms
        if context.request.adaptive_threshold is not None:
            threshold, source = context.request.adaptive_threshold, "this request"
        else:
            threshold, source = (context.agent.cloud_adaptive[key] for key in ("threshold", "source"))
        packed = whole_stream(context, context.seen)
        edge_ms = sum(context.stages.values())
        steps: list[dict] = []

        def more(answer: dict, elapsed_ms: float) -> bool:
            step, why = stop(answer, edge_ms + elapsed_ms, threshold, packed.layer_bytes, ask.link, budget_ms)
            steps.append(step)
            return why is None
        steer(context, context.seen, 1, more, packed)
        used, conf = record["layers_used"], record["confidence"]
        record["k"] = used
        last_step = steps[-1] if steps and steps[-1]["layers"] == used else None
        stopped = (last_step["decision"] if last_step else
                   "sure" if conf is not None and conf >= threshold else "all layers")
        sends = [s for s in steps if s["decision"] == "send"]
        record["adaptive"] = {
            "threshold": threshold, "source": source, "budget_ms": budget_ms,
            "stopped_because": stopped, "layers_sent": used, "steps": steps,
            "predicted_ms": sends[-1]["predicted_next_ms"] if sends else None, "rule": RULE}
        if stopped == "budget":
            record["adaptive"]["best_so_far"] = True
            record["note"] = (f"the latency budget of {budget_ms:g} ms ran out after layer {used}: "
                              f"the best answer so far (confidence {conf} < {threshold})")


def stop(answer: dict, elapsed_ms: float, threshold: float, layer_bytes: list[int], link,
         budget_ms: float) -> tuple[dict, str | None]:
    """After the answer to layer j: the step as the record shows it, and why to stop ("sure",
    "budget") or None to send layer j + 1. A backend that cannot tell its confidence (None) is
    never sure: its layers go while the budget fits."""
    j, conf = answer["layers"], answer.get("confidence")
    step = {"layers": j, "confidence": conf, "elapsed_ms": round(elapsed_ms, 3)}
    if conf is not None and conf >= threshold:
        return step | {"decision": "sure"}, "sure"
    predicted = (elapsed_ms + sum(answer["stage_ms"].values())
                 + 1e3 * link.request_time_s(layer_bytes[j]))
    step["predicted_next_ms"] = round(predicted, 3)
    if predicted > budget_ms:
        return step | {"decision": "budget"}, "budget"
    return step | {"decision": "send"}, None
