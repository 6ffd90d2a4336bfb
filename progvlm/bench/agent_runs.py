"""The bench's requests to a running edge agent, through its public HTTP API only (POST /v1/ask,
edge_agent/service.py; the agent runs in a child process, and its request model,
edge_agent/request.py, builds the forms): the latency sweep, the conversation runs, and the
edge half's floor measured by `python -m edge_agent profile`."""
from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

import numpy as np

from .settings import (ADAPTIVE_BUDGET_MS, AUTO_BUDGET_MS, CONVERSATION_TURNS, HEADLINE_MBPS,
                       HEADLINE_RTT_MS)


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
    from edge_agent.request import AskRequest, as_form
    # the camera's raw pixels, as a camera delivers them: no file to decode on the device
    pixels, width, height = _raw_frame(str(image_path))
    form = as_form(AskRequest, question=question, mode=mode, bandwidth_mbps=bandwidth_mbps,
                   rtt_ms=rtt_ms, image_format="rgb24", width=width, height=height, **options)
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
                                         conversation=together,
                                         new_conversation=together and i == 0,
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


def edge_floor(images: list[str], log) -> dict:
    """The edge half's stages on raw camera frames, one thread, each runtime measured by
    `python -m edge_agent profile` in a child process: PyTorch, ONNX Runtime (exported to a
    temporary folder first), LiteRT float32 (exported there too, where litert-torch is
    installed) and LiteRT int8 (the shipped export, assets/edge_litert_int8, where ai-edge-litert
    is installed). {"pytorch": {…}, "onnxruntime": {…}, "litert-float32": {…}, "litert-int8": {…}};
    a runtime that cannot run here is {"skipped": why}."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    from .. import ASSETS
    has = {m: importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert")}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir, litert_dir = f"{tmp}/onnx", f"{tmp}/litert"
        runs = {"pytorch": [], "onnxruntime": ["--runtime", "onnx", "--model-dir", onnx_dir],
                "litert-float32": ["--runtime", "litert", "--model-dir", litert_dir],
                "litert-int8": ["--runtime", "litert", "--model-dir",
                                str(ASSETS / "edge_litert_int8")]}
        subprocess.run([sys.executable, "-m", "edge_agent", "export", "--out", onnx_dir],
                       check=True, capture_output=True, text=True)
        if has["litert_torch"] and has["ai_edge_litert"]:
            subprocess.run([sys.executable, "-m", "edge_agent", "export", "--runtime", "litert",
                            "--out", litert_dir], check=True, capture_output=True, text=True)
        else:
            runs.pop("litert-float32")
            out["litert-float32"] = {"skipped": "needs litert-torch and ai-edge-litert "
                                                "(pip install -e .[litert], kept out of requirements.txt)"}
        if not has["ai_edge_litert"]:
            runs.pop("litert-int8")
            out["litert-int8"] = {"skipped": "needs ai-edge-litert (pip install -e .[edge-litert])"}
        for runtime, extra in runs.items():
            log(f"edge floor: {runtime} on raw frames")
            r = subprocess.run([sys.executable, "-m", "edge_agent", "profile", "--images", *images, *extra],
                               check=True, capture_output=True, text=True)
            out[runtime] = json.loads(r.stdout.strip().splitlines()[-1])
    return {name: out[name] for name in ("pytorch", "onnxruntime", "litert-float32", "litert-int8")}
