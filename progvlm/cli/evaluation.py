"""eval-vlm, eval-mae, calibrate-adaptive and eval-video: accuracy, the MAE's ladder, the adaptive
rule, and a camera that watches (temporal coding of the layers on clips)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .options import add_vlm_options, emit, fail, load_backend


def add_eval_vlm(sub):
    p = sub.add_parser("eval-vlm", help="exact-match accuracy on fresh scenes, per question type, and timing",
                       description="Exact-match accuracy against ground truth on freshly "
                       "generated scenes of the evaluation seed stream (never the training "
                       "scenes), overall and per question type, with uncompressed visual "
                       "tokens; plus the time of the edge half and the cloud half.")
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    add_vlm_options(p, mae=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_eval_vlm)


def _add_question_source(p, default_count: int, verb: str, file_note: str = ""):
    """--questions, --images and --max-new-tokens of a ladder run (eval-mae, calibrate-adaptive):
    generated scenes (how many questions), or any VLM on a folder of images."""
    p.add_argument("--questions", default=None, metavar="N|FILE",
                   help=f"generated scenes: how many questions (default {default_count}); with "
                        f"--images: a file of questions, one per line{file_note} (default: a "
                        "generic set)")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help=f"{verb} on the images in DIR (any VLM; no ground truth needed)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="with --images: the longest answer generated (default %(default)s)")


def add_eval_mae(sub):
    p = sub.add_parser("eval-mae", help="bytes, fidelity, accuracy and consistency for every k",
                       description="For each k = 1..L on fresh scenes: payload bytes (mean, max), "
                       "token reconstruction cosine, exact-match accuracy, and semantic consistency "
                       "against the answer from uncompressed tokens; with the baselines (raw fp16 "
                       "tokens, JPEG q10/50/90 at the model's input size, average-pooled tokens at "
                       "about each k's bytes) on the same scenes, and the edge timing. Generated "
                       "scenes (with ground truth) exist for the bundled VLM only; for any VLM pass "
                       "--images DIR: per k the wire bytes, exact agreement and semantic "
                       "consistency with the answer from uncompressed tokens, beside JPEG q90 at "
                       "camera size, JPEG q90 at the model's input size and raw fp16 tokens. "
                       "Both also give the adaptive row: layers sent until the answer's confidence "
                       "reaches the calibrated threshold (the MAE folder's adaptive.json, see "
                       "calibrate-adaptive), with its calibration (ECE).")
    _add_question_source(p, 1000, "evaluate", ", # starts a comment")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reliability-plot", type=Path, default=None, metavar="PNG",
                   help="write the adaptive rule's reliability diagram (confidence bins against "
                        "accuracy, or agreement with --images) to this file")
    add_vlm_options(p)
    p.add_argument("--edge-runtime", choices=("pytorch", "onnx", "litert"), default="pytorch",
                   help="the edge that codes the MAE's layers (generated scenes): onnx or litert "
                        "reads --model-dir (`python -m edge_agent export`); per k, accuracy and "
                        "consistency are then against the float32 PyTorch edge's uncompressed answers")
    p.add_argument("--model-dir", type=Path, default=None, help="the export (--edge-runtime onnx/litert)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_eval_mae)


def _exported_edge(a):
    """eval-mae's --edge-runtime: None for PyTorch, else the export loaded (one thread)."""
    if a.edge_runtime == "pytorch":
        return None
    if a.model_dir is None or a.images is not None:
        raise SystemExit(f"error: --edge-runtime {a.edge_runtime} needs --model-dir, on generated "
                         "scenes (not --images)")
    from edge_agent.__main__ import make_runtime
    edge = make_runtime(a.edge_runtime, a.model_dir)
    edge.set_threads(1)
    return edge


def add_calibrate_adaptive(sub):
    from ..adaptive import ACCURACY_SLACK, GOAL_QUESTIONS
    p = sub.add_parser("calibrate-adaptive", help="choose the adaptive stopping rule and threshold; "
                       "writes adaptive.json into the MAE folder",
                       description="Every question answered from k = 1..L layers, the layer-1 "
                       "answers checked by the cloud's refinement probe (its table counted on the "
                       "same frames); a learned sufficiency rule fitted on the ladder (will the "
                       "answer at k be the answer at L?) and the fixed rules (min, mean or "
                       "geometric-mean token probability, min margin to the runner-up), every "
                       "threshold. Chosen: within --budget × the mean bytes of k = 1, the "
                       f"likeliest to meet the goal (k = L's accuracy less {ACCURACY_SLACK} within "
                       f"the budget) on an evaluation of {GOAL_QUESTIONS} questions drawn like "
                       "these, then the "
                       "most accurate, then the fewest bytes. The bundled VLM is calibrated on "
                       "held-out scenes of the evaluation stream (ground truth); any VLM with "
                       "--images DIR, agreement with its answers from uncompressed tokens in "
                       "place of accuracy (use images you do not evaluate on).")
    _add_question_source(p, 4000, "calibrate")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the calibration scenes (default: eval.calibration.CALIBRATION_SEED)")
    p.add_argument("--budget", type=float, default=None,
                   help="bytes allowed, in mean bytes of k = 1 (default: the goal's, "
                        "adaptive.BYTES_BUDGET)")
    p.add_argument("--out", type=Path, default=None, metavar="FOLDER",
                   help="where adaptive.json goes (default: the MAE folder)")
    p.add_argument("--dry-run", action="store_true", help="report the choice, write nothing")
    p.add_argument("--reliability-plot", type=Path, default=None, metavar="PNG",
                   help="write the chosen rule's reliability diagram on the calibration data")
    add_vlm_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_calibrate_adaptive)


def _time_halves(backend, repeats: int = 20) -> dict:
    """Median wall time of the edge half and the cloud half, one image at a time."""
    import torch
    from ..eval.timing import median_ms
    from ..toyworld.scenes import generate_scene, render_scene
    img = render_scene(generate_scene(7))
    q = "describe the scene ."
    edge, cloud = median_ms(lambda: backend.edge_half(img), lambda t: backend.cloud_half(t, q),
                            repeats)
    return {"edge_half_ms": round(edge, 2), "cloud_half_ms": round(cloud, 2),
            "threads": torch.get_num_threads(), "note": "host CPU, measured, batch 1, "
            "'describe' question (longest answer)"}


def cmd_eval_vlm(a) -> int:
    from tqdm import tqdm
    from ..eval.evaluate import evaluate_backend
    if a.questions < 1:
        return fail("--questions must be at least 1")
    backend = load_backend(a.vlm)
    if getattr(backend, "family", None) != "bundled":
        return fail(f"eval-vlm scores exact answers on generated scenes in the bundled model's "
                    f"vocabulary; {backend.model_id} answers in its own words. Measure it against "
                    "its own uncompressed answers with `eval-mae --vlm SPEC --mae FOLDER --images DIR`")
    t0 = time.time()
    with tqdm(desc="eval-vlm", unit="scene", file=sys.stderr) as bar:
        rep = evaluate_backend(backend, a.seed, a.questions, progress=bar.update)
    rep.update(model=backend.model_id, seed=a.seed, seconds=round(time.time() - t0, 1),
               timing=_time_halves(backend))
    lines = [f"model {rep['model']}  seed {a.seed}  {rep['questions']} questions",
             f"overall accuracy  {rep['overall']:.4f}"]
    lines += [f"  {t:<9} {v:.4f}  (n={rep['per_type_count'][t]})" for t, v in rep["per_type"].items()]
    lines.append(f"edge half {rep['timing']['edge_half_ms']} ms, cloud half "
                 f"{rep['timing']['cloud_half_ms']} ms (host CPU, measured)")
    emit(rep, a.json, lines)
    return 0


def _images_and_questions(a):
    """--images DIR and --questions FILE → (image paths, questions); says why and returns None
    for bad ones."""
    from ..eval.on_images import image_files, read_questions
    try:
        paths = image_files(a.images)
    except ValueError as e:
        fail(e)
        return None
    try:
        if a.questions is None:  # the prompts train-mae's teacher answers
            from ..training.train_mae import DEFAULT_PROMPTS
            questions = list(DEFAULT_PROMPTS)
        else:
            questions = read_questions(a.questions)
    except (OSError, ValueError) as e:
        fail(f"--questions with --images takes a file of questions: {e}")
        return None
    return paths, questions


def _ladder_job(a, desc: str, default_count: int, on_images, on_scenes):
    """The ladder run of eval-mae and calibrate-adaptive, under a progress bar: on --images DIR
    (any VLM) `on_images(split, paths, questions, progress)`, else on generated scenes (the
    bundled VLM) `on_scenes(split, count, progress)`. Returns (split, result), or None after
    saying why not."""
    from tqdm import tqdm
    from ..backends import load_vlm
    from ..split import load_split
    vlm = load_vlm(a.vlm)
    if a.images is not None:
        got = _images_and_questions(a)
        if got is None:
            return None
        paths, questions = got
        total, unit = len(paths), "image"
        run = lambda split, progress: on_images(split, paths, questions, progress)
    else:
        if getattr(vlm, "family", None) != "bundled":
            fail(f"generated scenes with ground truth exist only for the bundled model, not for "
                 f"{vlm.model_id}: pass --images DIR to use this VLM on a folder of images "
                 "(agreement and consistency with its answers from uncompressed tokens)")
            return None
        try:
            count = default_count if a.questions is None else int(a.questions)
        except ValueError:
            count = 0
        if count < 1:
            fail(f"--questions must be a number of questions ≥ 1 (a questions file goes with "
                 f"--images DIR), got {a.questions}")
            return None
        total, unit = None, "scene"
        run = lambda split, progress: on_scenes(split, count, progress)
    split = load_split(vlm, a.mae)
    try:
        with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) as bar:
            return split, run(split, bar.update)
    except ValueError as e:  # e.g. no readable image in the folder
        fail(e)
        return None


def cmd_eval_mae(a) -> int:
    """eval-mae: the ladder on generated scenes (bundled VLM) or on --images DIR (any VLM)."""
    from ..eval.evaluate import evaluate_mae
    from ..eval.on_images import evaluate_mae_on_images
    t0 = time.time()
    edge = _exported_edge(a)
    job = _ladder_job(
        a, "eval-mae", 1000,
        lambda split, paths, questions, progress: evaluate_mae_on_images(
            split, paths, questions, progress=progress, max_new_tokens=a.max_new_tokens),
        lambda split, count, progress: evaluate_mae(split, a.seed, count, progress=progress, edge=edge))
    if job is None:
        return 2
    split, rep = job
    if edge is not None and edge.name == "litert":
        from edge_agent.litert_export import export_coverage
        rep["op_coverage"] = export_coverage(a.model_dir)
    rep["seconds"] = round(time.time() - t0, 1)
    if a.images is not None:
        lines = [f"VLM {rep['vlm_id']}, MAE {rep['mae_fingerprint']}, L={rep['L']}: {rep['images']} "
                 f"images × {len(rep['questions'])} questions; no ground truth, so agreement and "
                 "consistency are against the answer from uncompressed tokens"]
    else:
        lines = [f"MAE {rep['mae_fingerprint']}, L={rep['L']}, seed {a.seed}, {rep['questions']} "
                 f"questions on {rep['scenes']} scenes; uncompressed accuracy "
                 f"{rep['uncompressed']['accuracy']:.4f}"]
    lines += _ladder_table(rep)
    lines += _adaptive_lines(rep["adaptive"], split, a.reliability_plot)
    if "timing" in rep:
        t = rep["timing"]
        lines.append(f"edge half {t['edge_half_ms']} ms, MAE compress {t['mae_compress_ms']} ms "
                     f"({100 * t['mae_share_of_edge_half']:.1f}% of the edge half; host CPU, measured)")
    lines += [f"skipped {s}" for s in rep.get("skipped", [])]
    emit(rep, a.json, lines)
    return 0


def _ladder_table(rep: dict) -> list[str]:
    """The eval-mae table: one row per k, the adaptive policy, then each baseline."""
    target = rep["adaptive"]["target"]  # accuracy (ground truth) or agreement
    rows = ([(f"k={r['k']}", r, f"{r['token_cosine']:>8.4f}") for r in rep["per_k"]]
            + [("adaptive", rep["adaptive"], "")]
            + [(name, r, "") for name, r in rep["baselines"].items()])
    w = max(12, *(len(name) for name, _, _ in rows))
    lines = [f"{'':>{w}} {'bytes mean':>10} {'max':>7} {'tok cos':>8} {target:>9} {'consist.':>9}"]
    for name, r, cosine in rows:
        lines.append(f"{name:>{w}} {r['bytes_mean']:>10.1f} {r.get('bytes_max', ''):>7} {cosine:>8} "
                     f"{r[target]:>9.4f} {r['consistency']:>9.4f}")
    return lines


def _adaptive_lines(ad: dict, split, plot: Path | None) -> list[str]:
    """The adaptive row's details under the eval-mae table; writes the reliability plot."""
    from ..adaptive import plot_reliability
    target, L = ad["target"], len(ad["layers_histogram"])
    _, source = split.adaptive_threshold()
    hist = ", ".join(f"k={k}: {n}" for k, n in ad["layers_histogram"].items())
    lines = [f"adaptive: {ad['rule']} ≥ {ad['threshold']:.4g} ({source}); mean layers "
             f"{ad['mean_layers']:.3f} ({hist}); bytes {ad['bytes_ratio_to_k1']:.3f}× k=1's "
             f"{ad['k1_bytes_mean']:.1f} (per question); {target} {ad[target]:.4f} vs k={L}'s "
             f"{ad[f'k{L}_{target}']:.4f}",
             f"goal ({target} of k={L} at ≤ {ad['budget']}× the bytes of k=1): "
             + ("met" if ad["goal_met"] else "NOT met")
             + f"; calibration: ECE {ad['reliability']['ece']:.4f} over all "
               f"{ad['reliability']['answers']} answers (k=1..{L}), "
               f"{ad['reliability_k1']['ece']:.4f} at k=1"]
    if plot is not None:
        title = (f"{ad['rule']} confidence vs {target}, k=1..{L} "
                 f"(ECE {ad['reliability']['ece']:.3f})")
        lines.append(f"reliability plot: {plot_reliability(ad['reliability'], plot, title)}")
    return lines


def cmd_calibrate_adaptive(a) -> int:
    from .. import adaptive
    from ..eval import calibration
    budget = adaptive.BYTES_BUDGET if a.budget is None else a.budget
    if not 1.0 <= budget <= 100.0:
        return fail(f"--budget must be in 1..100 (mean bytes of k = 1), got {budget}")
    t0 = time.time()
    job = _ladder_job(
        a, "calibrate", 4000,
        lambda split, paths, questions, progress: calibration.calibrate_on_images(
            split, paths, questions, progress, a.max_new_tokens, budget),
        lambda split, count, progress: calibration.calibrate_on_scenes(
            split, count, calibration.CALIBRATION_SEED if a.seed is None else a.seed,
            progress=progress, budget=budget))
    if job is None:
        return 2
    split, (choice, ladder) = job
    choice["seconds"] = round(time.time() - t0, 1)
    target, L = choice["target"], split.num_layers
    lines = [f"calibration on {choice['calibrated_on']}",
             "fixed k: " + ", ".join(f"k={r['k']} {r['bytes_mean']:.1f} B {target} {r[target]:.4f}"
                                     for r in choice["fixed_k"]),
             f"each rule's best threshold within {budget}× the bytes of k=1:",
             f"{'rule':>14} {'threshold':>10} {'bytes/k=1':>10} {target:>9} {f'vs k={L}':>8} "
             f"{'layers':>7} {'goal rate':>9}"]
    for r in choice["per_rule"]:
        lines.append(f"{r['rule']:>14} {r['threshold']:>10.4g} {r['bytes_ratio']:>10.3f} "
                     f"{r[target]:>9.4f} {r[f'{target}_vs_k{L}']:>+8.4f} {r['mean_layers']:>7.3f} "
                     f"{r['goal_rate']:>9.3f}")
    lines.append(f"chosen: {choice['rule']} ≥ {choice['threshold']:.4g}; goal ({target} of k={L} "
                 f"less {adaptive.ACCURACY_SLACK} at ≤ {budget}× the bytes of k=1) "
                 + ("met" if choice["goal_met"] else "NOT met") + " on the calibration data, and on "
                 f"{choice['chosen']['goal_rate']:.0%} of {adaptive.GOAL_RESAMPLES} draws of "
                 f"{adaptive.GOAL_QUESTIONS} of its questions")
    if a.reliability_plot is not None:
        rel = adaptive.reliability(ladder.confidence(calibration.rule_of(choice)), ladder.correct())
        title = (f"{choice['rule']} confidence vs {target}, k=1..{L}, calibration data "
                 f"(ECE {rel['ece']:.3f})")
        lines.append(f"reliability plot (ECE {rel['ece']:.4f}): "
                     f"{adaptive.plot_reliability(rel, a.reliability_plot, title)}")
    if not a.dry_run:
        try:
            lines.append(f"written: {calibration.save_calibration(split, choice, ladder, a.out)}")
        except (OSError, ValueError) as e:
            return fail(f"cannot write adaptive.json: {e}")
    emit(choice, a.json, lines)
    return 0


def add_eval_video(sub):
    from ..codec.temporal import KEY_EVERY, REUSE_BIAS
    from ..eval.video import FPS
    p = sub.add_parser("eval-video", help="clips: bytes per frame and accuracy of intra vs temporal "
                       "progressive, H.264, and standing-question events",
                       description="On seeded clips of the bundled world (static: sensor noise "
                       "only; moving: one object moving per frame), for each k: bytes per frame of "
                       "intra progressive (every frame its own stream) and temporal progressive "
                       "(frame t coded against the cloud's frame t-1), their ratio over non-key "
                       "frames, and per-frame exact-match accuracy of standing questions against "
                       "ground truth; H.264 at the bitrate matching temporal progressive (k = the "
                       "first --k), at a few bitrates up to 1 Mbps, the whole VLM on each decoded "
                       "frame; on 'events' clips, the events the temporal answers raise against the "
                       "ground-truth changes (detected within 2 frames, missed, false, delay).")
    p.add_argument("--clips", type=int, default=4, help="clips of each kind (default %(default)s)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--k", type=int, nargs="+", default=None, metavar="K",
                   help="the k values (default 1..L); the first is the headline")
    p.add_argument("--fps", type=int, default=FPS, help="frame rate of the stream (H.264's rate "
                   "control and the matched bitrate; default %(default)s)")
    p.add_argument("--key-every", type=int, default=KEY_EVERY, metavar="N",
                   help="a key frame at least every N frames (0: only the first; default %(default)s)")
    p.add_argument("--reuse-bias", type=float, default=REUSE_BIAS,
                   help="the temporal coder's reuse bias (default %(default)s)")
    p.add_argument("--no-h264", action="store_true", help="skip the H.264 comparison")
    add_vlm_options(p)
    p.add_argument("--json", action="store_true", help="print only the one JSON object")
    p.set_defaults(run=cmd_eval_video)


def cmd_eval_video(a) -> int:
    from tqdm import tqdm
    from ..eval.video import evaluate_video, table_lines, total_frames
    from ..split import load_split
    if a.clips < 1 or a.frames < 2 or a.fps < 1 or a.key_every < 0 or not a.reuse_bias >= 0:
        return fail("--clips ≥ 1, --frames ≥ 2, --fps ≥ 1, --key-every ≥ 0 and --reuse-bias ≥ 0 "
                    "are required")
    split = load_split(a.vlm, a.mae)
    if getattr(split.vlm, "family", None) != "bundled":
        return fail(f"eval-video scores answers against the ground truth of generated clips, in the "
                    f"bundled model's vocabulary; {split.vlm.model_id} answers in its own words")
    try:
        with tqdm(total=total_frames(a.clips, a.frames, not a.no_h264), desc="eval-video",
                  unit="frame", file=sys.stderr) as bar:
            rep = evaluate_video(split, a.clips, a.frames, a.seed, a.k, a.fps, a.key_every,
                                 a.reuse_bias, h264=not a.no_h264, progress=bar.update)
    except ValueError as e:
        return fail(e)
    emit(rep, a.json, [] if a.json else table_lines(rep))
    return 0
