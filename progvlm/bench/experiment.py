"""`python -m progvlm bench`: the paper-style experiment for the bundled VLM, and a cost
profile for any VLM.

With the bundled VLM (generated scenes, exact ground truth), one seeded run of:

    1. rate–accuracy   progressive k = 1..L, JPEG q 5..95 at model and camera size, raw fp16
                       tokens, token average-pooling: accuracy and consistency against bytes
    2. latency         every mode at 0.1 … 50 Mbps through the real shaped link to a cloud
                       backend in a child process (loopback HTTP); the stacked breakdown at 1 Mbps
    3. headline        at 1 Mbps: progressive (smallest k with consistency ≥ 0.97) against
                       full-cloud and full-edge in time, against JPEG q90 and raw tokens in bytes
    4. load            cloud throughput and p50/p95 latency with 1, 4 and 16 concurrent clients
    5. floor           the bits the scene's ground truth needs, beside the bytes each k sends

Writes CSV/JSON, PNG plots and a Markdown summary to the results folder. The edge agent is
driven through its public interface only: a child process (`progvlm.serve.children.edge_service`)
asked over HTTP, so progvlm imports nothing from edge_agent.

With `--images DIR` (any VLM; the only choice for a non-bundled one): `run_cost_profile`, the
cost profile measured on this host (no ground truth, so no accuracy): edge vision time, LM
time per generated token, MAE encode share of the edge, wire bytes per k, JPEG bytes at
camera and model size, and end-to-end times of full-edge / full-cloud / progressive computed
from the measured stage times at any bandwidth, per device profile (handed in by the caller,
e.g. edge_agent.profiles: host, imx95-emulated, imx95-npu-projected), with the bandwidths
where the fastest mode changes.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
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
ADAPTIVE_BUDGET_MS = 500.0  # adaptive's: the agent's default budget
CONVERSATION_TURNS = 5


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
    from ..toyworld.scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES
    per_object = math.log2(len(COLOURS)) + math.log2(len(SHAPES)) + math.log2(len(SIZES)) \
        + math.log2(GRID * GRID)
    return math.log2(MAX_OBJECTS) + len(scene.objects) * per_object


# ---- 1. rate–accuracy -------------------------------------------------------------------------
def rate_accuracy(split, seed: int, questions: int, quick: bool, log) -> tuple[list[dict], dict]:
    from ..eval.evaluate import eval_questions, evaluate_mae
    qualities = QUICK_JPEG_QUALITIES if quick else JPEG_QUALITIES
    log(f"rate–accuracy: {questions} questions, JPEG q {qualities} at model and camera size")
    from tqdm import tqdm
    scene_count = len(eval_questions(seed, questions)[0])
    with tqdm(total=scene_count, desc="rate–accuracy", unit="scene") as bar:
        rep = evaluate_mae(split, seed, questions, progress=bar.update,
                           jpeg_qualities=qualities, camera_jpeg_qualities=qualities)
    rows = [{"method": f"progressive k={r['k']}", "family": "progressive", "bytes": r["bytes_mean"],
             "accuracy": r["accuracy"], "consistency": r["consistency"]} for r in rep["per_k"]]
    for name, b in rep["baselines"].items():
        family = ("jpeg_camera" if name.startswith("jpeg_camera") else "jpeg_model"
                  if name.startswith("jpeg") else "pooling" if name.startswith("pool") else "raw_fp16")
        rows.append({"method": name, "family": family, "bytes": b["bytes_mean"],
                     "accuracy": b["accuracy"], "consistency": b["consistency"]})
    a = rep["adaptive"]
    rows.append({"method": f"adaptive ({a['rule']} ≥ {a['threshold']:.4f})", "family": "adaptive",
                 "bytes": a["bytes_mean"], "accuracy": a["accuracy"], "consistency": a["consistency"]})
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
HEADLINE_MBPS, HEADLINE_RTT_MS = 1.0, 20.0
QUICK_BANDWIDTHS = (0.1, 1, 10)


def equal_accuracy_quality(rep: dict, k: int) -> int:
    """The lowest JPEG quality at camera size whose accuracy is at least progressive k's: the
    full-cloud frame that answers as well as the layers it is compared with."""
    target = rep["per_k"][k - 1]["accuracy"]
    good = sorted(int(name.rsplit("q", 1)[1]) for name, b in rep["baselines"].items()
                  if name.startswith("jpeg_camera_q") and b["accuracy"] >= target)
    return good[0] if good else max(JPEG_QUALITIES)


def latency_cells(k_star: int, L: int, q_equal: int) -> list[tuple[str, dict]]:
    """(row name, /v1/ask form fields) of every configuration the latency sweep asks."""
    return [("full-cloud camera q90", {"mode": "full-cloud", "frame": "camera", "jpeg_quality": 90}),
            ("full-cloud model-size q90", {"mode": "full-cloud", "frame": "model", "jpeg_quality": 90}),
            (f"full-cloud camera q{q_equal} (equal accuracy)",
             {"mode": "full-cloud", "frame": "camera", "jpeg_quality": q_equal}),
            ("full-edge", {"mode": "full-edge"}),
            (f"progressive k={k_star}", {"mode": "progressive", "k": k_star}),
            (f"progressive k={L}", {"mode": "progressive", "k": L}),
            ("auto", {"mode": "auto", "budget_ms": AUTO_BUDGET_MS}),
            ("adaptive", {"mode": "adaptive", "budget_ms": ADAPTIVE_BUDGET_MS})]


@functools.lru_cache(maxsize=16)
def _raw_frame(path: str) -> tuple[bytes, int, int]:
    """An image file's pixels as a camera frame: RGB24 bytes, width, height."""
    from ..images import load_image
    image = load_image(path)
    return np.asarray(image).tobytes(), image.size[0], image.size[1]


def ask_agent(http, image_path, question: str, mode: str, bandwidth_mbps: float, rtt_ms: float,
              **options) -> dict:
    """One request to the edge agent's HTTP API (POST /v1/ask, edge_agent/service.py) → its record."""
    form = {"question": question, "mode": mode, "bandwidth_mbps": str(bandwidth_mbps),
            "rtt_ms": str(rtt_ms)}
    form.update({name: str(v) for name, v in options.items() if v is not None})
    # the camera's raw pixels, as a camera delivers them: no file to decode on the device
    pixels, width, height = _raw_frame(str(image_path))
    form.update(image_format="rgb24", width=str(width), height=str(height))
    r = http.post("/v1/ask", files={"image": ("frame.rgb", pixels)}, data=form)
    if r.status_code != 200:
        raise RuntimeError(f"edge agent refused {mode} at {bandwidth_mbps} Mbps: "
                           f"{r.status_code} {r.text[:300]}")
    return r.json()


def latency(agent_url: str, token: str | None, images: list[str], cells: list[tuple[str, dict]],
            bandwidths, samples: int, headline_samples: int, link_name: str, log,
            devices=("host", "imx95-emulated"), **link_options) -> list[dict]:
    """Every cell at every bandwidth, asked of the edge agent at `agent_url`, `samples` times
    (`headline_samples` at the headline bandwidth), cycling through the images; under the
    host profile and then the imx95-emulated one (edge stages projected). One warm-up request
    per cell is not counted (it opens the session, as a device does once)."""
    import httpx
    question = "describe the scene ."
    rows = []
    labels = {"host": "host", "imx95-emulated": "imx95-emulated (projected)"}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=agent_url, timeout=180.0, headers=headers) as http:
        for device in devices:
            for bw in bandwidths:
                n = headline_samples if bw == HEADLINE_MBPS else samples
                log(f"latency at {bw} Mbps ({link_name} link, {labels[device]}): {n} per cell")
                for name, fields in cells:
                    if fields["mode"] == "full-cloud" and device != "host":
                        continue  # nothing of full-cloud runs on the device's compute
                    fields = {**fields, **link_options}
                    mode = fields.pop("mode")
                    ask = lambda i: ask_agent(http, images[i % len(images)], question, mode, bw,
                                              HEADLINE_RTT_MS, device_profile=device, **fields)
                    ask(0)
                    records = [ask(i) for i in range(n)]
                    rows.append(_latency_row(name, labels[device], bw, records, link_name))
    return rows


def _latency_row(name: str, device: str, bw: float, records: list[dict], link_name: str) -> dict:
    stages = sorted({s for r in records for s in r["stage_ms"]})
    totals = [r["total_ms"] for r in records]
    q25, q75 = (float(np.percentile(totals, q)) for q in (25, 75))
    row = {"mode": name, "device": device, "link": link_name, "bandwidth_mbps": bw,
           "samples": len(records), "total_ms": statistics.median(totals),
           "total_ms_q25": q25, "total_ms_q75": q75,
           "payload_bytes": statistics.median(r["payload_bytes"] for r in records),
           "k": statistics.median(r.get("k", 0) for r in records)}
    row["stages"] = {s: statistics.median(r["stage_ms"].get(s, 0.0) for r in records) for s in stages}
    return row


# ---- 3a. a conversation about one frame -------------------------------------------------------
def conversation(agent_url: str, token: str | None, examples: list[dict], log, **link_options) -> list[dict]:
    """Five questions about each frame, asked as one conversation (the cloud keeps the frame's
    layers) and as five independent requests, in adaptive mode and progressive k = L, at the
    headline link: total bytes and summed end-to-end time per frame."""
    import httpx
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows = []
    with httpx.Client(base_url=agent_url, timeout=180.0, headers=headers) as http:
        for mode, extra in (("adaptive", {"budget_ms": ADAPTIVE_BUDGET_MS}), ("progressive", {})):
            for together in (False, True):
                log(f"conversation: {mode}, {'one conversation' if together else 'independent requests'}")
                for ex in examples:
                    questions = [q["question"] for q in ex["questions"]][:CONVERSATION_TURNS]
                    # each conversation starts afresh (the cloud may hold the frame from another)
                    records = [ask_agent(http, ex["path"], q, mode, HEADLINE_MBPS, HEADLINE_RTT_MS,
                                         conversation=str(together).lower(),
                                         new_conversation=str(together and i == 0).lower(),
                                         **extra, **link_options)
                               for i, q in enumerate(questions)]
                    sent = [r.get("bytes_sent_this_turn", r["payload_bytes"]) for r in records]
                    correct = [r["answer"] == q["answer"] for r, q in zip(records, ex["questions"])]
                    rows.append({"mode": mode, "conversation": together, "frame": Path(ex["path"]).name,
                                 "turns": len(records), "bytes_total": sum(sent), "bytes_per_turn": sent,
                                 "time_total_ms": sum(r["total_ms"] for r in records),
                                 "correct": sum(correct)})
    return rows


def conversation_summary(rows: list[dict]) -> list[dict]:
    """Medians over frames per (mode, conversation)."""
    out = []
    for key in dict.fromkeys((r["mode"], r["conversation"]) for r in rows):
        group = [r for r in rows if (r["mode"], r["conversation"]) == key]
        out.append({"mode": key[0], "conversation": key[1], "frames": len(group),
                    "bytes_total": statistics.median(r["bytes_total"] for r in group),
                    "time_total_ms": statistics.median(r["time_total_ms"] for r in group),
                    "correct_rate": sum(r["correct"] for r in group) / sum(r["turns"] for r in group),
                    "bytes_per_turn_example": group[0]["bytes_per_turn"]})
    return out


# ---- 3b. the edge near its floor --------------------------------------------------------------
def edge_floor(images: list[str], log) -> dict:
    """The edge half's stages on raw camera frames, PyTorch and ONNX Runtime, each measured by
    `python -m edge_agent profile` in a child process (the ONNX models exported to a temporary
    folder first): {"pytorch": {…}, "onnxruntime": {…}}."""
    import subprocess
    import sys
    import tempfile
    out = {}
    with tempfile.TemporaryDirectory() as onnx_dir:
        subprocess.run([sys.executable, "-m", "edge_agent", "export", "--out", onnx_dir],
                       check=True, capture_output=True, text=True)
        for runtime, extra in (("pytorch", []), ("onnxruntime", ["--runtime", "onnx", "--model-dir", onnx_dir])):
            log(f"edge floor: {runtime} on raw frames")
            r = subprocess.run([sys.executable, "-m", "edge_agent", "profile", "--images", *images, *extra],
                               check=True, capture_output=True, text=True)
            out[runtime] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def cloud_load(split, images, k_star: int, seconds: float, log, ray: bool) -> list[dict]:
    """The load test against the batching cloud (`serve-cloud --batching`) and, with `ray` and
    Ray Serve installed, against `serve-cloud-ray` (one replica, @serve.batch)."""
    import importlib.util
    from ..serve.children import ChildService, cloud_service, free_port, new_token
    with cloud_service(vlm="bundled", batching=True) as cloud:
        rows = load_test(split, cloud.url, cloud.token, images, k_star, seconds, log,
                         "one process, batched")
    if ray and importlib.util.find_spec("ray") is not None:
        port, token = free_port(), new_token()
        service = ChildService("cloud on Ray Serve", ["-m", "progvlm", "serve-cloud-ray", "--port", str(port)],
                               f"http://127.0.0.1:{port}", {"PROGVLM_CLOUD_TOKEN": token}, token)
        log("load: starting Ray Serve (a local Ray instance, one replica)")
        try:
            service.start(timeout_s=300)
            rows += load_test(split, service.url, token, images, k_star, seconds, log,
                              "Ray Serve, 1 replica, @serve.batch")
        finally:
            service.stop()
    return rows


# ---- 4. load ----------------------------------------------------------------------------------
def load_test(split, cloud_url: str, cloud_token: str | None, images: list[str], k_star: int,
              seconds: float, log, backend: str = "one process, one request at a time") -> list[dict]:
    """N clients, each sending progressive requests back to back over loopback (no shaping),
    each over its own kept-open session."""
    from ..images import load_image
    from ..net.link import LinkProfile
    from ..net.transport import CloudLink
    streams = [split.pack(split.edge(load_image(p), k_star)) for p in images]
    fast = LinkProfile(10_000.0, 0.0)
    rows = []
    for n in CONCURRENCY:
        log(f"load ({backend}): {n} concurrent clients for {seconds:.0f} s")
        latencies, failures = [], []
        stop = time.perf_counter() + seconds

        def client(i):
            link = CloudLink(cloud_url, cloud_token)
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
        rows.append({"backend": backend, "clients": n, "requests": len(latencies), "failed": len(failures),
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
              "raw_fp16": ("D", "C3"), "pooling": ("x:", "C4"), "adaptive": ("*", "C6")}
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
    at1 = rows
    stages = list(dict.fromkeys(s for r in at1 for s in r["stages"]))
    labels = [f"{r['mode']}\n{r['device'].replace(' (projected)', '*')}, {r['link']}" for r in at1]
    fig, ax = plt.subplots(figsize=(14, 5.2))
    bottom = np.zeros(len(at1))
    for i, s in enumerate(stages):
        vals = np.array([r["stages"].get(s, 0.0) for r in at1])
        ax.bar(labels, vals, bottom=bottom, label=s, color=plt.cm.tab20(i % 20))
        bottom += vals
    ax.set_ylabel("ms")
    ax.set_title(f"Latency breakdown at {HEADLINE_MBPS:g} Mbps, RTT {HEADLINE_RTT_MS:g} ms "
                 "(* imx95-emulated: edge stages projected)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    _write_csv(out / "rate_accuracy.csv", rows)
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
                           "kernel", log, devices=("host",), link_emulation="off")
            talk = conversation(agent.url, agent.token, examples, log, link_emulation="off")
    elif link == "both":
        kernel_note = f"kernel link not run: {kernel_why}"
        log(kernel_note)
    floor = edge_floor(images, log)
    _write_csv(out / "latency.csv", [{k: v for k, v in r.items() if k != "stages"} for r in lat])
    _write_csv(out / "breakdown_1mbps.csv", [{"mode": r["mode"], "device": r["device"], "link": r["link"],
                                              **r["stages"]} for r in lat if r["bandwidth_mbps"] == HEADLINE_MBPS])
    _write_csv(out / "load.csv", load)
    _write_csv(out / "conversation.csv", [{k: v for k, v in r.items() if k != "bytes_per_turn"} for r in talk])
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
    (out / "summary.md").write_text(summary_markdown(headline, rows, lat, load, rep))
    return headline


def _ratio(a: dict, b: dict) -> dict:
    """a's median time over b's, with the widest ratio the two interquartile ranges allow."""
    return {"ratio": a["total_ms"] / b["total_ms"],
            "low": a["total_ms_q25"] / b["total_ms_q75"], "high": a["total_ms_q75"] / b["total_ms_q25"]}


def summary_markdown(h: dict, rows: list[dict], lat: list[dict], load: list[dict], rep: dict) -> str:
    lines = [f"# progvlm bench (seed {h['seed']}{', quick' if h['quick'] else ''})", "",
             f"Smallest k with consistency ≥ {CONSISTENCY_TARGET}: **k = {h['k_star']}** "
             f"({h['k_star_bytes_mean']:.1f} bytes, consistency {h['k_star_consistency']:.3f}, "
             f"accuracy {h['k_star_accuracy']:.3f} vs {h['uncompressed_accuracy']:.3f} uncompressed). "
             f"Equal accuracy for JPEG at camera size (512 px): q{h['equal_accuracy_jpeg_quality']}.", "",
             f"## At {HEADLINE_MBPS:g} Mbps, RTT {HEADLINE_RTT_MS:g} ms", "",
             f"Link: {h['kernel_link'] or 'emulated by the agent (paced bytes, slept RTT)'}. "
             f"Medians of {h['samples_per_headline_cell']} requests per row (interquartile range in "
             "brackets) over one persistent session; host CPU, measured; projected rows marked.", "",
             "| mode | device | link | payload bytes | end-to-end ms |", "|---|---|---|---|---|"]
    for r in (r for r in lat if r["bandwidth_mbps"] == HEADLINE_MBPS):
        lines.append(f"| {r['mode']} | {r['device']} | {r['link']} | {r['payload_bytes']:.0f} | "
                     f"{r['total_ms']:.1f} [{r['total_ms_q25']:.1f}–{r['total_ms_q75']:.1f}] |")
    lines += ["", f"Progressive k={h['k_star']} against ({h['link']} link; ratio of medians, and the "
              "range the interquartile ranges allow):", ""]
    for name, v in h["progressive_vs"].items():
        verdict = "faster" if v["high"] < 1 else "slower" if v["low"] > 1 else "not separable"
        lines.append(f"- {name}: **{v['ratio']:.2f}×** [{v['low']:.2f}–{v['high']:.2f}] ({verdict})")
    if "progressive_vs_full_edge_imx95_projected" in h:
        v = h["progressive_vs_full_edge_imx95_projected"]
        lines.append(f"- full-edge on imx95-emulated (projected): **{v['ratio']:.2f}×** "
                     f"[{v['low']:.2f}–{v['high']:.2f}]")
    if "kernel_vs_emulated" in h:
        lines += ["", "Kernel link against the agent's emulation (median ms):", "",
                  "| mode | kernel | emulated | kernel / emulated |", "|---|---|---|---|"]
        for name, v in h["kernel_vs_emulated"].items():
            lines.append(f"| {name} | {v['kernel_ms']:.1f} | {v['emulated_ms']:.1f} | {v['ratio']:.2f} |")
    lines += ["", f"- bytes / JPEG q90 at model size: **{100 * h['bytes_vs_jpeg_q90_model']:.2f}%**; at camera "
              f"size: **{100 * h['bytes_vs_jpeg_q90_camera']:.3f}%**; / raw fp16 tokens: "
              f"**{100 * h['bytes_vs_raw_fp16']:.3f}%**",
              f"- scene-graph information floor: {h['scene_graph_bytes_mean']:.1f} bytes per scene "
              f"(ground truth), vs " + ", ".join(f"k={k}: {b:.1f}" for k, b in rep["floor"]["bytes_per_k"].items())
              + " bytes sent (header included)", "",
              "## The edge half on raw camera frames (host CPU, 1 thread, measured)", "",
              "| runtime | preprocess ms | vision ms | MAE k=1 ms | MAE k=L ms | MAE share k=1 | MAE share k=L |",
              "|---|---|---|---|---|---|---|"]
    for name, f in h["edge_floor"].items():
        L = f["L"]
        lines.append(f"| {name} | {f['edge_preprocess_ms']:.2f} | {f['edge_vision_ms']:.2f} | "
                     f"{f['mae_encode_k1_ms']:.3f} | {f[f'mae_encode_k{L}_ms']:.3f} | "
                     f"{100 * f['mae_share_of_edge_k1']:.1f}% | {100 * f[f'mae_share_of_edge_k{L}']:.1f}% |")
    a = h["adaptive"]
    lines += ["", "## Adaptive: layers sent until the answer is sure", "",
              f"Rule: {a['rule']} ≥ {a['threshold']:.4f} (calibrated on the training stream). On the "
              f"evaluation stream: {a['bytes_mean']:.1f} bytes per question = {a['bytes_ratio_to_k1']:.2f}× "
              f"k = 1's, accuracy {a['accuracy']:.3f} against k = L's {a['k_L_accuracy']:.3f}, mean "
              f"layers {a['mean_layers']:.2f}, ECE {a['ece']:.3f}; goal (k = L's accuracy at ≤ "
              f"{a['budget']}× k = 1's bytes) {'met' if a['goal_met'] else 'not met'}."]
    if h["conversation"]:
        lines += ["", f"Five questions about one frame ({h['link']} link, {HEADLINE_MBPS:g} Mbps, RTT "
                  f"{HEADLINE_RTT_MS:g} ms; medians over frames):", "",
                  "| mode | asked as | bytes in all | summed end-to-end ms | correct | bytes per turn (first frame) |",
                  "|---|---|---|---|---|---|"]
        for r in h["conversation"]:
            lines.append(f"| {r['mode']} | {'one conversation' if r['conversation'] else 'five requests'} | "
                         f"{r['bytes_total']:.0f} | {r['time_total_ms']:.0f} | {r['correct_rate']:.2f} | "
                         f"{', '.join(map(str, r['bytes_per_turn_example']))} |")
    lines += ["", "## Rate–accuracy", "", "| method | bytes | accuracy | consistency |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bytes']:.1f} | {r['accuracy']:.3f} | {r['consistency']:.3f} |")
    lines += ["", "## Cloud load (progressive k*, loopback, no shaping, one kept-open session per client)", "",
              "| cloud | clients | requests | failed | req/s | × one client | p50 ms | p95 ms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in load:
        one = next(x for x in load if x["backend"] == r["backend"] and x["clients"] == 1)
        lines.append(f"| {r['backend']} | {r['clients']} | {r['requests']} | {r['failed']} | "
                     f"{r['throughput_rps']:.1f} | {r['throughput_rps'] / one['throughput_rps']:.2f} "
                     f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    emulated = [r for r in lat if r["link"] == "emulated"]
    bws = sorted({r["bandwidth_mbps"] for r in emulated})
    lines += ["", "Latency against bandwidth, all modes (emulated link, medians):", "",
              "| mode | device | " + " | ".join(f"{b:g} Mbps" for b in bws) + " |",
              "|---|---|" + "---|" * len(bws)]
    for key in dict.fromkeys((r["mode"], r["device"]) for r in emulated):
        vals = [f"{r['total_ms']:.0f}" for r in emulated if (r["mode"], r["device"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(vals) + " |")
    lines += ["", f"Bench run time: {h['bench_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# ---- any VLM: the cost profile (timing and bytes, no ground truth) -----------------------------
COST_QUESTION = "Describe the image."
ANSWER_TOKENS = 16  # generated tokens per answer in the end-to-end model (an assumption)
COST_RTT_MS = 20.0
REPLY_BYTES = 250  # a JSON answer on the downlink (the agent's own estimate)
COST_BANDWIDTHS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100)
COST_JPEG_QUALITY = 90  # full-cloud's JPEG, as the agent sends it
CROSSOVER_RANGE_MBPS = (0.01, 10_000.0)


def vision_macs(vlm, model_input) -> float:
    """Multiply-accumulates of one vision forward (encoder + connector), counted by
    torch.utils.flop_counter with attention on its math path so that its matmuls count too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vlm.vision(model_input)
    return counter.get_total_flops() / 2


def language_timing(vlm, tokens, grid, question: str, max_new_tokens: int = 32) -> dict:
    """One greedy answer from visual tokens: prefill ms (up to the second forward call) and the
    median ms per further generated token (between consecutive forward calls of the model,
    i.e. one decoding step with its sampling overhead)."""
    import torch
    starts: list[float] = []
    model = getattr(vlm, "model", None)
    hook = (model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
            if isinstance(model, torch.nn.Module) else None)
    t0 = time.perf_counter()
    try:
        answer = vlm.cloud_half(tokens, question, max_new_tokens, grid=grid)
    finally:
        if hook is not None:
            hook.remove()
    t1 = time.perf_counter()
    if len(starts) >= 3:
        steps = [b - a for a, b in zip(starts[1:], starts[2:])] + [t1 - starts[-1]]
        prefill, per_token, generated = starts[1] - t0, statistics.median(steps), len(starts)
    else:  # a backend whose generation the hook cannot see: the mean over its tokens
        generated = max(1, len(answer.token_ids))
        prefill = per_token = (t1 - t0) / generated
    return {"prefill_ms": prefill * 1e3, "per_token_ms": per_token * 1e3,
            "generated_tokens": generated}


def _timed(fn, *args):
    """fn(*args) and its wall time in ms (GPU work included: synchronised before and after)."""
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, (time.perf_counter() - t0) * 1e3


CHEAP_STAGE_REPEATS = 7


def _timed_best(fn, *args, repeats: int = CHEAP_STAGE_REPEATS):
    """_timed for stages of a few ms (MAE, JPEG): the best of `repeats` runs (as timeit does).
    On a shared host a stage this short is often preempted whole (measured here: MAE encode
    2-3 ms undisturbed, 12-16 ms in a busy second), and preemption only ever adds time."""
    runs = [_timed(fn, *args) for _ in range(repeats)]
    return runs[-1][0], min(ms for _, ms in runs)


def measure_costs(split, image_paths, edge_threads: int = 1, max_new_tokens: int = 32,
                  cloud_split=None, cloud_threads: int | None = None, log=print) -> dict:
    """Per image, on this host: the edge's stages with `edge_threads` threads (what the device
    profiles scale), the cloud's stages with `cloud_threads` (default: as many as the edge; on
    a shared 2-core host more threads only wait for each other) on `cloud_split` (the same VLM
    and MAE, e.g. loaded on a GPU; default: `split`, this CPU standing in for the server), and
    the bytes of every payload. Returns medians over the images (stages of a few ms: of the
    best of CHEAP_STAGE_REPEATS runs per image)."""
    import torch

    from ..images import ImageInputError, encode_jpeg, load_image, resize_for_model
    from ..split import Frame
    vlm, mae, L = split.vlm, split.mae, split.num_layers
    cloud = cloud_split or split
    if cloud.fingerprint != split.fingerprint or cloud.vlm.model_id != vlm.model_id:
        raise ValueError("the cloud's split must hold the edge's VLM and MAE")
    threads_before = torch.get_num_threads()
    cloud_threads = cloud_threads or edge_threads
    # the cloud on this very CPU with the edge's threads: its vision and language model are the
    # edge's measurement (timing them twice only adds noise between two equal figures)
    same_compute = cloud_split is None and cloud_threads == edge_threads
    images, skipped = [], []
    for p in image_paths:
        try:
            images.append(load_image(p))
        except ImageInputError as e:
            skipped.append(f"{p}: {e}")
            log(f"cost profile: skipping {p}: {e}")
    if not images:
        raise ValueError("no readable images to measure: " + "; ".join(skipped[:3]))
    rows = []
    try:
        for i, image in enumerate([images[0]] + images):  # the first pass only warms up
            r: dict = {}
            torch.set_num_threads(edge_threads)
            x, r["edge_preprocess_ms"] = _timed(vlm.preprocess, image)
            (tokens, grid), r["edge_vision_ms"] = _timed(vlm.vision, x)
            tokens = tokens.float()
            best = {k: math.inf for k in range(1, L + 1)}
            for _ in range(CHEAP_STAGE_REPEATS):  # every k sampled across the same stretch of time
                for k in best:
                    layers, ms = _timed(mae.compress, tokens, k)
                    best[k] = min(best[k], ms)
            r.update({f"mae_encode_k{k}_ms": ms for k, ms in best.items()})
            wire = {k: split.pack(Frame(layers[:k], tokens.shape[0], grid)) for k in range(1, L + 1)}
            jpeg_model, r["jpeg_model_encode_ms"] = _timed_best(
                lambda: encode_jpeg(resize_for_model(image, vlm.input_size), COST_JPEG_QUALITY))
            jpeg_camera, r["jpeg_camera_encode_ms"] = _timed_best(encode_jpeg, image, COST_JPEG_QUALITY)
            edge_lm = language_timing(vlm, tokens, grid, COST_QUESTION, max_new_tokens)
            r["edge_lm_prefill_ms"], r["edge_lm_per_token_ms"] = edge_lm["prefill_ms"], edge_lm["per_token_ms"]
            torch.set_num_threads(cloud_threads)
            for name, data in (("model", jpeg_model), ("camera", jpeg_camera)):
                decoded, r[f"cloud_jpeg_{name}_decode_ms"] = _timed_best(load_image, data)
                x_c, r[f"cloud_preprocess_{name}_ms"] = _timed(cloud.vlm.preprocess, decoded)
            r["cloud_vision_ms"] = (r["edge_vision_ms"] if same_compute
                                    else _timed(cloud.vlm.vision, x_c)[1])
            for k in range(1, L + 1):
                _, r[f"cloud_mae_decode_k{k}_ms"] = _timed_best(cloud.decode, cloud.unpack(wire[k]))
            cloud_lm = (edge_lm if same_compute else
                        language_timing(cloud.vlm, tokens, grid, COST_QUESTION, max_new_tokens))
            r["cloud_lm_prefill_ms"], r["cloud_lm_per_token_ms"] = cloud_lm["prefill_ms"], cloud_lm["per_token_ms"]
            r["generated_tokens"] = cloud_lm["generated_tokens"]
            r.update({f"wire_bytes_k{k}": len(w) for k, w in wire.items()},
                     jpeg_camera_bytes=len(jpeg_camera), jpeg_model_bytes=len(jpeg_model),
                     raw_fp16_bytes=tokens.numel() * 2, num_tokens=tokens.shape[0],
                     camera_pixels=image.size[0] * image.size[1])
            if i == 0:
                macs = vision_macs(vlm, x)  # once: the count does not depend on the pixels
                continue
            rows.append(r)
            log(f"cost profile: image {i}/{len(images)}: vision {r['edge_vision_ms']:.0f} ms "
                f"(edge, {edge_threads} thread), {r['wire_bytes_k1']}–{r[f'wire_bytes_k{L}']} bytes")
    finally:
        torch.set_num_threads(threads_before)
    med = {key: float(statistics.median(r[key] for r in rows)) for key in rows[0]}
    med["mae_encode_ms"] = med[f"mae_encode_k{L}_ms"]
    # the edge half starts from the decoded frame (a camera's pixels: file decoding is not the
    # device's work); MAE encode codes only the layers sent, so its share depends on k
    for k, suffix in ((L, ""), (1, "_k1")):
        mae_ms = med[f"mae_encode_k{k}_ms"]
        med[f"mae_encode_share_of_edge{suffix}"] = mae_ms / (
            med["edge_preprocess_ms"] + med["edge_vision_ms"] + mae_ms)
    med["vision_macs"] = macs
    model = getattr(cloud.vlm, "model", None)
    med["cloud_device"] = str(next(model.parameters()).device) if model is not None else "cpu"
    med.update(cloud_compute="the edge's measurement (same CPU, same threads)" if same_compute
               else "measured separately", images=len(rows), skipped=skipped, L=L,
               edge_threads=edge_threads, cloud_threads=cloud_threads, model_input_size=vlm.input_size,
               camera_size=[int(statistics.median(im.size[0] for im in images)),
                            int(statistics.median(im.size[1] for im in images))])
    return med


def _link_ms(nbytes: float, bandwidth_mbps: float) -> float:
    return nbytes * 8 / (bandwidth_mbps * 1e3)


def mode_stages(costs: dict, profile, mode: str, bandwidth_mbps: float,
                rtt_ms: float = COST_RTT_MS, answer_tokens: int = ANSWER_TOKENS,
                cloud_scale: float = 1.0) -> dict:
    """The stage times (ms) of one mode at one bandwidth: edge stages through `profile`
    (its stage_ms(stage, host_ms, vision_macs)), link stages from the bytes, cloud stages as
    measured × `cloud_scale` (0: an ideal cloud whose compute costs nothing, the bound that
    favours full-cloud most). `mode`: full-edge, full-cloud (model-size JPEG, as the agent
    sends), full-cloud-camera (the JPEG as captured), or progressive-k{k}."""
    def edge(stage, host_ms):
        return profile.stage_ms(stage, host_ms, vision_macs=costs["vision_macs"])

    def language(where):
        ms = costs[f"{where}_lm_prefill_ms"] + (answer_tokens - 1) * costs[f"{where}_lm_per_token_ms"]
        return ms * (cloud_scale if where == "cloud" else 1.0)

    def link(up_bytes, stages):
        stages["uplink"] = rtt_ms / 2 + _link_ms(up_bytes, bandwidth_mbps)
        stages["downlink"] = _link_ms(REPLY_BYTES, bandwidth_mbps) + rtt_ms / 2
        return stages

    if mode == "full-edge":
        return {"edge_preprocess": edge("edge_preprocess", costs["edge_preprocess_ms"]),
                "edge_vision": edge("edge_vision", costs["edge_vision_ms"]),
                "edge_language": edge("edge_language", language("edge"))}
    if mode in ("full-cloud", "full-cloud-camera"):
        which = "camera" if mode.endswith("camera") else "model"
        stages = {"serialize": edge("serialize", costs[f"jpeg_{which}_encode_ms"])}
        link(costs[f"jpeg_{which}_bytes"], stages)
        stages.update(cloud_decode=costs[f"cloud_jpeg_{which}_decode_ms"] * cloud_scale,
                      cloud_preprocess=costs[f"cloud_preprocess_{which}_ms"] * cloud_scale,
                      cloud_vision=costs["cloud_vision_ms"] * cloud_scale,
                      cloud_language=language("cloud"))
        return stages
    if mode.startswith("progressive-k"):
        k = int(mode.removeprefix("progressive-k"))
        stages = {"edge_preprocess": edge("edge_preprocess", costs["edge_preprocess_ms"]),
                  "edge_vision": edge("edge_vision", costs["edge_vision_ms"]),
                  "mae_encode": edge("mae_encode", costs[f"mae_encode_k{k}_ms"])}
        link(costs[f"wire_bytes_k{k}"], stages)
        stages.update(cloud_mae_decode=costs[f"cloud_mae_decode_k{k}_ms"] * cloud_scale,
                      cloud_language=language("cloud"))
        return stages
    raise ValueError(f"unknown mode {mode!r}")


def _line(costs, profile, mode, cloud_scale: float = 1.0) -> tuple[float, float]:
    """total_ms(bw) = fixed + slope / bw: (fixed ms, slope ms·Mbps)."""
    at1 = sum(mode_stages(costs, profile, mode, 1.0, cloud_scale=cloud_scale).values())
    at2 = sum(mode_stages(costs, profile, mode, 2.0, cloud_scale=cloud_scale).values())
    slope = 2 * (at1 - at2)
    return at1 - slope, slope


def crossover(costs: dict, profile, modes: list[str], cloud_scale: float = 1.0,
              lo: float = CROSSOVER_RANGE_MBPS[0], hi: float = CROSSOVER_RANGE_MBPS[1]) -> list[dict]:
    """Which mode is fastest over [lo, hi] Mbps: intervals [from, to) with their winner. Every
    mode's time is fixed + slope/bandwidth, so the boundaries are where two lines meet."""
    lines = {m: _line(costs, profile, m, cloud_scale) for m in modes}
    points = {lo, hi}
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            (fa, sa), (fb, sb) = lines[a], lines[b]
            if fa != fb and (sb - sa) / (fa - fb) > 0:
                bw = (sb - sa) / (fa - fb)
                if lo < bw < hi:
                    points.add(bw)
    edges = sorted(points)
    intervals: list[dict] = []
    for a, b in zip(edges, edges[1:]):
        mid = math.sqrt(a * b)
        winner = min(modes, key=lambda m: lines[m][0] + lines[m][1] / mid)
        if intervals and intervals[-1]["winner"] == winner:
            intervals[-1]["to_mbps"] = b
        else:
            intervals.append({"from_mbps": a, "to_mbps": b, "winner": winner})
    return intervals


def run_cost_profile(split, image_paths, out: Path, device_profiles, vlm_spec=None,
                     log=print, max_new_tokens: int = 32, cloud_split=None) -> dict:
    """Measure the cost profile of `split` on `image_paths` and write results.json and
    summary.md to `out`. `device_profiles`: objects with name, source, projected and
    stage_ms(stage, host_ms, vision_macs) (edge_agent.profiles.DeviceProfile); the first is the
    measured one (host)."""
    import platform

    import torch
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    image_paths = [str(p) for p in image_paths]
    load_before = os.getloadavg()
    costs = measure_costs(split, image_paths, edge_threads=1, max_new_tokens=max_new_tokens,
                          cloud_split=cloud_split, log=log)
    L = costs["L"]
    note = None
    if vlm_spec is not None and Path(vlm_spec).is_dir():
        from ..backends.random_hf import NOTE_FILE
        marker = Path(vlm_spec) / NOTE_FILE
        if marker.is_file():
            note = json.loads(marker.read_text())["note"]
    modes = ["full-edge", "full-cloud", "full-cloud-camera"] + [f"progressive-k{k}" for k in range(1, L + 1)]
    profiles, e2e, table, cross, cross_ideal = {}, {}, [], {}, {}
    for p in device_profiles:
        edge = {stage: p.stage_ms(stage, costs[f"{stage}_ms"], costs["vision_macs"])
                for stage in ("edge_preprocess", "edge_vision", "mae_encode")}
        profiles[p.name] = {"source": p.source, "projected": bool(p.projected),
                            **{f"{stage}_ms": v for stage, v in edge.items()},
                            "mae_encode_share_of_edge": edge["mae_encode"] / sum(edge.values())}
        e2e[p.name] = {}
        for m in modes:
            stages = mode_stages(costs, p, m, 1.0)
            e2e[p.name][m] = {"total_ms": sum(stages.values()), "stages": stages}
        for bw in COST_BANDWIDTHS:
            table.append({"device": p.name, "bandwidth_mbps": bw,
                          **{m: sum(mode_stages(costs, p, m, bw).values()) for m in modes}})
        cross[p.name] = {f"k={k}": crossover(costs, p, ["full-edge", "full-cloud", f"progressive-k{k}"])
                         for k in (1, L)}
        cross_ideal[p.name] = {f"k={k}": crossover(costs, p, ["full-edge", "full-cloud",
                                                              f"progressive-k{k}"], cloud_scale=0.0)
                               for k in (1, L)}
    edge_vision = profiles[device_profiles[0].name]["edge_vision_ms"]
    cloud = (f"this host's CPU, {_threads(costs['cloud_threads'])}, a stand-in for the server; "
             f"vision and LM: {costs['cloud_compute']}" if costs["cloud_device"] == "cpu" else
             f"this host's {costs['cloud_device']} for the VLM (vision, language), its CPU for "
             "JPEG decoding, preprocessing and the MAE")
    result = {
        "kind": "cost_profile", "note": note or "timing and bytes only (no ground truth here)",
        "vlm": split.info(), "images": costs["images"], "image_paths": image_paths,
        "skipped": costs["skipped"],
        "host": {"machine": platform.machine(), "processor": platform.processor() or None,
                 "cpus": os.cpu_count(), "cloud_threads": costs["cloud_threads"],
                 "edge_threads": costs["edge_threads"],
                 # other work on this host slows every stage: the 1-min load average, before/after
                 "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "edge_vision_ms": edge_vision,
        "lm_ms_per_token": {"edge": costs["edge_lm_per_token_ms"], "cloud": costs["cloud_lm_per_token_ms"]},
        "lm_prefill_ms": {"edge": costs["edge_lm_prefill_ms"], "cloud": costs["cloud_lm_prefill_ms"]},
        "mae_encode_ms": costs["mae_encode_ms"],
        "mae_encode_share_of_edge": costs["mae_encode_share_of_edge"],
        "vision_macs": costs["vision_macs"],
        "bytes_per_k": {k: costs[f"wire_bytes_k{k}"] for k in range(1, L + 1)},
        "jpeg_bytes": {"camera": costs["jpeg_camera_bytes"], "model_input": costs["jpeg_model_bytes"],
                       "quality": COST_JPEG_QUALITY, "camera_size": costs["camera_size"],
                       "model_input_size": costs["model_input_size"]},
        "raw_fp16_bytes": costs["raw_fp16_bytes"],
        "profiles": profiles,
        "end_to_end_1mbps_ms": e2e,
        "latency_vs_bandwidth_ms": table,
        "crossover": cross,
        # the same with an ideal cloud (its compute costs nothing): the bound most favourable
        # to full-cloud, whatever server runs it
        "crossover_ideal_cloud": cross_ideal,
        "assumptions": {"answer_tokens": ANSWER_TOKENS, "rtt_ms": COST_RTT_MS,
                        "reply_bytes": REPLY_BYTES, "cloud": cloud, "question": COST_QUESTION,
                        "edge": "this host, 1 thread, then each device profile's projection"},
        "measured_medians": costs,
        "bench_seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "summary.md").write_text(cost_summary_markdown(result))
    return result


def describe_interval(iv: dict) -> str:
    lo, hi = iv["from_mbps"], iv["to_mbps"]
    lo_s = "" if lo <= CROSSOVER_RANGE_MBPS[0] else f"{lo:.3g}"
    hi_s = "" if hi >= CROSSOVER_RANGE_MBPS[1] else f"{hi:.3g}"
    where = (f"below {hi_s} Mbps" if not lo_s and hi_s else f"above {lo_s} Mbps" if lo_s and not hi_s
             else f"{lo_s}–{hi_s} Mbps" if lo_s else "at every bandwidth")
    return f"{iv['winner']} {where}"


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def cost_summary_markdown(r: dict) -> str:
    L = r["vlm"]["num_layers"]
    m = r["measured_medians"]
    jb = r["jpeg_bytes"]
    cam = "×".join(map(str, jb["camera_size"]))
    lines = [f"# Cost profile: {r['vlm']['vlm_id']}", "",
             f"**{r['note']}.** Medians over {r['images']} images, measured on this host "
             f"({r['host']['machine']}): the edge's stages with {_threads(r['host']['edge_threads'])}, "
             f"the cloud's with {_threads(r['host']['cloud_threads'])} (see the assumptions below; "
             f"{r['host']['cpus']} CPUs, 1-min load average {r['host']['load_average_1min'][0]:g} "
             f"before, {r['host']['load_average_1min'][1]:g} after). "
             "Rows marked *projected* are not measurements.", "",
             "| figure | value |", "|---|---|",
             f"| edge vision (host, 1 thread) | {r['edge_vision_ms']:.0f} ms |",
             f"| vision encoder MACs (counted) | {r['vision_macs'] / 1e9:.1f} G |",
             f"| LM per generated token, edge {_threads(r['host']['edge_threads'])} / cloud "
             f"{_threads(r['host']['cloud_threads'])} | "
             f"{r['lm_ms_per_token']['edge']:.1f} / {r['lm_ms_per_token']['cloud']:.1f} ms |",
             f"| LM prefill, edge / cloud | {r['lm_prefill_ms']['edge']:.0f} / {r['lm_prefill_ms']['cloud']:.0f} ms |",
             f"| MAE encode (all {L} layers) | {r['mae_encode_ms']:.2f} ms = "
             f"{100 * r['mae_encode_share_of_edge']:.2f}% of the edge (preprocess + vision + MAE) |",
             f"| wire bytes per k | " + ", ".join(f"k={k}: {b:.0f}" for k, b in r["bytes_per_k"].items()) + " |",
             f"| JPEG q{jb['quality']} at camera size ({cam}) | {jb['camera']:.0f} bytes |",
             f"| JPEG q{jb['quality']} at model input size ({jb['model_input_size']} px) | {jb['model_input']:.0f} bytes |",
             f"| raw fp16 visual tokens ({m['num_tokens']:.0f}×{r['vlm']['token_dim']}) | {r['raw_fp16_bytes']:.0f} bytes |",
             "", "## Devices", ""]
    for name, p in r["profiles"].items():
        lines.append(f"- **{name}**{' (projected)' if p['projected'] else ''}: {p['source']}; "
                     f"edge vision {p['edge_vision_ms']:.0f} ms, MAE encode {p['mae_encode_ms']:.1f} ms "
                     f"({100 * p['mae_encode_share_of_edge']:.2f}% of the edge)")
    lines += ["", f"## End to end at 1 Mbps, RTT {r['assumptions']['rtt_ms']:.0f} ms, "
              f"{r['assumptions']['answer_tokens']} generated tokens (computed from the measured stages)", "",
              "| device | full-edge | full-cloud (JPEG model size) | full-cloud (JPEG camera) | "
              + " | ".join(f"progressive k={k}" for k in range(1, L + 1)) + " |",
              "|---|" + "---|" * (3 + L)]
    for name, modes in r["end_to_end_1mbps_ms"].items():
        label = name + (" (projected)" if r["profiles"][name]["projected"] else "")
        lines.append(f"| {label} | " + " | ".join(f"{v['total_ms']:.0f} ms" for v in modes.values()) + " |")
    lines += ["", "## Where each mode wins (fastest; full-cloud = JPEG at model size)", "",
              "With the cloud as measured here:", ""]
    for name, by_k in r["crossover"].items():
        for k, intervals in by_k.items():
            lines.append(f"- {name}, progressive {k}: " + "; ".join(describe_interval(iv) for iv in intervals))
    lines += ["", "With an ideal cloud (its compute costs nothing: the bound most favourable to "
              "full-cloud, e.g. a GPU server far faster than the edge):", ""]
    for name, by_k in r["crossover_ideal_cloud"].items():
        for k, intervals in by_k.items():
            lines.append(f"- {name}, progressive {k}: " + "; ".join(describe_interval(iv) for iv in intervals))
    lines += ["", "## End-to-end ms against bandwidth", "",
              "| device | Mbps | full-edge | full-cloud | full-cloud camera | "
              + " | ".join(f"prog k={k}" for k in range(1, L + 1)) + " |", "|---|---|" + "---|" * (3 + L)]
    for row in r["latency_vs_bandwidth_ms"]:
        vals = [row["full-edge"], row["full-cloud"], row["full-cloud-camera"]] + \
            [row[f"progressive-k{k}"] for k in range(1, L + 1)]
        lines.append(f"| {row['device']} | {row['bandwidth_mbps']:g} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
    a = r["assumptions"]
    lines += ["", f"Assumptions: {a['answer_tokens']} generated tokens per answer; RTT {a['rtt_ms']:.0f} ms, "
              f"paid half each way; a {a['reply_bytes']}-byte reply; cloud: {a['cloud']}; edge: {a['edge']}; "
              f"question {a['question']!r}. Timing: vision and the LM once per image (after one "
              f"warm-up image), stages of a few ms (MAE, JPEG) the best of {CHEAP_STAGE_REPEATS} runs; "
              f"medians over the images. Bench time {r['bench_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
