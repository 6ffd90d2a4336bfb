"""The bench's video section: a clip with events played through the edge's Watcher to a cloud
at 1 Mbps, RTT 20 ms, by each method (temporal, temporal adaptive and intra progressive, JPEG per frame, H.264),
on the emulated link and on the kernel's (netns, veth, tc: progvlm/net/kernel_link.py) where
the machine allows it; full-edge (the whole VLM on the device, nothing sent) for reference.

Per method and link: bytes per frame (all frames, and the frames after the first), the frame
rate the stream sustained (frames / their wall time, one frame in flight), each stage's mean,
and the delay of each detected event in ms: from the capture of the frame where the truth
changed (clip time) to the event in the edge's hands (the detecting frame's capture time plus
its end-to-end time).
"""
from __future__ import annotations

import statistics
import time

from .settings import HEADLINE_MBPS, HEADLINE_RTT_MS

METHODS = ("temporal", "adaptive", "intra", "jpeg", "h264")
CLIP = "busy table"  # an example clip with events (assets/examples/clips.json)


def _play(runtime, cloud_url: str, token: str | None, settings, images, emulated: bool) -> list[dict]:
    from edge_agent.watch import Watcher
    from ..net.link import LinkProfile
    link = LinkProfile.checked(settings.bandwidth_mbps, settings.rtt_ms, emulated=emulated)
    watcher = Watcher(runtime, cloud_url, settings, token, link=link)
    try:
        watcher.frame(images[0])  # warm-up: the first frame pays the models' lazy set-up
        watcher.close()
        watcher = Watcher(runtime, cloud_url, settings, token, link=link)
        return [watcher.frame(image) for image in images]
    finally:
        watcher.close()


def _row(link: str, records: list[dict], true_changes: dict, settings) -> dict:
    """One method on one link: the stream's summary (edge_agent.watch.summarise), its events
    scored as the watch CLI scores them, and each detected event's delay in ms: the frames from
    the change to the event that eval-video matches to it (progvlm.eval.video.event_pairs), at
    the clip's frame rate, plus the detecting frame's end-to-end time."""
    from edge_agent.watch import summarise
    from edge_agent.watch_cli import score_events
    from ..eval.video import event_pairs
    summary = summarise(records, settings)
    scored = score_events(summary["events"], true_changes)
    total_ms = {r["index"]: r["total_ms"] for r in records}
    delays = []
    for question, changes in true_changes.items():
        times = [e["index"] for e in summary["events"] if e["question"] == question and e["index"] > 0]
        pairs, _, _ = event_pairs([c for c in changes if c > 0], times)
        delays += [(e - c) / settings.fps * 1e3 + total_ms[e] for c, e in pairs]
    later = [r["bytes"] for r in records[1:]]
    return {"method": settings.method, "link": link, "frames": summary["frames"],
            "bytes_per_frame": summary["bytes_per_frame"],
            "bytes_per_later_frame": round(sum(later) / len(later), 1) if later else None,
            "sustained_fps": summary["sustained_fps"],
            "frame_ms_median": round(statistics.median(r["total_ms"] for r in records), 1),
            "event_delay_ms_median": round(statistics.median(delays), 1) if delays else None,
            **{f"events_{k}": v for k, v in scored.items() if k != "delay_frames_median"},
            "stage_ms_mean": summary["stage_ms_mean"]}


def _full_edge(split, images, questions) -> dict:
    """The whole VLM on the device per frame (nothing sent): its frame rate here."""
    t0 = time.perf_counter()
    for image in images:
        tokens, grid = split.vlm.edge_half_with_grid(image)
        split.language_batch([(tokens, q, grid) for q in questions])
    wall = time.perf_counter() - t0
    return {"method": "full-edge", "link": "none", "frames": len(images), "bytes_per_frame": 0,
            "sustained_fps": round(len(images) / wall, 2)}


def video_section(split, kernel_ok: bool, quick: bool = False, log=print) -> dict:
    """{"clip", "rows": [...]}: each method on the emulated link, and on the kernel link
    when `kernel_ok` (root, netns and tc here)."""
    from edge_agent.runtime import PyTorchRuntime
    from edge_agent.watch import WatchSettings
    from ..net.kernel_link import kernel_link
    from ..serve.children import cloud_service
    from ..toyworld.clips import changes, example_clip, load_example_clips
    spec = next(c for c in load_example_clips() if c["name"] == CLIP)
    clip = example_clip(CLIP)
    frames = len(clip.scenes) if not quick else 12
    images = [clip.frame(t) for t in range(frames)]
    true_changes = {q: [c for c in changes(clip, q) if c < frames] for q in spec["questions"]}
    runtime = PyTorchRuntime(split)
    rows = []

    def run_all(url, token, link_name, emulated):
        for method in METHODS:
            settings = WatchSettings(questions=spec["questions"], method=method, k=1,
                                     bandwidth_mbps=HEADLINE_MBPS, rtt_ms=HEADLINE_RTT_MS, fps=spec["fps"])
            records = _play(runtime, url, token, settings, images, emulated)
            rows.append(_row(link_name, records, true_changes, settings))
            log(f"video {method:9s} {link_name:8s} {rows[-1]['bytes_per_frame']:>9} B/frame "
                f"{rows[-1]['sustained_fps']:>6} fps")

    with cloud_service(vlm="bundled") as cloud:
        run_all(cloud.url, cloud.token, "emulated", True)
    if kernel_ok:
        with kernel_link(HEADLINE_MBPS, HEADLINE_RTT_MS) as kl, \
                cloud_service(vlm="bundled", host=kl.listen_host, port=kl.inner_port,
                              wrap=kl.in_namespace, public_url=kl.cloud_url) as cloud:
            run_all(cloud.url, cloud.token, "kernel", False)
    rows.append(_full_edge(split, images, spec["questions"]))
    return {"clip": {"name": CLIP, "frames": frames, "fps": spec["fps"], "questions": spec["questions"],
                     "true_changes": true_changes},
            "bandwidth_mbps": HEADLINE_MBPS, "rtt_ms": HEADLINE_RTT_MS, "k": 1, "rows": rows}


def video_markdown(section: dict) -> str:
    """The section as the summary's table."""
    c = section["clip"]
    lines = [f"## Video: a clip with events (\"{c['name']}\", {c['frames']} frames at {c['fps']} fps, "
             f"{len(c['questions'])} standing questions), {section['bandwidth_mbps']:g} Mbps, RTT "
             f"{section['rtt_ms']:g} ms, k = {section['k']}", "",
             "| method | link | bytes/frame | after the first | sustained fps | frame ms (median) "
             "| event delay ms (median) | detected / missed / false |", "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        ev = (f"{r['events_detected']} / {r['events_missed']} / {r['events_false']}"
              if "events_detected" in r else "–")
        lines.append(f"| {r['method']} | {r['link']} | {r['bytes_per_frame']} | "
                     f"{r.get('bytes_per_later_frame', '–')} | {r['sustained_fps']} | "
                     f"{r.get('frame_ms_median', '–')} | {r.get('event_delay_ms_median', '–')} | {ev} |")
    return "\n".join(lines) + "\n"


def video_cost(split, image_paths, frames_per_image: int = 6, log=print) -> dict:
    """Any VLM's video costs (no ground truth: bytes and time only): a pan-and-zoom clip over
    the images (progvlm.video.pan_zoom), each frame coded intra and temporally at k = 1 and
    k = L; bytes per frame after each photo's first, and the edge's and the cloud's time per
    frame (medians, this host)."""
    from ..codec.temporal import TemporalCoder
    from ..images import ImageInputError, load_image
    from ..video.pan_zoom import pan_zoom
    photos = []
    for p in image_paths:  # what measure_costs skips (not an image) is skipped here too
        try:
            photos.append(load_image(p))
        except ImageInputError:
            pass
    clip = pan_zoom(photos, frames_per_image)
    tables = split.mae.edge_codec()
    L = split.num_layers
    out = {"frames": len(clip), "frames_per_image": frames_per_image, "images": len(photos)}
    edge_ms, code_ms, decode_ms = [], [], []
    latents = []
    for image in clip:
        t0 = time.perf_counter()
        tokens, grid = split.vlm.vision(split.vlm.preprocess(image))
        latents.append((split.mae._latent(tokens), grid))
        edge_ms.append((time.perf_counter() - t0) * 1e3)
    for k in (1, L):
        coder, ref, intra, temporal = TemporalCoder(tables), None, [], []
        for t, (latent, grid) in enumerate(latents):
            t0 = time.perf_counter()
            coded = coder.code(latent, k, ref, grid)
            code_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            split.decode_latent(coded.reference.latent(tables, k), k)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            if t % frames_per_image:  # not a photo's first frame
                intra.append(len(coder.key(latent, k, grid).data))
                temporal.append(len(coded.data))
            ref = coded.reference
        out[f"k{k}"] = {"bytes_per_frame_intra": round(statistics.mean(intra), 1),
                        "bytes_per_frame_temporal": round(statistics.mean(temporal), 1),
                        "bytes_ratio": round(sum(temporal) / sum(intra), 4),
                        "delta_frames": sum(1 for b in temporal if b)}
        log(f"video k={k}: intra {out[f'k{k}']['bytes_per_frame_intra']} B/frame, temporal "
            f"{out[f'k{k}']['bytes_per_frame_temporal']} B/frame")
    out["edge_ms_median"] = {"vision_and_mae_encode": round(statistics.median(edge_ms), 1),
                             "temporal_code": round(statistics.median(code_ms), 2)}
    out["cloud_ms_median"] = {"mae_decode": round(statistics.median(decode_ms), 2)}
    return out
