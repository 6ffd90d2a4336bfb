"""The one evaluation ladder: every frame through every codec of the registry, every question
answered from what the VLM then sees, scored against the answer from uncompressed tokens.

Where the frames and questions come from, how the model answers and what "correct" means is a
*ground*: generated scenes with ground truth (evaluate.SceneSet, the bundled model) or any
VLM's own images (on_images.ImageSet). A ground has:

    items                  [Item], in answer order (they may grow as `units()` runs)
    units()                yields lists of `codecs.Unit` (one batch each)
    see(images)            [(tokens, grid)]: the vision half on decoded images
    answer(requests)       [Answer] for [(tokens, grid, question)]
    exactness(texts, ref)  {"accuracy", …} or {"agreement"}: the exact-match figures
    truth                  the ground-truth answers, or None
    head(ref), tail()      the report's fields before and after the rows
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import adaptive, adaptive_probe
from ..split import Frame
from .codecs import Codec, Context, mean_or_nan
from .metrics import SemanticConsistency


@dataclass(frozen=True)
class Item:
    unit: int  # the frame's index in the run
    question: str
    truth: str | None = None


def run_ladder(split, ground, codecs: list[Codec], adaptive_rule=None, progress=None):
    """The report ({**head, per_k, adaptive, baselines, **tail}) and its `adaptive.Ladder`
    (every question answered at every k). `codecs` must hold the MAE's prefixes k = 1..L."""
    import torch.nn.functional as F
    prefixes = sorted((c for c in codecs if c.k), key=lambda c: c.k)
    if [c.k for c in prefixes] != list(range(1, split.num_layers + 1)):
        raise ValueError(f"the ladder needs the MAE's prefixes k = 1..{split.num_layers}")
    ctx = Context(split)
    rule = adaptive_rule or split.adaptive_rule()[0]
    answers: dict[str, dict[int, object]] = {}  # row → item index → Answer
    layer_bytes: dict[str, list] = {c.name: [] for c in prefixes}
    cosine: dict[str, list] = {c.name: [] for c in prefixes}
    by_unit: dict[int, list[int]] = {}
    kept = []  # every frame, for the second pass

    def ask(name, seen: dict[int, tuple]):
        js = [j for u in seen for j in by_unit.get(u, [])]
        got = ground.answer([(*seen[ground.items[j].unit], ground.items[j].question) for j in js])
        answers.setdefault(name, {}).update(zip(js, got))

    def run(codec, units):
        coded = [codec.encode(u, ctx) for u in units]
        ctx.sizes.setdefault(codec.name, []).extend(c.nbytes for c in coded)
        if codec.k:
            layer_bytes[codec.name] += [c.layer_bytes for c in coded]
            cosine[codec.name] += [F.cosine_similarity(c.seen, u.tokens, dim=-1).mean().item()
                                   for c, u in zip(coded, units)]
        seen = (ground.see([c.seen for c in coded]) if codec.sees == "image"
                else [(c.seen, u.grid) for c, u in zip(coded, units)])
        ask(codec.name, {u.index: s for u, s in zip(units, seen)})
        if codec.k == adaptive_probe.PROBE_LAYER and rule.probe is not None:
            probe(codec, units)

    def probe(codec, units):
        """The rule's refinement probe on the answers from layer 1 (the cloud runs it there)."""
        js = [j for u in units for j in by_unit.get(u.index, [])]
        frames = {u.index: Frame(u.layers(split)[:codec.k], len(u.tokens), u.grid) for u in units}
        got = answers[codec.name]
        agreement = adaptive_probe.agreement(
            split, rule.probe, [frames[ground.items[j].unit] for j in js],
            [ground.items[j].question for j in js], [got[j] for j in js],
            getattr(ground, "max_new_tokens", 32))
        for j, a in zip(js, agreement):
            got[j].refinement_agreement = a

    second = [c for c in codecs if c.second_pass]
    for units in ground.units():
        for j in range(sum(map(len, by_unit.values())), len(ground.items)):
            by_unit.setdefault(ground.items[j].unit, []).append(j)
        ask("uncompressed", {u.index: (u.tokens, u.grid) for u in units})
        for codec in codecs:
            if not codec.second_pass:
                run(codec, units)
        if second:
            kept += units
        if progress:
            progress(len(units))
    for codec in second:
        run(codec, kept)

    n = len(ground.items)
    texts = {name: [got[j].text for j in range(n)] for name, got in answers.items()}
    reference = texts["uncompressed"]
    sim = SemanticConsistency()

    def score(name) -> dict:
        return {**ground.exactness(texts[name], reference),
                "consistency": mean_or_nan(sim.many(texts[name], reference))}

    def sizes(name) -> dict:
        return {"bytes_mean": ctx.bytes_mean(name), "bytes_max": int(max(ctx.sizes[name]))}

    per_k = [{"k": c.k, **sizes(c.name),
              "layer_bytes_mean": [float(x) for x in np.mean(layer_bytes[c.name], 0)],
              "token_cosine": mean_or_nan(cosine[c.name]), **score(c.name)} for c in prefixes]
    baselines = {c.name: {**sizes(c.name), **score(c.name), **c.row_extra(ctx)}
                 for c in codecs if not c.k}
    ladder = adaptive.Ladder(
        answers=[[answers[c.name][j] for c in prefixes] for j in range(n)],
        bytes=np.array([[ctx.sizes[c.name][it.unit] for c in prefixes] for it in ground.items]),
        reference=list(reference), truth=ground.truth,
        questions=[it.question for it in ground.items])
    evaluated = adaptive.evaluate(ladder, rule, sim.many)
    report = {**ground.head(reference), "per_k": per_k, "adaptive": evaluated,
              "baselines": baselines, **ground.tail()}
    return report, ladder
