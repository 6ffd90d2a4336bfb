"""`python -m progvlm bench`: the paper-style experiment in one seeded run.

    1. rate–accuracy   progressive k = 1..L, JPEG q 5..95 at model and camera size, raw fp16
                       tokens, token average-pooling: accuracy and consistency against bytes
    2. latency         every mode at 0.1 … 50 Mbps through the real shaped link to a cloud
                       backend in a child process (loopback HTTP); the stacked breakdown at 1 Mbps
    3. headline        at 1 Mbps: progressive (smallest k with consistency ≥ 0.97) against
                       full-cloud and full-edge in time, against JPEG q90 and raw tokens in bytes
    4. load            cloud throughput and p50/p95 latency with 1, 4 and 16 concurrent clients
    5. floor           the bits the scene's ground truth needs, beside the bytes each k sends

Writes CSV/JSON, PNG plots and a Markdown summary to the results folder.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import threading
import time
from pathlib import Path

import numpy as np

BANDWIDTHS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 50)
JPEG_QUALITIES = (5, 10, 20, 30, 50, 70, 90, 95)
QUICK_JPEG_QUALITIES = (10, 50, 90)
CONCURRENCY = (1, 4, 16)
CONSISTENCY_TARGET = 0.97
AUTO_BUDGET_MS = 150.0


def _write_csv(path: Path, rows: list[dict]):
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (stages per mode)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


# ---- 5. the information floor -----------------------------------------------------------------
def scene_graph_bits(scene) -> float:
    """Bits that name the scene's ground truth: the object count, then per object its colour,
    shape, size and grid cell (what every question here can ask about)."""
    from .scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES
    per_object = math.log2(len(COLOURS)) + math.log2(len(SHAPES)) + math.log2(len(SIZES)) \
        + math.log2(GRID * GRID)
    return math.log2(MAX_OBJECTS) + len(scene.objects) * per_object


# ---- 1. rate–accuracy -------------------------------------------------------------------------
def rate_accuracy(backend, mae, seed: int, questions: int, quick: bool, log) -> tuple[list[dict], dict]:
    from .evaluate import eval_questions, evaluate_mae
    qualities = QUICK_JPEG_QUALITIES if quick else JPEG_QUALITIES
    log(f"rate–accuracy: {questions} questions, JPEG q {qualities} at model and camera size")
    from tqdm import tqdm
    scene_count = len(eval_questions(seed, questions)[0])
    with tqdm(total=scene_count, desc="rate–accuracy", unit="scene") as bar:
        rep = evaluate_mae(backend, mae, seed, questions, progress=bar.update,
                           jpeg_qualities=qualities, camera_jpeg_qualities=qualities)
    rows = [{"method": f"progressive k={r['k']}", "family": "progressive", "bytes": r["bytes_mean"],
             "accuracy": r["accuracy"], "consistency": r["consistency"]} for r in rep["per_k"]]
    for name, b in rep["baselines"].items():
        family = ("jpeg_camera" if name.startswith("jpeg_camera") else "jpeg_model"
                  if name.startswith("jpeg") else "pooling" if name.startswith("pool") else "raw_fp16")
        rows.append({"method": name, "family": family, "bytes": b["bytes_mean"],
                     "accuracy": b["accuracy"], "consistency": b["consistency"]})
    rows.append({"method": "uncompressed tokens", "family": "reference", "bytes": float("nan"),
                 "accuracy": rep["uncompressed"]["accuracy"], "consistency": 1.0})
    scene_list, _ = eval_questions(seed, questions)
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


# ---- 2. latency over the shaped link ----------------------------------------------------------
def latency(runtime, cloud_url: str, images: list[str], k_star: int, L: int, log) -> list[dict]:
    from edge_agent.agent import EdgeAgent
    from edge_agent.profiles import get_profile
    question = "describe the scene ."
    configs = [("full-cloud", {}), ("full-edge", {}), (f"progressive k={k_star}", {"k": k_star}),
               (f"progressive k={L}", {"k": L}), ("auto", {"budget_ms": AUTO_BUDGET_MS})]
    host = EdgeAgent(runtime, cloud_url)
    rows = []
    for bw in BANDWIDTHS:
        log(f"latency at {bw} Mbps")
        for name, extra in configs:
            mode = name.split()[0]
            records = [host.ask(img, question, mode, bandwidth_mbps=bw, rtt_ms=20, **extra) for img in images]
            rows.append(_latency_row(name, "host", bw, records))
    # the emulated device last: its profile runs the runtime with one thread
    imx = EdgeAgent(runtime, cloud_url, profile=get_profile("imx95-emulated"))
    for bw in BANDWIDTHS:
        for name, extra in configs:
            if name == "full-cloud":
                continue
            mode = name.split()[0]
            records = [imx.ask(img, question, mode, bandwidth_mbps=bw, rtt_ms=20, **extra) for img in images]
            rows.append(_latency_row(name, "imx95-emulated (projected)", bw, records))
    runtime.set_threads(runtime.default_threads)
    return rows


def _latency_row(name: str, device: str, bw: float, records: list[dict]) -> dict:
    stages = sorted({s for r in records for s in r["stage_ms"]})
    row = {"mode": name, "device": device, "bandwidth_mbps": bw,
           "total_ms": statistics.median(r["total_ms"] for r in records),
           "payload_bytes": statistics.median(r["payload_bytes"] for r in records),
           "k": statistics.median(r.get("k", 0) for r in records)}
    row["stages"] = {s: statistics.median(r["stage_ms"].get(s, 0.0) for r in records) for s in stages}
    return row


# ---- 4. load ----------------------------------------------------------------------------------
def load_test(runtime, cloud_url: str, images: list[str], k_star: int, seconds: float, log) -> list[dict]:
    """N clients, each sending progressive requests back to back over loopback (no shaping)."""
    from edge_agent.uplink import CloudLink
    from progvlm.images import load_image
    from progvlm.link import LinkProfile
    streams = [runtime.mae_encode(runtime.vision(runtime.preprocess(load_image(p))), k_star) for p in images]
    fast = LinkProfile(10_000.0, 0.0)
    rows = []
    for n in CONCURRENCY:
        log(f"load: {n} concurrent clients for {seconds:.0f} s")
        latencies, failures = [], []
        stop = time.perf_counter() + seconds

        def client(i):
            link = CloudLink(cloud_url)
            j = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    link.progressive(streams[(i + j) % len(streams)], "describe the scene .", fast)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                except Exception as e:  # counted, and the figure says so
                    failures.append(repr(e))
                j += 1
            link.close()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows.append({"clients": n, "requests": len(latencies), "failed": len(failures),
                     "throughput_rps": len(latencies) / wall,
                     "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),
                     "p95_ms": float(np.percentile(latencies, 95)) if latencies else float("nan")})
    return rows


# ---- plots ------------------------------------------------------------------------------------
def plot_rate_accuracy(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"progressive": ("o-", "C0"), "jpeg_model": ("s--", "C1"), "jpeg_camera": ("^--", "C2"),
              "raw_fp16": ("D", "C3"), "pooling": ("x:", "C4")}
    for ax, metric in zip(axes, ("accuracy", "consistency")):
        for family, (style, colour) in styles.items():
            pts = sorted((r["bytes"], r[metric]) for r in rows if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=family.replace("_", " "))
        ref = [r for r in rows if r["family"] == "reference"]
        if ref and metric == "accuracy":
            ax.axhline(ref[0]["accuracy"], color="grey", lw=0.8, ls=":", label="uncompressed")
        ax.set_xscale("log")
        ax.set_xlabel("payload bytes per frame (log)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Rate–accuracy: progressive MAE layers vs JPEG, raw tokens, pooling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in dict.fromkeys((r["mode"], r["device"]) for r in rows):
        pts = [(r["bandwidth_mbps"], r["total_ms"]) for r in rows if (r["mode"], r["device"]) == name]
        ls = "--" if "projected" in name[1] else "-"
        ax.plot(*zip(*pts), ls, marker="o", ms=3, label=f"{name[0]} ({name[1]})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("uplink bandwidth (Mbps, log)")
    ax.set_ylabel("end-to-end ms (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    at1 = [r for r in rows if r["bandwidth_mbps"] == 1]
    stages = list(dict.fromkeys(s for r in at1 for s in r["stages"]))
    labels = [f"{r['mode']}\n{r['device'].replace(' (projected)', '*')}" for r in at1]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    bottom = np.zeros(len(at1))
    for i, s in enumerate(stages):
        vals = np.array([r["stages"].get(s, 0.0) for r in at1])
        ax.bar(labels, vals, bottom=bottom, label=s, color=plt.cm.tab20(i % 20))
        bottom += vals
    ax.set_ylabel("ms")
    ax.set_title("Latency breakdown at 1 Mbps, RTT 20 ms (* imx95-emulated: edge stages projected)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the whole run ----------------------------------------------------------------------------
def run_bench(out: Path, seed: int = 0, quick: bool = False, log=print) -> dict:
    from edge_agent.runtime import PyTorchRuntime
    from progvlm.examples import load_examples
    from progvlm.services import cloud_service
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runtime = PyTorchRuntime.bundled()
    backend, mae = runtime.backend, runtime.mae
    L = mae.cfg.num_layers

    rows, rep = rate_accuracy(backend, mae, seed, 140 if quick else 1000, quick, log)
    _write_csv(out / "rate_accuracy.csv", rows)
    plot_rate_accuracy(rows, out / "rate_accuracy.png")
    k_star = smallest_good_k(rep)

    images = [e["path"] for e in load_examples()][: 1 if quick else 3]
    with cloud_service() as cloud:
        lat = latency(runtime, cloud.url, images, k_star, L, log)
        load = load_test(runtime, cloud.url, images, k_star, 2.0 if quick else 5.0, log)
    _write_csv(out / "latency.csv", [{k: v for k, v in r.items() if k != "stages"} for r in lat])
    _write_csv(out / "breakdown_1mbps.csv", [{"mode": r["mode"], "device": r["device"], **r["stages"]}
                                             for r in lat if r["bandwidth_mbps"] == 1])
    _write_csv(out / "load.csv", load)
    plot_latency(lat, out / "latency_vs_bandwidth.png")
    plot_breakdown(lat, out / "breakdown_1mbps.png")

    def at(mode, device="host", bw=1):
        return next(r for r in lat if r["mode"] == mode and r["device"] == device and r["bandwidth_mbps"] == bw)
    base = rep["baselines"]
    prog = at(f"progressive k={k_star}")
    k_bytes = rep["floor"]["bytes_per_k"][k_star]
    headline = {
        "seed": seed, "quick": quick, "k_star": k_star,
        "k_star_consistency": rep["per_k"][k_star - 1]["consistency"],
        "k_star_accuracy": rep["per_k"][k_star - 1]["accuracy"],
        "uncompressed_accuracy": rep["uncompressed"]["accuracy"],
        "k_star_bytes_mean": k_bytes,
        "time_1mbps_ms": {"progressive": prog["total_ms"], "full_cloud": at("full-cloud")["total_ms"],
                          "full_edge_host": at("full-edge")["total_ms"],
                          "full_edge_imx95_projected": at("full-edge", "imx95-emulated (projected)")["total_ms"],
                          "progressive_imx95_projected": at(f"progressive k={k_star}", "imx95-emulated (projected)")["total_ms"]},
        "bytes_vs_jpeg_q90_model": k_bytes / base["jpeg_q90"]["bytes_mean"],
        "bytes_vs_raw_fp16": k_bytes / base["raw_fp16"]["bytes_mean"],
        "scene_graph_bytes_mean": rep["floor"]["scene_graph_bytes_mean"],
        "load": load,
    }
    t = headline["time_1mbps_ms"]
    headline["progressive_vs_full_cloud_time"] = t["progressive"] / t["full_cloud"]
    headline["progressive_vs_full_edge_host_time"] = t["progressive"] / t["full_edge_host"]
    headline["progressive_vs_full_edge_imx95_time_projected"] = (
        t["progressive_imx95_projected"] / t["full_edge_imx95_projected"])
    headline["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps({"headline": headline, "rate_accuracy": rows,
                                                  "mae_report": rep, "latency": lat, "load": load},
                                                 indent=1, default=float))
    (out / "summary.md").write_text(summary_markdown(headline, rows, lat, load, rep))
    return headline


def summary_markdown(h: dict, rows: list[dict], lat: list[dict], load: list[dict], rep: dict) -> str:
    t = h["time_1mbps_ms"]
    lines = [f"# progvlm bench (seed {h['seed']}{', quick' if h['quick'] else ''})", "",
             f"Smallest k with consistency ≥ {CONSISTENCY_TARGET}: **k = {h['k_star']}** "
             f"({h['k_star_bytes_mean']:.1f} bytes, consistency {h['k_star_consistency']:.3f}, "
             f"accuracy {h['k_star_accuracy']:.3f} vs {h['uncompressed_accuracy']:.3f} uncompressed).", "",
             "## At 1 Mbps, RTT 20 ms (medians; host CPU, measured; projected rows marked)", "",
             "| mode | device | payload bytes | end-to-end ms |", "|---|---|---|---|"]
    for r in (r for r in lat if r["bandwidth_mbps"] == 1):
        lines.append(f"| {r['mode']} | {r['device']} | {r['payload_bytes']:.0f} | {r['total_ms']:.1f} |")
    lines += ["", f"- progressive k={h['k_star']} / full-cloud time: **{h['progressive_vs_full_cloud_time']:.2f}×**",
              f"- progressive / full-edge time (host): **{h['progressive_vs_full_edge_host_time']:.2f}×**",
              f"- progressive / full-edge time (imx95-emulated, projected): "
              f"**{h['progressive_vs_full_edge_imx95_time_projected']:.2f}×**",
              f"- bytes / JPEG q90 at model size: **{100 * h['bytes_vs_jpeg_q90_model']:.2f}%**; "
              f"/ raw fp16 tokens: **{100 * h['bytes_vs_raw_fp16']:.3f}%**",
              f"- scene-graph information floor: {h['scene_graph_bytes_mean']:.1f} bytes per scene "
              f"(ground truth), vs " + ", ".join(f"k={k}: {b:.1f}" for k, b in rep["floor"]["bytes_per_k"].items())
              + " bytes sent (header included)", "",
              "## Rate–accuracy", "", "| method | bytes | accuracy | consistency |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bytes']:.1f} | {r['accuracy']:.3f} | {r['consistency']:.3f} |")
    lines += ["", "## Load (progressive, loopback, no shaping)", "",
              "| clients | requests | failed | req/s | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for r in load:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['throughput_rps']:.1f} "
                     f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    lines += ["", "Latency against bandwidth, all modes:", "",
              "| mode | device | " + " | ".join(f"{b} Mbps" for b in BANDWIDTHS) + " |",
              "|---|---|" + "---|" * len(BANDWIDTHS)]
    for key in dict.fromkeys((r["mode"], r["device"]) for r in lat):
        vals = [f"{r['total_ms']:.0f}" for r in lat if (r["mode"], r["device"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
