"""eval-video: a camera that watches, measured on clips of the bundled world with exact truth.

For each clip kind (static: sensor noise only; moving: one object moving per frame) and each k:
the bytes per frame and the per-frame exact-match accuracy of
    intra       every frame its own progressive bitstream (the key frame of progvlm.codec.temporal,
                byte for byte today's intra stream)
    temporal    frame t coded against what the cloud holds of frame t−1 (TemporalCoder), the cloud
                decoding it with `temporal.apply`, as the watch stream does
and, on the same clips, full-cloud as a real video stream: H.264 (progvlm.video.h264) at the
bitrate that matches temporal progressive's bytes per frame (k = the headline k), at 1 Mbps and at
a few bitrates between, the whole VLM answering from each decoded frame.

On "events" clips (objects appearing, disappearing, changing colour) the standing questions'
answers from temporal progressive give events (an answer that differs from the previous frame's),
matched against the frames where the ground truth changed.

Standing questions of a clip: questions_for(its first scene) under a seeded rng, answered on every
frame; accuracy skips frames where a question has no true answer (truth() is None). Every number is
deterministic for a seed. `bytes_ratio` is temporal / intra over the non-key frames: frames the
temporal coder was free to code as a delta (not the first, not a key frame by period); a key frame
the coder chose because it was smaller than the delta ("scene change") counts as coded.
"""
from __future__ import annotations

import hashlib
import statistics
import time
from collections import Counter

import numpy as np

from ..codec import temporal
from ..codec.temporal import KEY_EVERY, REUSE_BIAS
from ..toyworld import clips as toyclips
from ..toyworld.questions import questions_for
from ..video.reader import DEFAULT_FPS

FPS = round(DEFAULT_FPS)  # frames per second of the clips (H.264's rate control, event times)
H264_FIXED_BPS = 1_000_000
H264_MIN_BPS = 1000  # the lowest bitrate H264Stream takes (x264's rate control in kbit/s)
H264_SWEEP_BPS = (5_000, 15_000, 50_000, 150_000, 400_000)  # between the matched bitrate and 1 Mbps
KINDS = ("static", "moving")
EVENT_WINDOW = 2  # a change is detected by an event at most this many frames after it
_KIND_INDEX = {"static": 0, "moving": 1, "events": 2}


def clip_seed(seed: int, kind: str, index: int) -> int:
    """The make_clip seed of clip `index` of `kind` in the run of `seed`."""
    return int(np.random.SeedSequence([seed, _KIND_INDEX[kind], index]).generate_state(1)[0])


def standing_questions(clip, seed: int, kind: str, index: int) -> list[str]:
    """The questions a user keeps asking of this clip: one of each type its first scene allows."""
    rng = np.random.default_rng([seed, _KIND_INDEX[kind], index, 7])
    return list(dict.fromkeys(qa.question for qa in questions_for(clip.scenes[0], rng)))


# ---- one clip through intra and temporal progressive, every k ---------------------------------
def _frame_tokens(split, image):
    tokens, grid = split.vlm.vision(split.vlm.preprocess(image))
    return tokens, grid


class _Answers:
    """The language half over one clip's standing questions, each distinct decoded latent answered
    once (a static stream's reference, or a temporal frame equal to its intra one, is not asked
    twice); requests of one frame run as one batch."""

    def __init__(self, split, questions: list[str]):
        self.split, self.questions = split, questions
        self.cache: dict[tuple, list[str]] = {}
        self.pending: dict[tuple, tuple] = {}

    def ask_latent(self, latent: np.ndarray, k: int, grid) -> tuple:
        key = ("latent", k, hashlib.sha1(latent.tobytes()).hexdigest())
        if key not in self.cache and key not in self.pending:
            self.pending[key] = (lambda: self.split.decode_latent(latent, k), grid)
        return key

    def ask_tokens(self, tokens, grid, name: str) -> tuple:
        key = ("tokens", name)
        self.cache.pop(key, None)
        self.pending[key] = (lambda: tokens, grid)
        return key

    def run(self):
        if not self.pending:
            return
        keys = list(self.pending)
        requests = []
        for key in keys:
            make, grid = self.pending[key]
            tokens = make()
            requests += [(tokens, q, grid) for q in self.questions]
        texts = [a.text.strip() for a in self.split.language_batch(requests)]
        n = len(self.questions)
        for i, key in enumerate(keys):
            self.cache[key] = texts[i * n:(i + 1) * n]
        self.pending.clear()

    def __getitem__(self, key) -> list[str]:
        return self.cache[key]


def run_clip(split, clip, questions: list[str], ks, key_every: int = KEY_EVERY, reuse_bias: float = REUSE_BIAS,
             progress=None) -> dict:
    """One clip, every frame, every k: intra and temporal bytes and answers (the temporal stream
    decoded by the cloud's `apply`), the uncompressed answers, and the truth. Lists per frame."""
    tables = split.mae.edge_codec()
    coders = {k: temporal.TemporalCoder(tables, key_every, reuse_bias) for k in ks}
    edge_ref = {k: None for k in ks}  # what the edge believes the cloud holds
    cloud_ref = {k: None for k in ks}  # what the cloud holds (decoded from the wire bytes)
    since_key = {k: 0 for k in ks}
    answers = _Answers(split, questions)
    out = {"questions": questions, "truth": [], "uncompressed": [],
           "per_k": {k: {"intra_bytes": [], "temporal_bytes": [], "free": [], "kind": [],
                         "reason": [], "changed": [], "intra": [], "temporal": [],
                         "mismatch": 0} for k in ks}}
    for t in range(len(clip.scenes)):
        tokens, grid = _frame_tokens(split, clip.frame(t))
        latent = split.mae._latent(tokens)
        out["tokens"] = len(latent)
        keys = {"uncompressed": answers.ask_tokens(tokens, grid, "uncompressed")}
        for k in ks:
            row = out["per_k"][k]
            key = coders[k].key(latent, k, grid)
            coded = coders[k].code(latent, k, edge_ref[k], grid, since_key[k])
            cloud_ref[k], _, kind = temporal.apply(coded.data, tables, cloud_ref[k], split.fingerprint)
            edge_ref[k] = coded.reference
            row["mismatch"] += int(not (np.array_equal(cloud_ref[k].indices, coded.reference.indices)
                                        and np.array_equal(cloud_ref[k].depth, coded.reference.depth)))
            since_key[k] = 0 if kind == temporal.KEY else since_key[k] + 1
            row["intra_bytes"].append(len(key.data))
            row["temporal_bytes"].append(len(coded.data))
            row["free"].append(not (kind == temporal.KEY and coded.reason != "scene change"))
            row["kind"].append(kind)
            row["reason"].append(coded.reason)
            row["changed"].append(coded.changed)
            keys[("intra", k)] = answers.ask_latent(key.reference.latent(tables, k), k, grid)
            keys[("temporal", k)] = answers.ask_latent(cloud_ref[k].latent(tables, k), k, grid)
        answers.run()
        out["truth"].append([toyclips.truth(clip.scenes[t], q) for q in questions])
        out["uncompressed"].append(answers[keys["uncompressed"]])
        for k in ks:
            out["per_k"][k]["intra"].append(answers[keys[("intra", k)]])
            out["per_k"][k]["temporal"].append(answers[keys[("temporal", k)]])
        if progress:
            progress(1)
    return out


# ---- scores -----------------------------------------------------------------------------------
def _tally(truth_rows, answer_rows) -> tuple[int, int]:
    """(right, scored) over frames × questions, skipping questions without a true answer."""
    right = scored = 0
    for truths, preds in zip(truth_rows, answer_rows):
        for truth, pred in zip(truths, preds):
            if truth is not None:
                scored += 1
                right += int(pred == truth)
    return right, scored


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


def summarise_kind(runs: list[dict], ks) -> dict:
    """Per k and at the headline k (the first of ks): bytes over non-key frames (intra, temporal,
    their ratio), temporal bytes over every frame (key frames included), accuracies."""
    right, scored = map(sum, zip(*(_tally(r["truth"], r["uncompressed"]) for r in runs)))
    per_k = {}
    for k in ks:
        rows = [r["per_k"][k] for r in runs]
        free = [(i, t) for row in rows for i, t, f in
                zip(row["intra_bytes"], row["temporal_bytes"], row["free"]) if f]
        intra_b, temp_b = _mean(i for i, _ in free), _mean(t for _, t in free)
        ri, si = map(sum, zip(*(_tally(r["truth"], r["per_k"][k]["intra"]) for r in runs)))
        rt, st = map(sum, zip(*(_tally(r["truth"], r["per_k"][k]["temporal"]) for r in runs)))
        acc_i, acc_t = ri / max(1, si), rt / max(1, st)
        per_k[str(k)] = {
            "bytes_per_frame_intra": round(intra_b, 4),
            "bytes_per_frame_temporal": round(temp_b, 4),
            "bytes_ratio": _ratio(round(temp_b, 4), round(intra_b, 4)),
            "bytes_per_frame_temporal_with_keys": round(_mean(b for row in rows for b in row["temporal_bytes"]), 4),
            "bytes_per_frame_intra_all": round(_mean(b for row in rows for b in row["intra_bytes"]), 4),
            "accuracy_intra": round(acc_i, 6), "accuracy_temporal": round(acc_t, 6),
            "accuracy_gap": round(acc_t - acc_i, 6),
            "non_key_frames": len(free),
            "delta_frames": sum(kind == temporal.DELTA_KIND for row in rows for kind in row["kind"]),
            "key_frames": dict(Counter(r for row in rows for r, kind in zip(row["reason"], row["kind"])
                                       if kind == temporal.KEY)),
            "changed_tokens_mean": round(_mean(c for row in rows for c, kind in
                                               zip(row["changed"], row["kind"])
                                               if kind == temporal.DELTA_KIND), 3),
            "reference_mismatches": sum(row["mismatch"] for row in rows),
            "answers_scored": st,
        }
    head = per_k[str(ks[0])]
    return {"k": ks[0], **{f: head[f] for f in ("bytes_per_frame_intra", "bytes_per_frame_temporal",
                                                "bytes_ratio", "bytes_per_frame_temporal_with_keys",
                                                "accuracy_intra", "accuracy_temporal", "accuracy_gap")},
            "accuracy_uncompressed": round(right / max(1, scored), 6),
            "clips": len(runs), "frames": sum(len(r["truth"]) for r in runs),
            "questions_per_clip": _mean(len(r["questions"]) for r in runs),
            "tokens_per_frame": runs[0]["tokens"], "per_k": per_k}


# ---- events -----------------------------------------------------------------------------------
def answer_events(rows: list[list[str]]) -> list[list[int]]:
    """Per question, the frames whose answer differs from the previous frame's."""
    return [[t for t in range(1, len(rows)) if rows[t][q] != rows[t - 1][q]]
            for q in range(len(rows[0]) if rows else 0)]


def event_pairs(changes: list[int], events: list[int], window: int = EVENT_WINDOW):
    """Each ground-truth change (in frame order) takes the earliest unused event at most `window`
    frames after it → ((change, event) of the detected, missed count, false events)."""
    used, pairs, missed = set(), [], 0
    for c in sorted(changes):
        hit = next((e for e in sorted(events) if e not in used and c <= e <= c + window), None)
        if hit is None:
            missed += 1
        else:
            used.add(hit)
            pairs.append((c, hit))
    return pairs, missed, len([e for e in events if e not in used])


def match_events(changes: list[int], events: list[int], window: int = EVENT_WINDOW):
    """event_pairs as (delays of the detected in frames, missed count, false events)."""
    pairs, missed, false = event_pairs(changes, events, window)
    return [e - c for c, e in pairs], missed, false


def score_events(runs: list[dict], clip_changes: list[list[list[int]]], answer_key) -> dict:
    """detected / missed / false (and its rate over frames × questions after the first) and the
    median delay of events from `answer_key(run)` (rows of answers per frame) on each clip.
    "answerable": the same over the changes between two true answers only (not the changes to
    or from a question without one, e.g. about an object that has just left the scene)."""
    delays, missed, false, slots, changes = [], 0, 0, 0, 0
    a_delays, a_missed, a_changes = [], 0, 0
    for run, per_q in zip(runs, clip_changes):
        events = answer_events(answer_key(run))
        for q, (q_changes, q_events) in enumerate(zip(per_q, events)):
            d, m, f = match_events(q_changes, q_events)
            delays += d
            missed, false, changes = missed + m, false + f, changes + len(q_changes)
            truth = run["truth"]
            answerable = [c for c in q_changes if truth[c - 1][q] is not None and truth[c][q] is not None]
            d, m, _ = match_events(answerable, q_events)
            a_delays, a_missed, a_changes = a_delays + d, a_missed + m, a_changes + len(answerable)
        slots += max(0, len(run["truth"]) - 1) * len(run["questions"])
    return {"changes": changes, "detected": len(delays), "missed": missed, "false": false,
            "false_rate": round(false / max(1, slots), 6),
            "delay_frames_median": statistics.median(delays) if delays else None,
            "delay_frames_mean": round(_mean(delays), 4) if delays else None,
            "answerable": {"changes": a_changes, "detected": len(a_delays), "missed": a_missed,
                           "delay_frames_median": statistics.median(a_delays) if a_delays else None}}


# ---- H.264, the full-cloud video stream --------------------------------------------------------
def h264_clip(split, clip, questions: list[str], bps: int, fps: int = FPS) -> tuple[list[int], int, int]:
    """A clip through H.264 at `bps` (encoded at `fps`), decoded at the cloud, the whole VLM on
    each decoded frame → (bytes per frame, right, scored). A frame the decoder has not output yet
    is answered from the last one it has (what the cloud holds), none yet: answered wrong."""
    from ..video.h264 import H264Decoder, H264Stream
    first = clip.frame(0)
    stream = H264Stream(first.width, first.height, fps, int(bps))
    decoder = H264Decoder()
    sizes, right, scored, shown = [], 0, 0, None
    for t in range(len(clip.scenes)):
        packet = stream.encode(first if t == 0 else clip.frame(t))
        sizes.append(len(packet))
        picture = decoder.decode(packet) if packet else None
        shown = picture if picture is not None else shown
        truths = [toyclips.truth(clip.scenes[t], q) for q in questions]
        if shown is None:
            scored += sum(x is not None for x in truths)
            continue
        tokens, grid = _frame_tokens(split, shown)
        texts = [a.text.strip() for a in split.language_batch([(tokens, q, grid) for q in questions])]
        r, s = _tally([truths], [texts])
        right, scored = right + r, scored + s
    return sizes, right, scored


def h264_points(split, clips_qs, bitrates: dict[str, int], fps: int, progress=None) -> dict:
    """name → {bitrate_bps, bytes_per_frame, accuracy} over the clips [(clip, questions)]."""
    out = {}
    for name, bps in bitrates.items():
        sizes, right, scored = [], 0, 0
        for clip, questions in clips_qs:
            s, r, n = h264_clip(split, clip, questions, bps, fps)
            sizes += s
            right, scored = right + r, scored + n
            if progress:
                progress(len(s))
        out[name] = {"bitrate_bps": int(bps), "bytes_per_frame": round(_mean(sizes), 2),
                     "accuracy": round(right / max(1, scored), 6)}
    return out


def h264_comparison(points: dict, temporal_bytes: float, temporal_accuracy: float) -> dict:
    """Against temporal progressive: accuracy at the matched bitrate, and the bytes of the
    cheapest H.264 point at least as accurate (equal accuracy: within 0.005 below)."""
    matched = points["matched"]
    equal = [p for p in points.values() if p["accuracy"] >= temporal_accuracy - 0.005]
    cheapest = min(equal, key=lambda p: p["bytes_per_frame"]) if equal else None
    return {"accuracy_vs_matched": round(temporal_accuracy - matched["accuracy"], 6),
            "bytes_at_equal_accuracy": cheapest and {
                "h264_bitrate_bps": cheapest["bitrate_bps"],
                "h264_bytes_per_frame": cheapest["bytes_per_frame"],
                "temporal_fraction": _ratio(temporal_bytes, cheapest["bytes_per_frame"])}}


# ---- the whole evaluation ---------------------------------------------------------------------
def evaluate_video(split, clips: int = 4, frames: int = 16, seed: int = 1, ks=None, fps: int = FPS,
                   key_every: int = KEY_EVERY, reuse_bias: float = REUSE_BIAS, h264: bool = True,
                   h264_sweep=H264_SWEEP_BPS, events: bool = True, progress=None) -> dict:
    """The eval-video report (see the module's docstring) for the bundled model. `ks`: the k
    values (default 1..L; the first is the headline). `progress(n)`: n frames done."""
    t0 = time.time()
    ks = list(ks or range(1, split.num_layers + 1))
    if not ks or any(not 1 <= k <= split.num_layers for k in ks):
        raise ValueError(f"k must be in 1..{split.num_layers}, got {ks}")
    if clips < 1 or frames < 2:
        raise ValueError("at least 1 clip of at least 2 frames")
    report = {}
    made = {}
    for kind in KINDS + (("events",) if events else ()):
        made[kind] = []
        runs = []
        for i in range(clips):
            clip = toyclips.make_clip(clip_seed(seed, kind, i), frames, kind)
            questions = standing_questions(clip, seed, kind, i)
            runs.append(run_clip(split, clip, questions, ks, key_every, reuse_bias, progress))
            made[kind].append((clip, questions))
        summary = summarise_kind(runs, ks)
        if kind == "events":
            changes = [[toyclips.changes(c, q) for q in qs] for c, qs in made[kind]]
            ev = {"k": ks[0], **score_events(runs, changes, lambda r: r["per_k"][ks[0]]["temporal"]),
                  "questions": sum(len(qs) for _, qs in made[kind]),
                  "questions_changing": sum(bool(c) for per_q in changes for c in per_q),
                  "per_k": {str(k): score_events(runs, changes, lambda r, k=k: r["per_k"][k]["temporal"])
                            for k in ks},
                  "intra": score_events(runs, changes, lambda r: r["per_k"][ks[0]]["intra"]),
                  "uncompressed": score_events(runs, changes, lambda r: r["uncompressed"]),
                  "bytes": {f: summary[f] for f in ("bytes_per_frame_intra", "bytes_per_frame_temporal",
                                                    "bytes_ratio", "accuracy_intra", "accuracy_temporal")}}
            report["events"] = ev
        else:
            report[kind] = summary
    if h264:
        report["h264"] = {"fps": fps}
        for kind in KINDS:
            s = report[kind]
            target = s["bytes_per_frame_temporal_with_keys"] * 8 * fps
            rates = {"matched": max(H264_MIN_BPS, round(target)), **{f"{b // 1000}kbps": b for b in h264_sweep},
                     "1mbps": H264_FIXED_BPS}
            points = h264_points(split, made[kind], rates, fps, progress)
            report["h264"][kind] = {
                "matched_to": f"temporal k={ks[0]} bytes per frame (key frames included) × 8 × {fps} fps",
                "matched_target_bps": round(target, 1),
                "matched_floored": target < H264_MIN_BPS,  # x264 takes no less than 1 kbit/s
                "points": points, "at_matched_bitrate": points["matched"], "at_1mbps": points["1mbps"],
                "vs_temporal": h264_comparison(points, s["bytes_per_frame_temporal_with_keys"],
                                               s["accuracy_temporal"])}
    report["settings"] = {"clips": clips, "frames": frames, "seed": seed, "k": ks, "fps": fps,
                          "key_every": key_every, "reuse_bias": reuse_bias,
                          "h264_bitrates_bps": sorted({*h264_sweep, H264_FIXED_BPS}) if h264 else [],
                          "event_window_frames": EVENT_WINDOW, "mae_fingerprint": split.fingerprint.hex(),
                          "L": split.num_layers}
    report["elapsed_s"] = round(time.time() - t0, 2)
    return report


def total_frames(clips: int, frames: int, h264: bool = True, events: bool = True,
                 h264_points_per_kind: int = 2 + len(H264_SWEEP_BPS)) -> int:
    """What evaluate_video's progress counts up to."""
    kinds = len(KINDS) + int(events)
    return clips * frames * (kinds + (len(KINDS) * h264_points_per_kind if h264 else 0))


def table_lines(rep: dict) -> list[str]:
    """The readable report."""
    st = rep["settings"]
    lines = [f"eval-video: {st['clips']} clips × {st['frames']} frames per kind, seed {st['seed']}, "
             f"key_every {st['key_every']}, reuse_bias {st['reuse_bias']}, MAE {st['mae_fingerprint']}"]
    head = f"{'':>8} {'k':>2} {'intra B':>8} {'temp B':>8} {'ratio':>7} {'w/ keys':>8} " \
           f"{'acc intra':>9} {'acc temp':>9} {'gap':>8}"
    lines.append(head)
    for kind in KINDS:
        for k, r in rep[kind]["per_k"].items():
            lines.append(f"{kind:>8} {k:>2} {r['bytes_per_frame_intra']:>8.2f} "
                         f"{r['bytes_per_frame_temporal']:>8.2f} {r['bytes_ratio'] or 0:>7.4f} "
                         f"{r['bytes_per_frame_temporal_with_keys']:>8.2f} {r['accuracy_intra']:>9.4f} "
                         f"{r['accuracy_temporal']:>9.4f} {r['accuracy_gap']:>+8.4f}")
        lines.append(f"{kind:>8}  uncompressed accuracy {rep[kind]['accuracy_uncompressed']:.4f}")
    for kind, h in rep.get("h264", {}).items():
        if kind == "fps":
            continue
        pts = ", ".join(f"{n} ({p['bitrate_bps']} bps): {p['bytes_per_frame']:.0f} B acc "
                        f"{p['accuracy']:.4f}" for n, p in h["points"].items())
        eq = h["vs_temporal"]["bytes_at_equal_accuracy"]
        lines.append(f"H.264 {kind} @{rep['h264']['fps']} fps: {pts}")
        lines.append(f"   temporal − H.264 at matched bitrate: {h['vs_temporal']['accuracy_vs_matched']:+.4f} "
                     "accuracy; at equal accuracy temporal sends "
                     + (f"{eq['temporal_fraction']:.4f}× H.264's bytes ({eq['h264_bitrate_bps']} bps)"
                        if eq else "— (no H.264 point as accurate)"))
    if "events" in rep:
        e = rep["events"]
        lines.append(f"events (temporal k={e['k']}): {e['changes']} changes, detected {e['detected']}, "
                     f"missed {e['missed']}, false {e['false']} ({100 * e['false_rate']:.2f}%), "
                     f"median delay {e['delay_frames_median']} frames; intra: detected "
                     f"{e['intra']['detected']}, false {e['intra']['false']}; uncompressed: detected "
                     f"{e['uncompressed']['detected']}, false {e['uncompressed']['false']}")
        a = e["answerable"]
        lines.append(f"   of them between two true answers: {a['changes']} changes, detected "
                     f"{a['detected']}, missed {a['missed']}, median delay {a['delay_frames_median']}")
    lines.append(f"elapsed {rep['elapsed_s']} s")
    return lines
