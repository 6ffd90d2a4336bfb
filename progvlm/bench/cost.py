"""`bench --images DIR`: the cost profile of any VLM, measured on this host (no ground truth,
so no accuracy): edge vision time, LM time per generated token, MAE encode share of the edge,
wire bytes per k, JPEG bytes at camera and model size, and end-to-end times of full-edge /
full-cloud / progressive computed from the measured stage times at any bandwidth, per device
profile (handed in by the caller, e.g. edge_agent.profiles: host, imx95-emulated,
imx95-npu-projected), with the bandwidths where the fastest mode changes."""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from ..eval.timing import best_of, timed
from ..net.link import REPLY_BYTES, LinkProfile
from .report import cost_summary_markdown, threads_phrase
from .settings import (ANSWER_TOKENS, CHEAP_STAGE_REPEATS, COST_BANDWIDTHS, COST_JPEG_QUALITY,
                       COST_QUESTION, COST_RTT_MS, CROSSOVER_RANGE_MBPS)


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


def _best(fn, *args):
    return best_of(fn, *args, repeats=CHEAP_STAGE_REPEATS)


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
            x, r["edge_preprocess_ms"] = timed(vlm.preprocess, image)
            (tokens, grid), r["edge_vision_ms"] = timed(vlm.vision, x)
            tokens = tokens.float()
            best = {k: math.inf for k in range(1, L + 1)}
            for _ in range(CHEAP_STAGE_REPEATS):  # every k sampled across the same stretch of time
                for k in best:
                    layers, ms = timed(mae.compress, tokens, k)
                    best[k] = min(best[k], ms)
            r.update({f"mae_encode_k{k}_ms": ms for k, ms in best.items()})
            wire = {k: split.pack(Frame(layers[:k], tokens.shape[0], grid)) for k in range(1, L + 1)}
            jpeg_model, r["jpeg_model_encode_ms"] = _best(
                lambda: encode_jpeg(resize_for_model(image, vlm.input_size), COST_JPEG_QUALITY))
            jpeg_camera, r["jpeg_camera_encode_ms"] = _best(encode_jpeg, image, COST_JPEG_QUALITY)
            edge_lm = language_timing(vlm, tokens, grid, COST_QUESTION, max_new_tokens)
            r["edge_lm_prefill_ms"], r["edge_lm_per_token_ms"] = edge_lm["prefill_ms"], edge_lm["per_token_ms"]
            torch.set_num_threads(cloud_threads)
            for name, data in (("model", jpeg_model), ("camera", jpeg_camera)):
                decoded, r[f"cloud_jpeg_{name}_decode_ms"] = _best(load_image, data)
                x_c, r[f"cloud_preprocess_{name}_ms"] = timed(cloud.vlm.preprocess, decoded)
            r["cloud_vision_ms"] = (r["edge_vision_ms"] if same_compute
                                    else timed(cloud.vlm.vision, x_c)[1])
            for k in range(1, L + 1):
                _, r[f"cloud_mae_decode_k{k}_ms"] = _best(cloud.decode, cloud.unpack(wire[k]))
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


def mode_stages(costs: dict, profile, mode: str, bandwidth_mbps: float,
                rtt_ms: float = COST_RTT_MS, answer_tokens: int = ANSWER_TOKENS,
                cloud_scale: float = 1.0) -> dict:
    """The stage times (ms) of one mode at one bandwidth: edge stages through `profile`
    (its stage_ms(stage, host_ms, vision_macs)), link stages from the bytes, cloud stages as
    measured × `cloud_scale` (0: an ideal cloud whose compute costs nothing, the bound that
    favours full-cloud most). `mode`: full-edge, full-cloud (model-size JPEG, as the agent
    sends), full-cloud-camera (the JPEG as captured), or progressive-k{k}."""
    uplink = LinkProfile(bandwidth_mbps, rtt_ms)

    def edge(stage, host_ms):
        return profile.stage_ms(stage, host_ms, vision_macs=costs["vision_macs"])

    def language(where):
        ms = costs[f"{where}_lm_prefill_ms"] + (answer_tokens - 1) * costs[f"{where}_lm_per_token_ms"]
        return ms * (cloud_scale if where == "cloud" else 1.0)

    def link(up_bytes, stages):
        stages["uplink"] = rtt_ms / 2 + 1e3 * uplink.serialisation_s(up_bytes)
        stages["downlink"] = 1e3 * uplink.serialisation_s(REPLY_BYTES) + rtt_ms / 2
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


def project(costs: dict, device_profiles) -> dict:
    """Every device profile's edge stages, end-to-end times at 1 Mbps and against bandwidth, and
    crossovers (with the cloud as measured, and ideal), from the measured stage medians `costs`
    (measure_costs). `device_profiles`: objects with name, source, projected,
    stage_ms(stage, host_ms, vision_macs) and details(host_vision_ms, vision_macs)
    (edge_agent.profiles.DeviceProfile)."""
    L = costs["L"]
    modes = ["full-edge", "full-cloud", "full-cloud-camera"] + [f"progressive-k{k}" for k in range(1, L + 1)]
    profiles, e2e, table, cross, cross_ideal = {}, {}, [], {}, {}
    for p in device_profiles:
        edge = {stage: p.stage_ms(stage, costs[f"{stage}_ms"], costs["vision_macs"])
                for stage in ("edge_preprocess", "edge_vision", "mae_encode")}
        profiles[p.name] = {"source": p.source, "projected": bool(p.projected),
                            **{f"{stage}_ms": v for stage, v in edge.items()},
                            "mae_encode_share_of_edge": edge["mae_encode"] / sum(edge.values()),
                            **p.details(costs["edge_vision_ms"], costs["vision_macs"])}
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
    return {"profiles": profiles, "end_to_end_1mbps_ms": e2e, "latency_vs_bandwidth_ms": table,
            "crossover": cross,
            # the same with an ideal cloud (its compute costs nothing): the bound most favourable
            # to full-cloud, whatever server runs it
            "crossover_ideal_cloud": cross_ideal}


def reproject(out: Path, device_profiles) -> dict:
    """A cost profile's results.json in `out`, its projections recomputed from its own measured
    stage medians under `device_profiles` (no model is run); rewrites results.json and
    summary.md and returns the result."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run `bench --images DIR --out {out}` first")
    result = json.loads(path.read_text())
    if result.get("kind") != "cost_profile":
        raise ValueError(f"{path} is not a cost profile (bench --images)")
    result.update(project(result["measured_medians"], device_profiles))
    path.write_text(json.dumps(result, indent=1, default=float))
    (Path(out) / "summary.md").write_text(cost_summary_markdown(result))
    return result


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
    projections = project(costs, device_profiles)
    edge_vision = projections["profiles"][device_profiles[0].name]["edge_vision_ms"]
    cloud = (f"this host's CPU, {threads_phrase(costs['cloud_threads'])}, a stand-in for the server; "
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
        **projections,
        "assumptions": {"answer_tokens": ANSWER_TOKENS, "rtt_ms": COST_RTT_MS,
                        "reply_bytes": REPLY_BYTES, "cloud": cloud, "question": COST_QUESTION,
                        "edge": "this host, 1 thread, then each device profile's projection"},
        "measured_medians": costs,
        "bench_seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
    }
    from .video import video_cost
    result["video"] = video_cost(split, image_paths, log=log)
    result["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "summary.md").write_text(cost_summary_markdown(result))
    return result
