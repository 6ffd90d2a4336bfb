"""bench: the paper-style experiment (bundled VLM) or the cost profile of any VLM (--images)."""
from __future__ import annotations

from pathlib import Path

from .options import add_vlm_options, emit, fail, log


def add_bench(sub):
    p = sub.add_parser("bench", help="the paper-style experiment (bundled VLM), or the cost "
                       "profile of any VLM on your images (--images)",
                       description="Bundled VLM: one seeded run: rate–accuracy of progressive k "
                       "against JPEG (model and camera size), raw tokens and pooling; every mode's "
                       "latency at 0.1–50 Mbps through the agent's emulated link, and at 1 Mbps "
                       "through a kernel-shaped link (network namespace, veth, tc) where the machine "
                       "allows it, asked of an edge agent and a cloud backend in child processes "
                       "(full-cloud at camera size, model size and equal accuracy); the 1 Mbps "
                       "breakdown and headline ratios with their spread; cloud load with 1/4/16 clients; the scene-graph information floor. "
                       "Writes CSV/JSON, PNG plots and summary.md. Default run ≈ 5 min on 2 cores "
                       "(at most 15); --quick ≈ 2 min. With --images DIR (any VLM, e.g. --vlm "
                       "FOLDER --mae FOLDER): the cost profile measured on this host: edge vision "
                       "ms, LM ms per token, MAE share, wire bytes per k, JPEG bytes at camera and "
                       "model size, end-to-end times of full-edge / full-cloud / progressive "
                       "computed from the measured stages for the host and the projected i.MX95 "
                       "profiles (imx95-emulated, imx95-npu-projected) and the bandwidths where "
                       "the fastest mode changes; writes results.json and summary.md.")
    p.add_argument("--quick", action="store_true", help="fewer questions, qualities, bandwidths and samples (CI)")
    p.add_argument("--link", choices=("both", "kernel", "emulated"), default="both",
                   help="the latency sweep's link: emulated by the agent (paced bytes, slept RTT), "
                        "kernel (network namespace + veth shaped by tc; needs root) or both, and their "
                        "gap (default; the kernel link is skipped with a note where it cannot be made)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="measure the cost profile on the images in DIR (any VLM)")
    p.add_argument("--reproject", type=Path, default=None, metavar="DIR",
                   help="recompute the device projections (imx95-emulated, imx95-npu-projected "
                        "with the measured int8 coverage) of the cost profile in DIR from its "
                        "own measured stage times (results.json; no model is run) and rewrite "
                        "its results.json and summary.md")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="with --images: tokens generated per timed answer (default %(default)s)")
    p.add_argument("--cloud-device", default=None,
                   help="with --images: measure the cloud's VLM stages on this torch device "
                        "(e.g. cuda); default: this CPU stands in for the server")
    add_vlm_options(p)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: docs/bench; runs/bench-quick with --quick; "
                        "runs/bench-cost with --images)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_bench)


def cmd_bench(a) -> int:
    from ..backends import BUNDLED, default_vlm_spec
    if a.reproject is not None:
        return _bench_reproject(a)
    if a.images is not None:
        return _bench_cost_profile(a)
    if (a.vlm or default_vlm_spec()) != BUNDLED or a.mae is not None:
        return fail(f"the paper-style bench runs the bundled model on generated scenes; for "
                    f"{a.vlm or default_vlm_spec()} pass --images DIR to measure its cost profile "
                    "(with --vlm and --mae)")
    from ..bench.experiment import run_bench
    out = a.out or Path("runs/bench-quick" if a.quick else "docs/bench")
    headline = run_bench(out, seed=a.seed, quick=a.quick, link=a.link, log=log)
    emit(headline, a.json, [
        f"results in {out}/ (summary.md, results.json, CSV, PNG); {headline['bench_seconds']:.0f} s",
        f"k* = {headline['k_star']} (consistency {headline['k_star_consistency']:.3f}), "
        f"{headline['k_star_bytes_mean']:.1f} bytes = {100 * headline['bytes_vs_jpeg_q90_model']:.2f}% of "
        f"JPEG q90 at model size, {100 * headline['bytes_vs_raw_fp16']:.3f}% of raw fp16 tokens",
        f"1 Mbps, {headline['link']} link: progressive k={headline['k_star']} against"]
        + [f"  {name}: {v['ratio']:.2f}x [{v['low']:.2f}-{v['high']:.2f}]"
           for name, v in headline["progressive_vs"].items()])
    return 0


def _bench_cost_profile(a) -> int:
    """bench --images DIR: the cost profile of any VLM (progvlm.bench.cost.run_cost_profile)."""
    from ..bench.cost import run_cost_profile
    from ..eval.on_images import image_files
    from ..split import load_split
    try:
        paths = image_files(a.images)
    except ValueError as e:
        return fail(e)
    if not paths:
        return fail(f"no images in {a.images}")
    split = load_split(a.vlm, a.mae)
    cloud_split = None
    if a.cloud_device:
        from ..backends import load_vlm
        cloud_split = load_split(load_vlm(a.vlm, device=a.cloud_device), split.mae)
    out = a.out or Path("runs/bench-cost")
    try:
        profiles = _device_profiles(split.info()["family"])
        r = run_cost_profile(split, paths, out, profiles, vlm_spec=a.vlm, log=log,
                             max_new_tokens=a.max_new_tokens, cloud_split=cloud_split)
    except ValueError as e:  # no readable image in the folder, no coverage for the NPU
        return fail(e)
    return _emit_cost_profile(a, r, out, profiles)


def _device_profiles(family: str | None):
    """host, imx95-emulated and imx95-npu-projected (with this VLM family's measured coverage).
    The device profiles are the edge agent's; the CLI hands them to the bench, which itself
    imports nothing from edge_agent."""
    from edge_agent.profiles import get_profile, npu_profile
    return [get_profile("host"), get_profile("imx95-emulated"), npu_profile(family)]


def _bench_reproject(a) -> int:
    """bench --reproject DIR: a cost profile's projections recomputed from its measured stages."""
    import json

    from ..bench.cost import reproject
    path = a.reproject / "results.json"
    try:
        family = json.loads(path.read_text())["vlm"].get("family") if path.is_file() else None
        profiles = _device_profiles(family)
        r = reproject(a.reproject, profiles)
    except (ValueError, KeyError) as e:
        return fail(e)
    return _emit_cost_profile(a, r, a.reproject, profiles)


def _emit_cost_profile(a, r, out, profiles) -> int:
    from ..bench.report import describe_interval
    headline = {key: r[key] for key in ("kind", "note", "images", "skipped", "edge_vision_ms",
                                        "lm_ms_per_token",
                                        "mae_encode_share_of_edge", "vision_macs", "bytes_per_k",
                                        "jpeg_bytes", "crossover", "crossover_ideal_cloud")}
    headline.update(vlm_id=r["vlm"]["vlm_id"], out=str(out),
                    npu_projection={k: v for k, v in r["profiles"][profiles[-1].name].items()
                                    if k not in ("source", "projected")},
                    end_to_end_1mbps_ms={d: {m: v["total_ms"] for m, v in modes.items()}
                                         for d, modes in r["end_to_end_1mbps_ms"].items()})
    L = r["vlm"]["num_layers"]
    lines = [f"results in {out}/ (summary.md, results.json); {r['note']}",
             f"edge vision {r['edge_vision_ms']:.0f} ms (host, 1 thread), "
             f"{r['profiles'][profiles[-1].name]['edge_vision_ms']:.0f} ms ({profiles[-1].name}); "
             f"LM {r['lm_ms_per_token']['cloud']:.1f} ms/token (cloud); MAE "
             f"{100 * r['mae_encode_share_of_edge']:.2f}% of the edge",
             "bytes per k: " + ", ".join(f"{k}: {b:.0f}" for k, b in r["bytes_per_k"].items())
             + f"; JPEG q90 camera {r['jpeg_bytes']['camera']:.0f}, model size "
             f"{r['jpeg_bytes']['model_input']:.0f}"]
    for device, by_k in r["crossover"].items():
        lines.append(f"{device}, k={L}: " + "; ".join(describe_interval(iv) for iv in by_k[f"k={L}"])
                     + "; with an ideal cloud: " + "; ".join(
                         describe_interval(iv) for iv in r["crossover_ideal_cloud"][device][f"k={L}"]))
    emit(headline, a.json, lines)
    return 0
