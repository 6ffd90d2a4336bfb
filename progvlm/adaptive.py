"""Adaptive (receiver-driven) refinement: send layers until the cloud is sure of its answer.

After each layer the cloud answers and reports a confidence; the edge stops at the first answer
whose confidence reaches a threshold τ (else it sends all L layers). This module holds:

* the rule: how an answer's confidence is made from the greedy decoder's token probabilities
  (`RULES`; the backends record, per generated token, the probability of the chosen token and
  of the runner-up), and `AdaptiveRule(rule, threshold).sure(confidence)`;
* adaptive.json, the calibrated rule stored in the MAE folder beside the MAE it was
  calibrated with (`AdaptiveRule.load` / `save`; `Split.adaptive_threshold()` reads it);
* calibration: every question answered from k = 1..L layers (a `Ladder`), the policy's bytes,
  accuracy and chance of meeting the goal on an evaluation's worth of questions for every
  (rule, τ) (`sweep`, `goal_rates`), the choice (`calibrate`), and the evaluation of
  a rule on another stream (`evaluate`) with its reliability (confidence bins against
  accuracy, ECE) and a reliability plot.

Where there is no ground truth (any VLM on its own images), "correct" means "the same answer
as from the uncompressed tokens" (agreement), and everything else is unchanged.

The goal (issue 20; issue 13 asked for 1.3×): the accuracy of k = L, less ACCURACY_SLACK, at no
more than BYTES_BUDGET × the mean bytes of k = 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .adaptive_learned import LEARNED, LearnedScorer
from .adaptive_probe import PROBE, RefinementProbe

ADAPTIVE_FILE = "adaptive.json"
#: the goal's byte budget, in mean bytes of k = 1
BYTES_BUDGET = 1.2
#: how far below k = L's accuracy the goal allows
ACCURACY_SLACK = 0.002
#: the goal is judged on evaluations of this many questions (eval-mae --questions 2000, per seed)
GOAL_QUESTIONS = 2000
#: how many draws of GOAL_QUESTIONS questions `goal_rates` makes from a calibration ladder
GOAL_RESAMPLES = 300


# ---- rules: token probabilities → one confidence in [0, 1] ----------------------------------
def _min_prob(chosen, runner_up):
    return min(chosen)


def _mean_prob(chosen, runner_up):
    return sum(chosen) / len(chosen)


def _geo_mean_prob(chosen, runner_up):
    return math.exp(sum(math.log(max(p, 1e-12)) for p in chosen) / len(chosen))


def _min_margin(chosen, runner_up):
    return min(p - r for p, r in zip(chosen, runner_up))


#: rule name → f(chosen token probabilities, runner-up probabilities) for a non-empty answer
RULES: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "min_prob": _min_prob,  # the least sure token
    "mean_prob": _mean_prob,
    "geo_mean_prob": _geo_mean_prob,  # the probability of the whole answer, per token
    "min_margin": _min_margin,  # the closest call between the choice and the runner-up
}


@dataclass(frozen=True)
class AdaptiveRule:
    """When is an answer sure enough to stop sending layers: `rule`'s confidence ≥ threshold.
    `rule` is one of RULES, or "learned" with its `model` (progvlm.adaptive_learned). `probe`
    (progvlm.adaptive_probe): a layer-1 answer that a refinement the cloud drew changes has
    confidence 0 (the answer's refinement_agreement < 1)."""
    rule: str
    threshold: float
    model: LearnedScorer | None = field(default=None, compare=False, repr=False)
    probe: RefinementProbe | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.rule == LEARNED:
            if not isinstance(self.model, LearnedScorer):
                raise ValueError("the learned rule needs its model (a LearnedScorer)")
        elif self.rule not in RULES:
            raise ValueError(f"unknown confidence rule {self.rule!r}; one of {sorted(RULES) + [LEARNED]}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in 0..1, got {self.threshold}")

    def __eq__(self, other):
        return (isinstance(other, AdaptiveRule) and (self.rule, self.threshold) == (other.rule, other.threshold)
                and (self.model.to_json() if self.model else None) == (other.model.to_json() if other.model else None)
                and (self.probe.to_json() if self.probe else None) == (other.probe.to_json() if other.probe else None))

    __hash__ = None

    def confidence(self, answer, question: str | None = None) -> float | None:
        """The answer's confidence under this rule; None where the backend recorded no token
        probabilities. `question`: what was asked (the learned rule uses its words)."""
        if not answer.token_probs:
            return None
        if self.probe is not None and answer.refinement_agreement is not None \
                and answer.refinement_agreement < 1.0:
            return 0.0
        if self.rule == LEARNED:
            value = self.model.score(answer, question)
        else:
            value = RULES[self.rule](answer.token_probs, answer.runner_up_probs)
        return float(min(1.0, max(0.0, value)))

    def sure(self, answer_confidence: float | None) -> bool:
        """Stop sending layers? A confidence the backend could not tell (None) is never sure,
        so the edge then sends every layer, as without adaptation."""
        return answer_confidence is not None and answer_confidence >= self.threshold

    # ---- adaptive.json --------------------------------------------------------------------
    def save(self, folder: str | Path, **report) -> Path:
        """Write adaptive.json into the MAE folder: the rule, the threshold (the learned rule's
        weights) and what else is given (where it was calibrated, the figures behind it)."""
        path = Path(folder) / ADAPTIVE_FILE
        learned = {LEARNED: self.model.to_json()} if self.model is not None else {}
        probe = {PROBE: self.probe.to_json()} if self.probe is not None else {}
        path.write_text(json.dumps({"rule": self.rule, "threshold": self.threshold, **learned,
                                    **report, **probe}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "AdaptiveRule":
        """The rule in the folder's adaptive.json. FileNotFoundError where there is none;
        ValueError (naming the file) where it does not hold a valid rule."""
        path = Path(folder) / ADAPTIVE_FILE
        try:
            meta = json.loads(path.read_text())
            model = LearnedScorer.from_json(meta[LEARNED]) if meta.get("rule") == LEARNED else None
            probe = RefinementProbe.from_json(meta[PROBE]) if PROBE in meta else None
            return cls(str(meta["rule"]), float(meta["threshold"]), model, probe)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid adaptive rule ({e})") from None


#: the best fixed rule of the bundled model's calibration on its training stream *without* the
#: refinement probe (mean_prob 0.9955 there, rounded; assets/mae/adaptive.json now ships the
#: learned rule gated by the probe, and its per_rule thresholds are gated too): where a MAE
#: folder has no adaptive.json, and the backends' own confidence
DEFAULT_RULE = AdaptiveRule("mean_prob", 0.996)


# ---- every question at every k ---------------------------------------------------------------
@dataclass
class Ladder:
    """Every question answered from k = 1..L layers: what the adaptive policy chooses from."""
    answers: list[list]  # [question][k - 1]: the Answer from k layers
    bytes: np.ndarray  # (questions, L): wire bytes of the question's frame sent with k layers
    reference: list[str]  # the answer from uncompressed tokens
    truth: list[str] | None = None  # ground truth; None for any VLM's own images
    questions: list[str] | None = None  # what was asked (the learned rule reads it)

    @property
    def num_layers(self) -> int:
        return self.bytes.shape[1]

    @property
    def target(self) -> str:
        """What "correct" means here: "accuracy" (ground truth) or "agreement" (with the
        answer from uncompressed tokens)."""
        return "accuracy" if self.truth is not None else "agreement"

    def agrees(self) -> np.ndarray:
        return np.array([[a.text == ref for a in row] for row, ref in zip(self.answers, self.reference)])

    def correct(self) -> np.ndarray:
        """(questions, L) bool: exact match with the ground truth, or agreement without one."""
        if self.truth is None:
            return self.agrees()
        return np.array([[a.text.strip() == t for a in row] for row, t in zip(self.answers, self.truth)])

    def confidence(self, rule: "str | AdaptiveRule") -> np.ndarray:
        """(questions, L) confidence under `rule` (a name of RULES, or a rule); NaN where the
        backend could not tell."""
        scorer = rule if isinstance(rule, AdaptiveRule) else AdaptiveRule(rule, 0.0)
        questions = self.questions or [None] * len(self.answers)
        return np.array([[np.nan if (c := scorer.confidence(a, q)) is None else c for a in row]
                         for row, q in zip(self.answers, questions)], dtype=float)


def stopping_layers(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """(questions,) the k the adaptive policy stops at: the first whose answer's confidence is
    ≥ threshold, else L (confidence (questions, L); NaN is never sure)."""
    sure = np.nan_to_num(confidence, nan=-1.0) >= threshold
    sure[:, -1] = True  # after L layers there is nothing more to send
    return sure.argmax(1) + 1


def policy_figures(ladder: Ladder, k: np.ndarray, correct: np.ndarray | None = None) -> dict:
    """Mean bytes, correctness ("accuracy" or "agreement"), agreement and mean layers of the
    answers taken at layers k (questions,)."""
    rows = np.arange(len(k))
    correct = ladder.correct() if correct is None else correct
    out = {"bytes_mean": float(ladder.bytes[rows, k - 1].mean()),
           ladder.target: float(correct[rows, k - 1].mean()),
           "mean_layers": float(k.mean()),
           "layers_histogram": {int(j): int((k == j).sum()) for j in range(1, ladder.num_layers + 1)}}
    if ladder.target == "accuracy":
        out["agreement"] = float(ladder.agrees()[rows, k - 1].mean())
    return out


def _candidate_thresholds(confidence: np.ndarray, grid: int = 400) -> np.ndarray:
    """Thresholds worth trying: quantiles of the confidences at k < L (only they decide), and
    just above 1 (never sure: always L)."""
    values = confidence[:, :-1]
    values = values[np.isfinite(values)]
    if not len(values):
        return np.array([1.0])
    qs = np.quantile(values, np.linspace(0, 1, grid + 1))
    return np.unique(np.concatenate([qs, [0.0, 1.0]]).clip(0.0, 1.0))


def goal_rates(ladder: Ladder, confidence: np.ndarray, thresholds: Sequence[float],
               budget: float = BYTES_BUDGET, questions: int = GOAL_QUESTIONS,
               resamples: int = GOAL_RESAMPLES, seed: int = 0) -> np.ndarray:
    """For each threshold, how likely an evaluation of `questions` questions drawn like the
    ladder's is to find the goal met: the fraction of `resamples` draws (with replacement,
    seeded) on which the policy's correctness is at least k = L's less ACCURACY_SLACK and its
    mean bytes at most `budget` × k = 1's, both on that draw. A threshold at the budget's edge
    on the ladder's mean is over it on about half the evaluations of that size."""
    correct = ladder.correct().astype(float)
    rows = np.arange(len(correct))
    draws = np.random.default_rng(seed).integers(0, len(correct), (resamples, questions))
    goal = correct[draws, -1].mean(1) - ACCURACY_SLACK - 1e-12
    allowed = budget * ladder.bytes[draws, 0].mean(1)
    out = np.empty(len(thresholds))
    for i, tau in enumerate(thresholds):
        k = stopping_layers(confidence, tau) - 1
        met = ((correct[rows, k][draws].mean(1) >= goal)
               & (ladder.bytes[rows, k][draws].mean(1) <= allowed))
        out[i] = met.mean()
    return out


def sweep(ladder: Ladder, rules: Sequence = tuple(RULES), grid: int = 400,
          budget: float = BYTES_BUDGET) -> list[dict]:
    """For every rule (a name of RULES, or a rule such as the learned one) and candidate
    threshold: the policy's mean bytes (and their ratio to the mean bytes of k = 1),
    correctness, mean layers and `goal_rate` (`goal_rates` under `budget`)."""
    correct = ladder.correct()
    k1_bytes = float(ladder.bytes[:, 0].mean())
    rows = np.arange(len(ladder.answers))
    out = []
    for rule in rules:
        confidence = ladder.confidence(rule)
        thresholds = _candidate_thresholds(confidence, grid)
        for tau, rate in zip(thresholds, goal_rates(ladder, confidence, thresholds, budget)):
            k = stopping_layers(confidence, tau)
            b = float(ladder.bytes[rows, k - 1].mean())
            out.append({"rule": getattr(rule, "rule", rule), "threshold": float(tau), "bytes_mean": b,
                        "bytes_ratio": b / k1_bytes, ladder.target: float(correct[rows, k - 1].mean()),
                        "mean_layers": float(k.mean()), "goal_rate": float(rate)})
    return out


def _preference(target: str):
    """How points are ranked: the likeliest to meet the goal on an evaluation of GOAL_QUESTIONS
    questions, then the most correct, then the fewest bytes."""
    return lambda p: (p["goal_rate"], p[target], -p["bytes_ratio"])


def best_per_rule(points: list[dict], target: str, budget: float = BYTES_BUDGET) -> dict[str, dict]:
    """For each rule, its best point (`_preference`) among those within the byte budget on
    the ladder's mean. Where no threshold can meet the goal (every goal_rate 0), that is the
    most correct one within the budget."""
    best: dict[str, dict] = {}
    better = _preference(target)
    for p in points:
        if p["bytes_ratio"] > budget:
            continue
        b = best.get(p["rule"])
        if b is None or better(p) > better(b):
            best[p["rule"]] = p
    return best


def calibrate(ladder: Ladder, budget: float = BYTES_BUDGET, rules: Sequence[str] = tuple(RULES),
              learned: LearnedScorer | None = None, probe: RefinementProbe | None = None) -> dict:
    """Choose the rule and threshold on a calibration ladder: within `budget` × the mean bytes
    of k = 1, the likeliest to meet the goal on an evaluation of GOAL_QUESTIONS questions
    (`goal_rates`), then the most correct answers, then the fewest bytes. `learned`: a fitted learned
    rule competes too (its weights then ride in the choice's "learned"). `probe`: every rule
    gated by it (the ladder's layer-1 answers carry its agreement; its table rides in the
    choice's "probe"). Returns the choice ("rule", "threshold"), each rule's best point
    ("per_rule") and the fixed-k figures."""
    rules = [AdaptiveRule(r, 0.0, probe=probe) if isinstance(r, str) else r for r in rules]
    if learned is not None:
        rules = [*rules, AdaptiveRule(LEARNED, 0.0, learned, probe)]
    target = ladder.target
    correct = ladder.correct()
    fixed = [{"k": k, "bytes_mean": float(ladder.bytes[:, k - 1].mean()),
              target: float(correct[:, k - 1].mean())} for k in range(1, ladder.num_layers + 1)]
    per_rule = best_per_rule(sweep(ladder, rules, budget=budget), target, budget)
    if not per_rule:  # the budget is below even k = 1 (cannot happen: τ = 0 is k = 1)
        raise ValueError(f"no threshold keeps the bytes within {budget} × those of k = 1")
    chosen = max(per_rule.values(), key=_preference(target))
    goal = fixed[-1][target]
    extra = {LEARNED: learned.to_json()} if chosen["rule"] == LEARNED else {}
    extra.update({PROBE: probe.to_json()} if probe is not None else {})
    return {"rule": chosen["rule"], "threshold": chosen["threshold"], **extra, "target": target,
            "budget": budget, "questions": len(ladder.answers), "fixed_k": fixed,
            "chosen": chosen, "goal_met": chosen[target] >= goal - ACCURACY_SLACK,
            "per_rule": [{**p, f"{target}_vs_k{ladder.num_layers}": p[target] - goal}
                         for p in sorted(per_rule.values(), key=lambda p: -p[target])]}


# ---- calibration quality: reliability, ECE ----------------------------------------------------
def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Confidence bins (equal width over [0, 1]) against the fraction correct, and the
    expected calibration error (|accuracy - mean confidence| weighted by the bins' counts).
    NaN confidences (backend could not tell) are left out."""
    confidence, correct = np.ravel(confidence), np.ravel(correct).astype(float)
    keep = np.isfinite(confidence)
    confidence, correct = confidence[keep], correct[keep]
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if not n:
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += n / len(confidence) * abs(acc - conf)
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                     "mean_confidence": conf, "fraction_correct": acc})
    return {"bins": rows, "ece": float(ece), "answers": int(len(confidence))}


def plot_reliability(report: dict, path: str | Path, title: str = "") -> Path:
    """The reliability diagram of `reliability(...)`'s report, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = report["bins"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    top.bar(centres, [b["fraction_correct"] for b in bins], width=width * 0.9,
            edgecolor="black", label="fraction correct")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    top.plot([b["mean_confidence"] for b in bins], [b["fraction_correct"] for b in bins], "o",
             color="tab:red", label="bin mean confidence")
    top.set_ylabel("fraction correct")
    top.set_ylim(0, 1.02)
    top.set_title(title or f"reliability (ECE {report['ece']:.3f})", fontsize=10, wrap=True)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="grey")
    bottom.set_yscale("log")
    bottom.set_ylabel("answers")
    bottom.set_xlabel("confidence")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- evaluation of a rule on another stream ---------------------------------------------------
def evaluate(ladder: Ladder, rule: AdaptiveRule, consistency=None) -> dict:
    """The adaptive policy under `rule` on a ladder, beside fixed k: mean bytes (and their
    ratio to k = 1), correctness, agreement, mean layers; whether the goal is met; the
    reliability of the rule's confidence over every answer the cloud gives (k = 1..L) and at
    k = 1 alone. `consistency(texts, reference) -> scores`, optional: the semantic consistency
    of the adaptive answers with the uncompressed ones (metrics.SemanticConsistency.many)."""
    target, L = ladder.target, ladder.num_layers
    correct = ladder.correct()
    confidence = ladder.confidence(rule)
    k = stopping_layers(confidence, rule.threshold)
    row = policy_figures(ladder, k, correct)
    k1, kL = float(ladder.bytes[:, 0].mean()), float(ladder.bytes[:, -1].mean())
    row["bytes_ratio_to_k1"] = row["bytes_mean"] / k1
    if consistency is not None:
        chosen = [ladder.answers[i][j - 1].text for i, j in enumerate(k)]
        row["consistency"] = float(np.mean(consistency(chosen, ladder.reference)))
    goal = float(correct[:, -1].mean())
    return {"rule": rule.rule, "threshold": rule.threshold, "target": target,
            "questions": len(ladder.answers), **row,
            f"k{L}_{target}": goal, "k1_bytes_mean": k1, f"k{L}_bytes_mean": kL,
            "budget": BYTES_BUDGET,
            "accuracy_slack": ACCURACY_SLACK,
            "goal_met": bool(row[target] >= goal - ACCURACY_SLACK and row["bytes_ratio_to_k1"] <= BYTES_BUDGET),
            "reliability": reliability(confidence, correct),
            "reliability_k1": reliability(confidence[:, 0], correct[:, 0])}
