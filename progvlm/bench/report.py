"""The bench's outputs: CSV, PNG plots and the Markdown summaries (the paper-style experiment's
and the cost profile's)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .settings import CHEAP_STAGE_REPEATS, CONSISTENCY_TARGET, CROSSOVER_RANGE_MBPS, HEADLINE_MBPS, HEADLINE_RTT_MS


def write_csv(path: Path, rows: list[dict]):
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (stages per mode)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


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
              "Medians over the frames, [fastest–slowest frame], each frame the best of its runs.", "",
              "| runtime | preprocess ms | vision ms | MAE k=1 ms | MAE k=L ms | MAE share k=1 | MAE share k=L |",
              "|---|---|---|---|---|---|---|"]
    for name, f in h["edge_floor"].items():
        if "skipped" in f:
            lines.append(f"| {name} | skipped: {f['skipped']} ||||||")
            continue
        L = f["L"]
        lines.append(f"| {name} | {_ranged(f, 'edge_preprocess_ms')} | {_ranged(f, 'edge_vision_ms')} | "
                     f"{_ranged(f, 'mae_encode_k1_ms', 3)} | {_ranged(f, f'mae_encode_k{L}_ms', 3)} | "
                     f"{100 * f['mae_share_of_edge_k1']:.1f}% | {100 * f[f'mae_share_of_edge_k{L}']:.1f}% |")
    a = h["adaptive"]
    lines += ["", "## Adaptive: layers sent until the answer is sure", "",
              f"Rule: {a['rule']} ≥ {a['threshold']:.4f} (the MAE's adaptive.json, calibrate-adaptive). "
              f"On the evaluation stream: {a['bytes_mean']:.1f} bytes per question = "
              f"{a['bytes_ratio_to_k1']:.2f}× k = 1's, accuracy {a['accuracy']:.3f} against k = L's "
              f"{a['k_L_accuracy']:.3f}, mean layers {a['mean_layers']:.2f}, ECE {a['ece']:.3f}; goal "
              f"(k = L's accuracy less {a['accuracy_slack']} at ≤ {a['budget']}× k = 1's bytes) "
              f"{'met' if a['goal_met'] else 'not met'}."]
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


def _ranged(floor: dict, key: str, digits: int = 2) -> str:
    """A profile's median with its range over the frames (`ranges`, where the profile has it)."""
    lo_hi = floor.get("ranges", {}).get(key)
    text = f"{floor[key]:.{digits}f}"
    return text + (f" [{lo_hi[0]:.{digits}f}–{lo_hi[1]:.{digits}f}]" if lo_hi else "")


def describe_interval(iv: dict) -> str:
    lo, hi = iv["from_mbps"], iv["to_mbps"]
    lo_s = "" if lo <= CROSSOVER_RANGE_MBPS[0] else f"{lo:.3g}"
    hi_s = "" if hi >= CROSSOVER_RANGE_MBPS[1] else f"{hi:.3g}"
    where = (f"below {hi_s} Mbps" if not lo_s and hi_s else f"above {lo_s} Mbps" if lo_s and not hi_s
             else f"{lo_s}–{hi_s} Mbps" if lo_s else "at every bandwidth")
    return f"{iv['winner']} {where}"


def threads_phrase(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def cost_summary_markdown(r: dict) -> str:
    L = r["vlm"]["num_layers"]
    m = r["measured_medians"]
    jb = r["jpeg_bytes"]
    cam = "×".join(map(str, jb["camera_size"]))
    lines = [f"# Cost profile: {r['vlm']['vlm_id']}", "",
             f"**{r['note']}.** Medians over {r['images']} images, measured on this host "
             f"({r['host']['machine']}): the edge's stages with {threads_phrase(r['host']['edge_threads'])}, "
             f"the cloud's with {threads_phrase(r['host']['cloud_threads'])} (see the assumptions below; "
             f"{r['host']['cpus']} CPUs, 1-min load average {r['host']['load_average_1min'][0]:g} "
             f"before, {r['host']['load_average_1min'][1]:g} after). "
             "Rows marked *projected* are not measurements.", "",
             "| figure | value |", "|---|---|",
             f"| edge vision (host, 1 thread) | {r['edge_vision_ms']:.0f} ms |",
             f"| vision encoder MACs (counted) | {r['vision_macs'] / 1e9:.1f} G |",
             f"| LM per generated token, edge {threads_phrase(r['host']['edge_threads'])} / cloud "
             f"{threads_phrase(r['host']['cloud_threads'])} | "
             f"{r['lm_ms_per_token']['edge']:.1f} / {r['lm_ms_per_token']['cloud']:.1f} ms |",
             f"| LM prefill, edge / cloud | {r['lm_prefill_ms']['edge']:.0f} / {r['lm_prefill_ms']['cloud']:.0f} ms |",
             f"| MAE encode (all {L} layers) | {r['mae_encode_ms']:.2f} ms = "
             f"{100 * r['mae_encode_share_of_edge']:.2f}% of the edge (preprocess + vision + MAE) |",
             "| wire bytes per k | " + ", ".join(f"k={k}: {b:.0f}" for k, b in r["bytes_per_k"].items()) + " |",
             f"| JPEG q{jb['quality']} at camera size ({cam}) | {jb['camera']:.0f} bytes |",
             f"| JPEG q{jb['quality']} at model input size ({jb['model_input_size']} px) | {jb['model_input']:.0f} bytes |",
             f"| raw fp16 visual tokens ({m['num_tokens']:.0f}×{r['vlm']['token_dim']}) | {r['raw_fp16_bytes']:.0f} bytes |",
             "", "## Devices", ""]
    for name, p in r["profiles"].items():
        lines.append(f"- **{name}**{' (projected)' if p['projected'] else ''}: {p['source']}; "
                     f"edge vision {p['edge_vision_ms']:.0f} ms"
                     + (f" (NPU {p['edge_vision_npu_ms']:.0f} ms + float fallback on the A55s "
                        f"{p['edge_vision_a55_fallback_ms']:.0f} ms; {100 * p['int8_mac_fraction']:.1f} % "
                        "of the MACs in int8)" if "edge_vision_npu_ms" in p else "")
                     + f", MAE encode {p['mae_encode_ms']:.1f} ms "
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
    if "video" in r:
        v = r["video"]
        lines += ["", f"## Video: a pan-and-zoom clip over the images ({v['frames']} frames, "
                  f"{v['frames_per_image']} per image; bytes after each image's first frame)", "",
                  "| k | intra bytes/frame | temporal bytes/frame | temporal / intra |", "|---|---|---|---|"]
        lines += [f"| {name[1:]} | {e['bytes_per_frame_intra']} | {e['bytes_per_frame_temporal']} | "
                  f"{e['bytes_ratio']:.3f} |" for name, e in v.items() if name.startswith("k")]
        lines += ["", f"Edge per frame (vision and MAE encoder, median, this host): "
                  f"{v['edge_ms_median']['vision_and_mae_encode']} ms, temporal coding "
                  f"{v['edge_ms_median']['temporal_code']} ms; cloud MAE decode "
                  f"{v['cloud_ms_median']['mae_decode']} ms."]
    return "\n".join(lines) + "\n"
