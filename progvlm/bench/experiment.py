"""`python -m progvlm bench`: the paper-style experiment for the bundled VLM (generated scenes,
exact ground truth), one seeded run of:

    1. rate–accuracy   every codec of the registry (progvlm.eval.codecs): progressive k = 1..L,
                       JPEG q 5..95 at model and camera size, raw fp16 tokens, token
                       average-pooling: accuracy and consistency against bytes
    2. latency         every mode at 0.1 … 50 Mbps through the real shaped link to a cloud
                       backend in a child process (loopback HTTP); the stacked breakdown at 1 Mbps
                       (agent_runs.py)
    3. headline        at 1 Mbps: progressive (smallest k with consistency ≥ 0.97) against
                       full-cloud and full-edge in time, against JPEG q90 and raw tokens in bytes
    4. load            cloud throughput and p50/p95 latency with 1, 4 and 16 concurrent clients
                       (load.py)
    5. floor           the bits the scene's ground truth needs, beside the bytes each k sends

Writes CSV/JSON, PNG plots and a Markdown summary to the results folder (report.py). The edge
agent is driven through its public interface only: a child process
(`progvlm.serve.children.edge_service`) asked over HTTP, so progvlm imports nothing from
edge_agent. Any other VLM: cost.py (`bench --images DIR`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .agent_runs import conversation, conversation_summary, edge_floor, latency, latency_cells
from .load import cloud_load, load_test
from .report import plot_breakdown, plot_latency, plot_rate_accuracy, summary_markdown, write_csv
from .settings import (BANDWIDTHS, CONSISTENCY_TARGET, HEADLINE_MBPS, HEADLINE_RTT_MS,
                       JPEG_QUALITIES, QUICK_BANDWIDTHS, QUICK_JPEG_QUALITIES)
from .video import video_markdown, video_section


# ---- 5. the information floor -----------------------------------------------------------------
def scene_graph_bits(scene) -> float:
    """Bits that name the scene's ground truth: the object count, then per object its colour,
    shape, size and grid cell (what every question here can ask about)."""
    from ..toyworld.scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES
    per_object = math.log2(len(COLOURS)) + math.log2(len(SHAPES)) + math.log2(len(SIZES)) \
        + math.log2(GRID * GRID)
    return math.log2(MAX_OBJECTS) + len(scene.objects) * per_object


# ---- 1. rate–accuracy -------------------------------------------------------------------------
def rate_accuracy(split, seed: int, questions: int, quick: bool, log) -> tuple[list[dict], dict]:
    """Every codec of the registry (JPEG at model and camera size at the bench's qualities) on
    `questions` fresh questions: (plot rows, evaluate_mae's report with the information floor)."""
    from tqdm import tqdm
    from ..eval.codecs import Plan, codecs_for
    from ..eval.evaluate import eval_questions, evaluate_mae
    qualities = QUICK_JPEG_QUALITIES if quick else JPEG_QUALITIES
    codecs = codecs_for(Plan(split.num_layers, qualities, qualities, pooling=True))
    log(f"rate–accuracy: {questions} questions, JPEG q {qualities} at model and camera size")
    scene_list, _ = eval_questions(seed, questions)
    with tqdm(total=len(scene_list), desc="rate–accuracy", unit="scene") as bar:
        rep = evaluate_mae(split, seed, questions, progress=bar.update, codecs=codecs)
    rows = [{"method": f"progressive k={r['k']}", "family": "progressive", "bytes": r["bytes_mean"],
             "accuracy": r["accuracy"], "consistency": r["consistency"]} for r in rep["per_k"]]
    family = {c.name: c.family for c in codecs}
    for name, b in rep["baselines"].items():
        rows.append({"method": name, "family": family[name], "bytes": b["bytes_mean"],
                     "accuracy": b["accuracy"], "consistency": b["consistency"]})
    a = rep["adaptive"]
    rows.append({"method": f"adaptive ({a['rule']} ≥ {a['threshold']:.4f})", "family": "adaptive",
                 "bytes": a["bytes_mean"], "accuracy": a["accuracy"], "consistency": a["consistency"]})
    rows.append({"method": "uncompressed tokens", "family": "reference", "bytes": float("nan"),
                 "accuracy": rep["uncompressed"]["accuracy"], "consistency": 1.0})
    floor_bits = [scene_graph_bits(s) for s in scene_list]
    rep["floor"] = {"scene_graph_bits_mean": float(np.mean(floor_bits)),
                    "scene_graph_bytes_mean": float(np.mean(floor_bits)) / 8,
                    "bytes_per_k": {r["k"]: r["bytes_mean"] for r in rep["per_k"]},
                    "payload_bytes_per_k": {r["k"]: float(sum(r["layer_bytes_mean"]))
                                            for r in rep["per_k"]}}
    return rows, rep


def smallest_good_k(rep: dict) -> int:
    good = [r["k"] for r in rep["per_k"] if r["consistency"] >= CONSISTENCY_TARGET]
    return min(good) if good else rep["L"]


def equal_accuracy_quality(rep: dict, k: int) -> int:
    """The lowest JPEG quality at camera size whose accuracy is at least progressive k's: the
    full-cloud frame that answers as well as the layers it is compared with."""
    target = rep["per_k"][k - 1]["accuracy"]
    good = sorted(int(name.rsplit("q", 1)[1]) for name, b in rep["baselines"].items()
                  if name.startswith("jpeg_camera_q") and b["accuracy"] >= target)
    return good[0] if good else max(JPEG_QUALITIES)


# ---- the whole run ----------------------------------------------------------------------------
def run_bench(out: Path, seed: int = 0, quick: bool = False, link: str = "both", log=print) -> dict:
    """`link`: "emulated" (the agent paces the bytes itself), "kernel" (a namespace and a veth
    shaped by the kernel, progvlm/net/kernel_link.py; needs root) or "both" (the kernel one where the
    machine allows it, and the gap between the two)."""
    from ..toyworld.examples import load_examples
    from ..net.kernel_link import kernel_link, kernel_link_available
    from ..serve.children import cloud_service, edge_service
    from ..split import load_split
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    split = load_split("bundled")
    L = split.num_layers
    kernel_ok, kernel_why = kernel_link_available()
    if link == "kernel" and not kernel_ok:
        raise RuntimeError(f"the kernel link is not available here: {kernel_why}")

    rows, rep = rate_accuracy(split, seed, 140 if quick else 1000, quick, log)
    write_csv(out / "rate_accuracy.csv", rows)
    plot_rate_accuracy(rows, out / "rate_accuracy.png")
    k_star = smallest_good_k(rep)
    q_equal = equal_accuracy_quality(rep, k_star)
    cells = latency_cells(k_star, L, q_equal)

    examples = load_examples()[: 1 if quick else 3]
    images = [e["path"] for e in examples]
    talk: list[dict] = []
    samples, headline_samples = (1, 9) if quick else (3, 15)
    bandwidths = QUICK_BANDWIDTHS if quick else BANDWIDTHS
    lat: list[dict] = []
    load: list[dict] = []
    if link in ("emulated", "both"):
        with cloud_service(vlm="bundled") as cloud, \
                edge_service(cloud.url, cloud_token=cloud.token, profile="host", vlm="bundled") as agent:
            lat += latency(agent.url, agent.token, images, cells, bandwidths, samples, headline_samples,
                           "emulated", log)
            load = load_test(split, cloud.url, cloud.token, images, k_star, 2.0 if quick else 5.0, log)
            if not (link in ("kernel", "both") and kernel_ok):  # else over the kernel link, below
                talk = conversation(agent.url, agent.token, examples, log)
        load += cloud_load(split, images, k_star, 2.0 if quick else 5.0, log, ray=not quick)
    kernel_note = None
    if link in ("kernel", "both") and kernel_ok:
        with kernel_link(HEADLINE_MBPS, HEADLINE_RTT_MS) as kl, \
                cloud_service(vlm="bundled", host=kl.listen_host, port=kl.inner_port, wrap=kl.in_namespace,
                              public_url=kl.cloud_url) as cloud, \
                edge_service(cloud.url, cloud_token=cloud.token, profile="host", vlm="bundled") as agent:
            kernel_note = kl.describe()
            log(kernel_note)
            # the agent's own pacing and delay off: the kernel and the relay do both
            lat += latency(agent.url, agent.token, images, cells, (HEADLINE_MBPS,), samples, headline_samples,
                           "kernel", log, devices=("host",), link_emulation=False)
            talk = conversation(agent.url, agent.token, examples, log, link_emulation=False)
    elif link == "both":
        kernel_note = f"kernel link not run: {kernel_why}"
        log(kernel_note)
    floor = edge_floor(images, log)
    video = video_section(split, kernel_ok and link in ("kernel", "both"), quick, log)
    write_csv(out / "video.csv", [{k: v for k, v in r.items() if k != "stage_ms_mean"} for r in video["rows"]])
    write_csv(out / "latency.csv", [{k: v for k, v in r.items() if k != "stages"} for r in lat])
    write_csv(out / "breakdown_1mbps.csv", [{"mode": r["mode"], "device": r["device"], "link": r["link"],
                                              **r["stages"]} for r in lat if r["bandwidth_mbps"] == HEADLINE_MBPS])
    write_csv(out / "load.csv", load)
    write_csv(out / "conversation.csv", [{k: v for k, v in r.items() if k != "bytes_per_turn"} for r in talk])
    emulated = [r for r in lat if r["link"] == "emulated"]
    if emulated:
        plot_latency(emulated, out / "latency_vs_bandwidth.png")
    plot_breakdown([r for r in lat if r["bandwidth_mbps"] == HEADLINE_MBPS], out / "breakdown_1mbps.png")

    headline_link = "kernel" if any(r["link"] == "kernel" for r in lat) else "emulated"

    def at(mode, device="host", link_name=headline_link):
        return next(r for r in lat if r["mode"] == mode and r["device"] == device
                    and r["link"] == link_name and r["bandwidth_mbps"] == HEADLINE_MBPS)
    base = rep["baselines"]
    prog = at(f"progressive k={k_star}")
    k_bytes = rep["floor"]["bytes_per_k"][k_star]
    versus = {name: _ratio(prog, at(name)) for name, fields in cells
              if fields["mode"] in ("full-cloud", "full-edge")}
    headline = {
        "seed": seed, "quick": quick, "k_star": k_star, "link": headline_link,
        "kernel_link": kernel_note, "equal_accuracy_jpeg_quality": q_equal,
        "samples_per_headline_cell": headline_samples,
        "k_star_consistency": rep["per_k"][k_star - 1]["consistency"],
        "k_star_accuracy": rep["per_k"][k_star - 1]["accuracy"],
        "uncompressed_accuracy": rep["uncompressed"]["accuracy"],
        "k_star_bytes_mean": k_bytes,
        "time_1mbps_ms": {name: at(name)["total_ms"] for name, _ in cells if name != "auto"},
        "progressive_vs": versus,
        "bytes_vs_jpeg_q90_model": k_bytes / base["jpeg_q90"]["bytes_mean"],
        "bytes_vs_jpeg_q90_camera": k_bytes / base["jpeg_camera_q90"]["bytes_mean"],
        "bytes_vs_raw_fp16": k_bytes / base["raw_fp16"]["bytes_mean"],
        "scene_graph_bytes_mean": rep["floor"]["scene_graph_bytes_mean"],
        "edge_floor": floor,
        "adaptive": {**{k: v for k, v in rep["adaptive"].items() if not k.startswith("reliability")},
                     "ece": rep["adaptive"]["reliability"]["ece"],
                     "k_L_accuracy": rep["adaptive"][f"k{L}_accuracy"]},
        "conversation": conversation_summary(talk) if talk else [],
        "load": load,
        "video": video,
    }
    if emulated:
        prog_imx = at(f"progressive k={k_star}", "imx95-emulated (projected)", "emulated")
        edge_imx = at("full-edge", "imx95-emulated (projected)", "emulated")
        headline["progressive_vs_full_edge_imx95_projected"] = _ratio(prog_imx, edge_imx)
    if headline_link == "kernel" and emulated:  # the gap: what the emulation misses (or adds)
        headline["kernel_vs_emulated"] = {
            name: {"kernel_ms": at(name)["total_ms"], "emulated_ms": at(name, link_name="emulated")["total_ms"],
                   "ratio": at(name)["total_ms"] / at(name, link_name="emulated")["total_ms"]}
            for name, _ in cells if name != "full-edge"}
    headline["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps({"headline": headline, "rate_accuracy": rows,
                                                  "mae_report": rep, "latency": lat, "load": load},
                                                 indent=1, default=float))
    (out / "summary.md").write_text(summary_markdown(headline, rows, lat, load, rep) + "\n"
                                    + video_markdown(video))
    return headline


def _ratio(a: dict, b: dict) -> dict:
    """a's median time over b's, with the widest ratio the two interquartile ranges allow."""
    return {"ratio": a["total_ms"] / b["total_ms"],
            "low": a["total_ms_q25"] / b["total_ms_q75"], "high": a["total_ms_q75"] / b["total_ms_q25"]}
