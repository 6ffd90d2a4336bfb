"""Exact-match evaluation of a backend on freshly generated scenes."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .. import adaptive
from ..toyworld.data import EVAL_STREAM, scenes as make_scenes
from ..toyworld.questions import QA, QUESTION_TYPES, questions_for
from ..toyworld.scenes import render_scene


def eval_questions(seed: int, count: int, stream: int = EVAL_STREAM, start: int = 0):
    """`count` questions (one of each type per scene, in turn) on scenes of `stream` (default
    the evaluation stream) from scene index `start` on."""
    rng = np.random.default_rng([stream, seed] + ([start] if start else []))
    items: list[tuple[int, QA]] = []
    scene_list = []
    i = start
    while len(items) < count:
        sc = make_scenes(stream, seed, 1, start=i)[0]
        scene_list.append(sc)
        for qa in questions_for(sc, rng, QUESTION_TYPES):
            items.append((len(scene_list) - 1, qa))
        i += 1
    return scene_list, items[:count]


def accuracy_report(items, predictions) -> dict:
    right, total = Counter(), Counter()
    for (_, qa), pred in zip(items, predictions):
        total[qa.qtype] += 1
        right[qa.qtype] += int(pred.strip() == qa.answer)
    per_type = {t: right[t] / total[t] for t in QUESTION_TYPES if total[t]}
    return {"overall": sum(right.values()) / max(1, sum(total.values())),
            "per_type": per_type, "questions": sum(total.values()),
            "per_type_count": dict(total)}


def evaluate_backend(backend, seed: int, count: int, batch_scenes: int = 64, progress=None) -> dict:
    scene_list, items = eval_questions(seed, count)
    preds = [None] * len(items)
    for s0 in range(0, len(scene_list), batch_scenes):
        chunk = range(s0, min(len(scene_list), s0 + batch_scenes))
        tokens = backend.edge_half_batch([render_scene(scene_list[s]) for s in chunk])
        sel = [j for j, (s, _) in enumerate(items) if s in chunk]
        answers = backend.cloud_half_batch([tokens[items[j][0] - s0] for j in sel],
                                           [items[j][1].question for j in sel])
        for j, a in zip(sel, answers):
            preds[j] = a.text
        if progress:
            progress(len(chunk))
    return accuracy_report(items, preds)


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else float("nan")


def evaluate_mae(split, seed: int, count: int, progress=None, jpeg_qualities=(10, 50, 90),
                 camera_jpeg_qualities=(), adaptive_rule=None):
    """Per-k bytes, token cosine, accuracy and consistency; baselines from the same scenes.
    JPEG baselines: `jpeg_q{q}` encodes the frame at the model's input size; `jpeg_camera_q{q}`
    at camera size (the device sends what it captured; the cloud resizes). "adaptive": the
    adaptive policy under `adaptive_rule` (default: the split's calibrated one) beside fixed k
    (progvlm.adaptive.evaluate)."""
    return evaluate_mae_ladder(split, seed, count, progress, jpeg_qualities,
                               camera_jpeg_qualities, adaptive_rule=adaptive_rule)[0]


def evaluate_mae_ladder(split, seed: int, count: int, progress=None, jpeg_qualities=(10, 50, 90),
                        camera_jpeg_qualities=(), stream: int = EVAL_STREAM, start: int = 0,
                        baselines: bool = True, adaptive_rule=None):
    """evaluate_mae's report and its `adaptive.Ladder` (every question answered at every k):
    on `stream` from scene `start` on; without the baselines where `baselines` is False (what
    calibration on the training stream needs)."""
    import torch.nn.functional as F

    from . import baselines as base_methods
    from ..images import resize_for_model
    from .metrics import SemanticConsistency
    from ..split import Frame

    backend, mae = split.vlm, split.mae
    sim = SemanticConsistency()
    scene_list, items = eval_questions(seed, count, stream, start)
    by_scene: dict[int, list[int]] = {}
    for j, (s, _) in enumerate(items):
        by_scene.setdefault(s, []).append(j)
    L = mae.cfg.num_layers
    answers = {"uncompressed": [None] * len(items)}
    answer_objects: dict[str, list] = {}  # k=… → the Answers (their token probabilities)
    rec = {k: {"bytes": [], "layer_bytes": [], "cos": []} for k in range(1, L + 1)}
    base_bytes: dict[str, list] = {}

    def answer_all(name, tokens_by_scene):
        out = answers.setdefault(name, [None] * len(items))
        flat_t, flat_q, flat_j = [], [], []
        for s, t in tokens_by_scene.items():
            for j in by_scene.get(s, []):
                flat_t.append(t)
                flat_q.append(items[j][1].question)
                flat_j.append(j)
        kept = answer_objects.setdefault(name, [None] * len(items)) if name.startswith("k=") else None
        for j, a in zip(flat_j, backend.cloud_half_batch(flat_t, flat_q)):
            out[j] = a.text
            if kept is not None:
                kept[j] = a

    all_tokens = {}  # scene → uncompressed tokens, reused by the pooling baselines below
    chunk = 32
    for s0 in range(0, len(scene_list), chunk):
        ids = list(range(s0, min(len(scene_list), s0 + chunk)))
        frames = [render_scene(scene_list[s]) for s in ids]
        tokens = backend.edge_half_batch(frames)
        T = dict(zip(ids, tokens))
        all_tokens.update(T)
        answer_all("uncompressed", T)
        for k in range(1, L + 1):
            dec = {}
            for s in ids:
                frame = Frame(mae.compress(T[s], k), len(T[s]))
                t_hat = split.decode(split.unpack(split.pack(frame)))  # through the wire form
                dec[s] = t_hat
                rec[k]["bytes"].append(len(split.pack(frame)))
                rec[k]["layer_bytes"].append([len(p) for p in frame.layers])
                rec[k]["cos"].append(F.cosine_similarity(t_hat, T[s], dim=-1).mean().item())
            answer_all(f"k={k}", dec)
        if progress and not baselines:
            progress(len(ids))
        if not baselines:
            continue
        raw = {}
        for s in ids:
            n, raw[s] = base_methods.raw_fp16(T[s])
            base_bytes.setdefault("raw_fp16", []).append(n)
        answer_all("raw_fp16", raw)
        for q in jpeg_qualities:
            dec_imgs = []
            for s, f in zip(ids, frames):
                n, img = base_methods.jpeg(resize_for_model(f, backend.input_size), q)
                base_bytes.setdefault(f"jpeg_q{q}", []).append(n)
                dec_imgs.append(img)
            answer_all(f"jpeg_q{q}", dict(zip(ids, backend.edge_half_batch(dec_imgs))))
        for q in camera_jpeg_qualities:
            dec_imgs = []
            for f in frames:
                n, img = base_methods.jpeg(f, q)
                base_bytes.setdefault(f"jpeg_camera_q{q}", []).append(n)
                dec_imgs.append(img)
            answer_all(f"jpeg_camera_q{q}", dict(zip(ids, backend.edge_half_batch(dec_imgs))))
        if progress:
            progress(len(ids))

    # pooling baselines at about the mean bytes of each k, known only after the first pass
    D = mae.cfg.token_dim
    pool_settings = ({k: base_methods.pooling_setting_for(_mean(rec[k]["bytes"]), D) for k in rec}
                     if baselines else {})
    for k, (g, b) in pool_settings.items():
        pooled = {}
        for s, t in all_tokens.items():
            n, pooled[s] = base_methods.pooled(t, g, b)
            base_bytes.setdefault(f"pool_k{k}", []).append(n)
        answer_all(f"pool_k{k}", pooled)

    ref = answers["uncompressed"]

    def score(name):
        preds = answers[name]
        acc = accuracy_report(items, preds)
        return {"accuracy": acc["overall"], "accuracy_per_type": acc["per_type"],
                "consistency": _mean(sim.many(preds, ref))}

    per_k = []
    for k in range(1, L + 1):
        r = rec[k]
        per_k.append({"k": k, "bytes_mean": _mean(r["bytes"]), "bytes_max": int(max(r["bytes"])),
                      "layer_bytes_mean": [float(x) for x in np.mean(r["layer_bytes"], 0)],
                      "token_cosine": _mean(r["cos"]), **score(f"k={k}")})
    base = {}
    for name, sizes in base_bytes.items():
        entry = {"bytes_mean": _mean(sizes), **score(name)}
        if name.startswith("pool_k"):
            g, b = pool_settings[int(name[6:])]
            entry.update(grid=g, bits=b)
        base[name] = entry
    unc = accuracy_report(items, ref)
    # scene s (in order) with k layers: rec[k]["bytes"][s]
    ladder = adaptive.Ladder(
        answers=[[answer_objects[f"k={k}"][j] for k in range(1, L + 1)] for j in range(len(items))],
        bytes=np.array([[rec[k]["bytes"][s] for k in range(1, L + 1)]
                        for s, _ in items]),
        reference=list(ref), truth=[qa.answer for _, qa in items])
    rule = adaptive_rule or split.adaptive_rule()[0]
    report = {"questions": len(items), "scenes": len(scene_list), "seed": seed,
              "stream": stream, "first_scene": start,
              "mae_fingerprint": mae.fingerprint().hex(), "L": L,
              "uncompressed": {"accuracy": unc["overall"], "accuracy_per_type": unc["per_type"]},
              "per_k": per_k, "adaptive": adaptive.evaluate(ladder, rule, sim.many),
              "baselines": base,
              "timing": edge_vs_mae_timing(backend, mae, scene_list[0])}
    return report, ladder


def median_ms(first, second, repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of first() and of second(first's result), run in turn: one
    frame through two consecutive stages, as the pipeline runs them."""
    import time
    second(first())  # warm-up
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = first()
        t1 = time.perf_counter()
        second(out)
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return float(np.median(a)) * 1000, float(np.median(b)) * 1000


def edge_vs_mae_timing(backend, mae, scene, repeats: int = 30) -> dict:
    """Median batch-1 wall times on this host: the edge half, and MAE compress of all L
    layers (encoder, quantisation, entropy coding): what the edge pays per frame."""
    frame = render_scene(scene)
    e, m = median_ms(lambda: backend.edge_half(frame), mae.compress, repeats)
    return {"edge_half_ms": round(e, 3), "mae_compress_ms": round(m, 3),
            "mae_share_of_edge_half": round(m / e, 4), "note": "host CPU, measured, batch 1"}


# ---- any VLM, any images: no ground truth, so everything is measured against the VLM itself ----
#: generic questions for photos (used when train_mae.py exposes no DEFAULT_PROMPTS)
GENERIC_QUESTIONS = ("Describe the image.", "What is in the picture?", "What colours dominate?",
                     "How many objects are there?", "Is there a person in the image?")


def default_questions() -> list[str]:
    """The generic prompts train-mae uses for images when it exposes them, else ours."""
    from ..training import train_mae
    return list(getattr(train_mae, "DEFAULT_PROMPTS", None) or GENERIC_QUESTIONS)


def read_questions(path) -> list[str]:
    """One question per line; blank lines and lines starting with # are skipped."""
    from pathlib import Path
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    questions = [q for q in lines if q and not q.startswith("#")]
    if not questions:
        raise ValueError(f"{path} holds no questions (one per line; # starts a comment)")
    return questions


def evaluate_mae_on_images(split, image_paths, questions, progress=None, camera_jpeg_quality=90,
                           model_jpeg_quality=90, max_new_tokens: int = 32,
                           adaptive_rule=None) -> dict:
    """Per k = 1..L on your own images, without ground truth: wire bytes (mean, max; what
    `split.pack` puts on the link, header included), exact agreement with the answer from
    uncompressed tokens and semantic consistency with it; and the same for the baselines
    `jpeg_camera_q{q}` (the image as given), `jpeg_model_q{q}` (resized to the model's input
    size first) and `raw_fp16` (the tokens as fp16, no header).

    Every answer is greedy, so "agreement" is what the compression changes, not sampling noise.
    Unreadable images are skipped and listed under "skipped". "adaptive": the adaptive policy
    under `adaptive_rule` (default: the split's calibrated one), agreement in place of
    accuracy (progvlm.adaptive.evaluate)."""
    return evaluate_mae_on_images_ladder(split, image_paths, questions, progress,
                                         camera_jpeg_quality, model_jpeg_quality, max_new_tokens,
                                         adaptive_rule=adaptive_rule)[0]


def evaluate_mae_on_images_ladder(split, image_paths, questions, progress=None,
                                  camera_jpeg_quality=90, model_jpeg_quality=90,
                                  max_new_tokens: int = 32, baselines: bool = True,
                                  adaptive_rule=None):
    """evaluate_mae_on_images's report and its `adaptive.Ladder` (every question of every
    image answered at every k, no ground truth); without the baselines where `baselines` is
    False (what calibration needs)."""
    import torch.nn.functional as F

    from . import baselines as base_methods
    from ..images import ImageInputError, load_image, resize_for_model
    from .metrics import SemanticConsistency
    from ..split import Frame

    vlm, L = split.vlm, split.num_layers
    questions = list(questions)
    if not questions:
        raise ValueError("at least one question is needed")
    answers: dict[str, list[str]] = {"uncompressed": []}
    answer_objects: dict[int, list] = {k: [] for k in range(1, L + 1)}  # their token probabilities
    sizes: dict[str, list[int]] = {}
    cosine: dict[int, list[float]] = {k: [] for k in range(1, L + 1)}
    skipped, used = [], 0

    def ask_all(name: str, tokens, grid) -> list:
        got = [vlm.cloud_half(tokens, q, max_new_tokens, grid=grid) for q in questions]
        answers.setdefault(name, []).extend(a.text for a in got)
        return got

    def ask_image(name: str, nbytes: int, image):
        sizes.setdefault(name, []).append(nbytes)
        ask_all(name, *vlm.edge_half_with_grid(image))

    for path in image_paths:
        try:
            image = load_image(path)
        except ImageInputError as e:
            skipped.append(f"{path}: {e}")
            continue
        used += 1
        tokens, grid = vlm.edge_half_with_grid(image)
        tokens = tokens.float()
        ask_all("uncompressed", tokens, grid)
        layers = split.mae.compress(tokens)
        for k in range(1, L + 1):
            wire = split.pack(Frame(layers[:k], tokens.shape[0], grid))
            sizes.setdefault(f"k={k}", []).append(len(wire))
            decoded = split.decode(split.unpack(wire))  # exactly what the cloud would decode
            cosine[k].append(F.cosine_similarity(decoded, tokens, dim=-1).mean().item())
            answer_objects[k].extend(ask_all(f"k={k}", decoded, grid))
        if progress and not baselines:
            progress(1)
        if not baselines:
            continue
        nbytes, raw = base_methods.raw_fp16(tokens)
        sizes.setdefault("raw_fp16", []).append(nbytes)
        ask_all("raw_fp16", raw, grid)
        ask_image(f"jpeg_camera_q{camera_jpeg_quality}",
                  *base_methods.jpeg(image, camera_jpeg_quality))
        ask_image(f"jpeg_model_q{model_jpeg_quality}",
                  *base_methods.jpeg(resize_for_model(image, vlm.input_size), model_jpeg_quality))
        if progress:
            progress(1)
    if not used:
        raise ValueError("no readable images: " + "; ".join(skipped[:3]))

    sim = SemanticConsistency()
    reference = answers["uncompressed"]

    def scored(name: str) -> dict:
        got = answers[name]
        return {"bytes_mean": _mean(sizes[name]), "bytes_max": int(max(sizes[name])),
                "agreement": _mean([a == r for a, r in zip(got, reference)]),
                "consistency": _mean(sim.many(got, reference))}

    per_k = [{"k": k, **scored(f"k={k}"), "token_cosine": _mean(cosine[k])}
             for k in range(1, L + 1)]
    base = {name: scored(name) for name in sizes if not name.startswith("k=")}
    per_question = np.repeat(np.arange(used), len(questions))  # answers go image by image
    ladder = adaptive.Ladder(
        answers=[list(row) for row in zip(*(answer_objects[k] for k in range(1, L + 1)))],
        bytes=np.array([sizes[f"k={k}"] for k in range(1, L + 1)]).T[per_question],
        reference=list(reference))
    rule = adaptive_rule or split.adaptive_rule()[0]
    return {"vlm_id": vlm.model_id, "mae_fingerprint": split.fingerprint.hex(), "L": L,
            "images": used, "questions": questions, "answers_per_method": used * len(questions),
            "input_size": vlm.input_size, "per_k": per_k,
            "adaptive": adaptive.evaluate(ladder, rule, sim.many), "baselines": base,
            "skipped": skipped,
            "note": "no ground truth: agreement and consistency are against the answer from "
                    "uncompressed tokens; bytes are wire bytes (header included) for k, "
                    "payload bytes for the baselines"}, ladder


# ---- calibration runs: the training stream, or any VLM's own images ---------------------------
#: calibration questions come from the training stream (data.TRAIN_STREAM, seed 0) from this
#: scene on: past the 30,000 scenes the bundled VLM and the 12,000 its MAE were trained on, so
#: the answers are those of frames the models never saw, as in use (the rule and its threshold
#: live in progvlm/adaptive.py; these runs answer questions at every k, hence here)
CALIBRATION_FIRST_SCENE = 50_000


def calibrate_on_scenes(split, count: int = 4000, seed: int = 0,
                        start: int = CALIBRATION_FIRST_SCENE, progress=None,
                        budget: float = adaptive.BYTES_BUDGET) -> tuple[dict, adaptive.Ladder]:
    """The bundled model (generated scenes with ground truth): `count` questions of the
    training stream answered at every k, then `calibrate`. Returns (choice, ladder)."""
    from ..toyworld.data import TRAIN_STREAM
    _, ladder = evaluate_mae_ladder(split, seed, count, progress, stream=TRAIN_STREAM,
                                    start=start, baselines=False)
    choice = adaptive.calibrate(ladder, budget)
    choice["calibrated_on"] = (f"training stream (data.TRAIN_STREAM={TRAIN_STREAM}, seed {seed}), "
                               f"{len(ladder.answers)} questions from scene {start} on; "
                               "accuracy against ground truth")
    return choice, ladder


def calibrate_on_images(split, image_paths, questions, progress=None, max_new_tokens: int = 32,
                        budget: float = adaptive.BYTES_BUDGET) -> tuple[dict, adaptive.Ladder]:
    """Any VLM, no ground truth: every question about every image answered at every k, then
    `calibrate` with agreement (the answer from uncompressed tokens) in place of accuracy.
    Calibrate on images other than those evaluated on. Returns (choice, ladder)."""
    report, ladder = evaluate_mae_on_images_ladder(split, image_paths, questions, progress,
                                                   max_new_tokens=max_new_tokens, baselines=False)
    choice = adaptive.calibrate(ladder, budget)
    choice["calibrated_on"] = (f"{report['images']} images × {len(questions)} questions; "
                               "agreement with the answer from uncompressed tokens")
    return choice, ladder


def save_calibration(split, choice: dict, ladder: adaptive.Ladder, folder=None):
    """Write the chosen rule into adaptive.json (default: the split's MAE folder), with what it
    was chosen on and the figures behind the choice; the split reads it from then on."""
    folder = folder if folder is not None else split.mae_folder
    if folder is None:
        raise ValueError("this MAE was not loaded from a folder: say where adaptive.json goes")
    rule = adaptive.AdaptiveRule(choice["rule"], choice["threshold"])
    rel = adaptive.reliability(ladder.confidence(rule.rule), ladder.correct())
    path = rule.save(folder, calibrated_on=choice["calibrated_on"], vlm_id=split.vlm.model_id,
                     mae_fingerprint=split.fingerprint.hex(), target=choice["target"],
                     budget=choice["budget"], goal_met=choice["goal_met"],
                     chosen=_rounded(choice["chosen"]), fixed_k=_rounded(choice["fixed_k"]),
                     per_rule=_rounded(choice["per_rule"]), ece=round(rel["ece"], 4))
    return path


def _rounded(value, digits: int = 4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value
