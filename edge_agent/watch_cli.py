"""`python -m edge_agent watch`: a clip through the device to the cloud, its standing questions'
events printed as they arrive (one JSON line each), then a summary line.

    python -m edge_agent watch --clip 7 --kind events --question "how many objects are there ?"
    python -m edge_agent watch --video door.mp4 --question "is there a red square ?" --method h264

The options are WatchSettings' fields (edge_agent/watch.py: their defaults, ranges and meaning),
`--question` repeatable. `--clip SEED` plays a clip of the bundled world (progvlm.toyworld.clips),
whose ground truth is known: the summary then says which true changes were detected, missed,
and which events were false. Without --cloud-url a cloud backend is started on loopback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .watch import WatchSettings, Watcher, summarise

SKIP = ("questions",)  # --question, repeatable


def add_watch_parser(sub, add_device_options):
    p = sub.add_parser("watch", help="play a clip through the device and the cloud: standing "
                                     "questions' events as JSON lines, then a summary",
                       description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", type=Path, help="a clip: GIF, MP4, WebM, …")
    source.add_argument("--clip", type=int, metavar="SEED", help="a clip of the bundled world")
    p.add_argument("--kind", default="events", help="--clip: static, moving or events")
    p.add_argument("--frames", type=int, default=24, help="--clip: frames")
    p.add_argument("--question", action="append", required=True, metavar="QUESTION",
                   help="a standing question (repeatable)")
    for name, field in WatchSettings.model_fields.items():
        if name in SKIP:
            continue
        kind = next((t for t in (int, float, str) if t in _types(field.annotation)), str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{field.description} (default: {field.default})")
    p.add_argument("--cloud-url", default=None, help="a running cloud backend (default: start one)")
    add_device_options(p)


def _types(annotation) -> set:
    import typing
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {str}
    return set(args) if args else {annotation}


def _frames(a):
    """(frames, fps, the clip when it has ground truth)."""
    if a.video is not None:
        from progvlm.video.reader import read_video
        video = read_video(a.video)
        return video.frames, video.fps, None
    from progvlm.toyworld.clips import make_clip
    clip = make_clip(a.clip, a.frames, a.kind)
    return [clip.frame(t) for t in range(len(clip.scenes))], None, clip


def score_events(events: list[dict], true_changes: dict[str, list[int]]) -> dict:
    """Events against the true changes per question, matched as eval-video matches them
    (progvlm.eval.video.match_events: a change takes the first unused event on its question within
    EVENT_WINDOW frames after it; events matching none are false). The first frame's answers are
    the stream's start, not changes: neither side counts them."""
    from progvlm.eval.video import match_events
    detected, missed, false, delays = 0, 0, 0, []
    for question, changes in true_changes.items():
        times = [e["index"] for e in events if e["question"] == question and e["index"] > 0]
        d, m, f = match_events([c for c in changes if c > 0], times)
        detected, missed, false, delays = detected + len(d), missed + m, false + f, delays + d
    delays.sort()
    return {"detected": detected, "missed": missed, "false": false,
            "delay_frames_median": delays[len(delays) // 2] if delays else None}


def cmd_watch(a, make_runtime, token_env: str) -> int:
    """`make_runtime(kind, model_dir, vlm, mae)` and the cloud token's variable: the edge CLI's."""
    from progvlm.net.exchange import CloudError
    from progvlm.serve.children import cloud_service
    fields = {name: getattr(a, name) for name in WatchSettings.model_fields
              if name not in SKIP and getattr(a, name, None) is not None}
    token, child, cloud_url = os.environ.get(token_env) or None, None, a.cloud_url
    try:
        frames, fps, clip = _frames(a)
        settings = WatchSettings(questions=a.question, **({"fps": fps} if fps else {}), **fields)
        runtime = make_runtime(a.runtime, a.model_dir, a.vlm, a.mae)
        settings.check(runtime.num_layers)
        if cloud_url is None:
            child = cloud_service(token=token, vlm=a.vlm, mae=a.mae)
            print(f"starting a cloud backend at {child.url} …", file=sys.stderr)
            child.start()
            cloud_url, token = child.url, child.token
        from .profiles import get_profile
        watcher = Watcher(runtime, cloud_url, settings, token, profile=get_profile(a.profile))
        records = []
        try:
            for image in frames:
                records.append(watcher.frame(image))
                for event in records[-1]["events"]:
                    print(json.dumps({"type": "event", "index": records[-1]["index"],
                                      "t_s": round(records[-1]["index"] / settings.fps, 3), **event}),
                          flush=True)
        finally:
            watcher.close()
    except (CloudError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if child:
            child.stop()
    summary = summarise(records, settings)
    summary.pop("events")
    if clip is not None:
        from progvlm.toyworld.clips import changes
        events = [{"index": r["index"], **e} for r in records for e in r["events"]]
        summary["ground_truth"] = score_events(events, {q: changes(clip, q) for q in settings.questions})
    print(json.dumps({"type": "summary", **summary}))
    return 0
