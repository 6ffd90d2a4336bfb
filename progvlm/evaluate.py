"""Exact-match evaluation of a backend on freshly generated scenes."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .data import EVAL_STREAM, scenes as make_scenes
from .questions import QA, QUESTION_TYPES, questions_for
from .scenes import render_scene


def eval_questions(seed: int, count: int):
    """`count` questions (one of each type per scene, in turn) on scenes of the eval stream."""
    rng = np.random.default_rng([EVAL_STREAM, seed])
    items: list[tuple[int, QA]] = []
    scene_list = []
    i = 0
    while len(items) < count:
        sc = make_scenes(EVAL_STREAM, seed, 1, start=i)[0]
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
