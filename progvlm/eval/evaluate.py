"""Exact-match evaluation on freshly generated scenes: the bundled VLM alone (eval-vlm), and
the MAE's ladder on them (eval-mae, through ladder.run_ladder with the scenes as its ground)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..toyworld.data import EVAL_STREAM, scenes as make_scenes
from ..toyworld.questions import QA, QUESTION_TYPES, questions_for
from ..toyworld.scenes import render_scene
from .codecs import Plan, Unit, codecs_for
from .ladder import Item, run_ladder
from .timing import median_ms


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


class SceneSet:
    """The ladder's ground for the bundled model: `count` questions on generated scenes of
    `stream` from scene `start` on, 32 scenes per batch, scored against ground truth."""
    unit, total, chunk = "scene", None, 32

    def __init__(self, split, seed: int, count: int, stream: int = EVAL_STREAM, start: int = 0,
                 timing: bool = True, edge=None):
        """`edge`: an exported edge (edge_agent's EdgeRuntime, e.g. LiteRT int8) that codes the
        MAE's layers from its own vision and encoder; "uncompressed" and the baselines stay the
        float32 PyTorch edge's, so each k's consistency is against the float32 edge."""
        self.split, self.seed, self.stream, self.start, self.timing = split, seed, stream, start, timing
        self.edge = edge
        self.scenes, self._qa = eval_questions(seed, count, stream, start)
        self.items = [Item(s, qa.question, qa.answer) for s, qa in self._qa]
        self.truth = [qa.answer for _, qa in self._qa]

    def units(self):
        for s0 in range(0, len(self.scenes), self.chunk):
            ids = range(s0, min(len(self.scenes), s0 + self.chunk))
            frames = [render_scene(self.scenes[s]) for s in ids]
            layers = [self._edge_layers(f) for f in frames] if self.edge else [None] * len(frames)
            yield [Unit(s, f, t, layers=c) for s, f, t, c in
                   zip(ids, frames, self.split.vlm.edge_half_batch(frames), layers)]

    def _edge_layers(self, frame) -> list[bytes]:
        tokens, _ = self.edge.vision(self.edge.preprocess(frame))
        return self.edge.mae_encode(tokens, self.edge.num_layers)

    def see(self, images):
        return [(t, None) for t in self.split.vlm.edge_half_batch(images)]

    def answer(self, requests):
        return self.split.vlm.cloud_half_batch([t for t, _, _ in requests], [q for _, _, q in requests])

    def exactness(self, texts, reference) -> dict:
        acc = accuracy_report(self._qa, texts)
        return {"accuracy": acc["overall"], "accuracy_per_type": acc["per_type"]}

    def head(self, reference) -> dict:
        unc = accuracy_report(self._qa, reference)
        return {"questions": len(self.items), "scenes": len(self.scenes), "seed": self.seed,
                "stream": self.stream, "first_scene": self.start,
                "mae_fingerprint": self.split.fingerprint.hex(), "L": self.split.num_layers,
                "uncompressed": {"accuracy": unc["overall"], "accuracy_per_type": unc["per_type"]},
                "edge_runtime": self.edge.name if self.edge else "pytorch",
                **({"int8": bool(getattr(self.edge, "int8", False)), "delegate": self.edge.delegate}
                   if self.edge else {})}

    def tail(self) -> dict:
        return ({"timing": edge_vs_mae_timing(self.split.vlm, self.split.mae, self.scenes[0])}
                if self.timing else {})


def evaluate_mae(split, seed: int, count: int, progress=None, jpeg_qualities=(10, 50, 90),
                 camera_jpeg_qualities=(), adaptive_rule=None, codecs=None, edge=None) -> dict:
    """Per k: wire bytes (mean, max, per layer), token cosine, accuracy and consistency; every
    baseline of the codec registry (codecs.codecs_for) on the same scenes: `jpeg_q{q}` at the
    model's input size, `jpeg_camera_q{q}` at camera size (the device sends what it captured;
    the cloud resizes), raw fp16 tokens, pooling at about each k's bytes. `codecs`: these rows
    instead. "adaptive": the adaptive policy under `adaptive_rule` (default: the split's
    calibrated one) beside fixed k (progvlm.adaptive.evaluate). `edge`: SceneSet's."""
    plan = Plan(split.num_layers, tuple(jpeg_qualities), tuple(camera_jpeg_qualities), pooling=True)
    return run_ladder(split, SceneSet(split, seed, count, edge=edge), codecs or codecs_for(plan),
                      adaptive_rule, progress)[0]


def edge_vs_mae_timing(backend, mae, scene, repeats: int = 30) -> dict:
    """Median batch-1 wall times on this host: the edge half, and MAE compress of all L
    layers (encoder, quantisation, entropy coding): what the edge pays per frame."""
    frame = render_scene(scene)
    e, m = median_ms(lambda: backend.edge_half(frame), mae.compress, repeats)
    return {"edge_half_ms": round(e, 3), "mae_compress_ms": round(m, 3),
            "mae_share_of_edge_half": round(m / e, 4), "note": "host CPU, measured, batch 1"}
