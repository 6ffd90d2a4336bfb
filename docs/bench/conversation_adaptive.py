"""Measure adaptive mode and conversations through the real agent and a cloud in its own process.

    python docs/bench/conversation_adaptive.py [--rounds 10] [--out FILE.json]

(a) adaptive vs progressive k = 1 and k = L at 1 Mbps, RTT 20 ms (emulated): per mode the
    median end-to-end time, mean payload bytes and how often the answer is the k = L one, over
    the bundled examples' questions (one round = every example's first question).
(b) five questions about one frame: conversation (frame sent once) vs five independent
    requests, for progressive k = L and adaptive: total bytes and total time.
Host CPU, one thread each; the confidences are the cloud's (the bundled model's calibrated rule
where the build has one; without one every answer is unsure and adaptive sends every layer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent.agent import EdgeAgent  # noqa: E402
from edge_agent.runtime import PyTorchRuntime  # noqa: E402
from progvlm.toyworld.examples import load_examples  # noqa: E402
from progvlm.serve.children import cloud_service  # noqa: E402

LINK = {"bandwidth_mbps": 1.0, "rtt_ms": 20.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    runtime = PyTorchRuntime.load()
    runtime.set_threads(1)
    L = runtime.num_layers
    examples = load_examples()
    out = {"link": LINK, "rounds": a.rounds, "L": L}
    with cloud_service() as cloud:
        agent = EdgeAgent(runtime, cloud.url, cloud.token)
        out["threshold"] = agent.cloud_adaptive
        ask = lambda ex, q, mode, **kw: agent.ask(ex["path"], q, mode, **LINK, **kw)
        for ex in examples:  # warm every path once
            ask(ex, ex["questions"][0]["question"], "adaptive")
        rows = {"k=1": [], f"k={L}": [], "adaptive": []}
        for _ in range(a.rounds):
            for ex in examples:
                q = ex["questions"][0]["question"]
                full = ask(ex, q, "progressive", k=L)
                rows[f"k={L}"].append((full, full["answer"]))
                rows["k=1"].append((ask(ex, q, "progressive", k=1), full["answer"]))
                rows["adaptive"].append((ask(ex, q, "adaptive", budget_ms=2000), full["answer"]))
        out["a"] = {mode: {
            "median_total_ms": round(statistics.median(r["total_ms"] for r, _ in rs), 1),
            "mean_payload_bytes": round(statistics.mean(r["payload_bytes"] for r, _ in rs), 1),
            "mean_layers": round(statistics.mean(r["layers_used"] for r, _ in rs), 2),
            "same_answer_as_k_L": round(statistics.mean(r["answer"] == ref for r, ref in rs), 3),
            "requests": len(rs)} for mode, rs in rows.items()}
        ad = [r for r, _ in rows["adaptive"]]
        out["a"]["adaptive"]["stopped_because"] = {
            why: sum(r["adaptive"]["stopped_because"] == why for r in ad)
            for why in ("sure", "budget", "all layers")}

        out["b"] = {}
        for mode, kw in (("progressive", {"k": L}), ("adaptive", {"budget_ms": 2000})):
            for conversation in (False, True):
                totals = []
                for round_ in range(a.rounds):
                    ex = examples[round_ % len(examples)]
                    agent.frames = type(agent.frames)()  # each round a new frame to the agent
                    records = [ask(ex, q["question"], mode, conversation=conversation, **kw)
                               for q in ex["questions"][:5]]
                    totals.append((sum(r["payload_bytes"] for r in records),
                                   sum(r["total_ms"] for r in records),
                                   [r["payload_bytes"] for r in records]))
                out["b"][f"{mode} {'conversation' if conversation else 'independent'}"] = {
                    "median_bytes_5q": statistics.median(t[0] for t in totals),
                    "median_total_ms_5q": round(statistics.median(t[1] for t in totals), 1),
                    "bytes_per_question_example": totals[0][2]}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
