"""A learned sufficiency signal for adaptive refinement (issue 20): a logistic regression,
trained with the VLM and the MAE frozen, that predicts from what the cloud has after k layers
whether the answer from k layers is the answer from all L layers.

Features (`features`): the answer's token probabilities and runner-up probabilities (mean,
least, log(1 - p) statistics, closest margin, number of tokens), which answer tokens were
generated (a bag over the token ids seen in training), and the question's words (a bag over
the words seen in training). Its output, a probability in [0, 1], is the answer's
`confidence` under the rule "learned" (progvlm.adaptive.AdaptiveRule), so the edge's stop rule
(confidence ≥ threshold) and the round trips are those of every other rule.

The weights are plain JSON inside adaptive.json (`to_json` / `from_json`), never pickle. The
target is agreement with the answer from all L layers, so any VLM calibrates on its own images
without ground truth (`fit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LEARNED = "learned"
#: the probability statistics, in the order `features` makes them
PROB_FEATURES = ("mean_prob", "min_prob", "log1m_min_prob", "log1m_mean_prob",
                 "sum_log1m_prob", "min_margin", "log_max_runner_up", "num_tokens")
_EPS = 1e-7


def _prob_stats(chosen: Sequence[float], runner_up: Sequence[float]) -> list[float]:
    p = np.asarray(chosen, dtype=float)
    r = np.asarray(runner_up, dtype=float) if len(runner_up) else np.zeros_like(p)
    log1m = np.log(np.clip(1.0 - p, _EPS, 1.0))
    return [float(p.mean()), float(p.min()), math.log(max(1.0 - p.min(), _EPS)),
            math.log(max(1.0 - p.mean(), _EPS)), float(log1m.sum()), float((p - r).min()),
            math.log(max(float(r.max()), _EPS)), float(len(p))]


def question_words(question: str | None) -> list[str]:
    return (question or "").lower().replace("?", " ").split()


@dataclass(frozen=True, eq=False)
class LearnedScorer:
    """confidence = sigmoid(weights · (features - mean) / scale + bias)."""
    token_ids: tuple[int, ...]  # the answer tokens with a feature of their own
    words: tuple[str, ...]  # the question words with a feature of their own
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def __post_init__(self):
        n = self.num_features
        for name in ("mean", "scale", "weights"):
            got = getattr(self, name)
            if len(got) != n or not all(math.isfinite(v) for v in got):
                raise ValueError(f"learned rule: {name} must hold {n} finite numbers, got {len(got)}")
        if any(v <= 0 for v in self.scale):
            raise ValueError("learned rule: every scale must be > 0")
        if not math.isfinite(self.bias):
            raise ValueError("learned rule: bias must be finite")

    @property
    def num_features(self) -> int:
        return len(PROB_FEATURES) + len(self.token_ids) + len(self.words)

    def features(self, answer, question: str | None) -> np.ndarray:
        """The raw feature vector of a non-empty answer (token probabilities recorded)."""
        ids = {int(t) for t in answer.token_ids}
        words = set(question_words(question))
        return np.array(_prob_stats(answer.token_probs, answer.runner_up_probs)
                        + [float(t in ids) for t in self.token_ids]
                        + [float(w in words) for w in self.words])

    def score_features(self, x: np.ndarray) -> np.ndarray:
        z = ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def score(self, answer, question: str | None) -> float:
        return float(self.score_features(self.features(answer, question)))

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": "logistic", "prob_features": list(PROB_FEATURES),
                "token_ids": list(self.token_ids), "words": list(self.words),
                "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias}

    @classmethod
    def from_json(cls, meta) -> "LearnedScorer":
        """ValueError where `meta` is not a learned rule this code can score with."""
        if not isinstance(meta, dict) or meta.get("model") != "logistic":
            raise ValueError("learned rule: expected {'model': 'logistic', ...}")
        if list(meta.get("prob_features", [])) != list(PROB_FEATURES):
            raise ValueError(f"learned rule: prob_features must be {list(PROB_FEATURES)}")
        try:
            return cls(tuple(int(t) for t in meta["token_ids"]), tuple(str(w) for w in meta["words"]),
                       tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["scale"]),
                       tuple(float(v) for v in meta["weights"]), float(meta["bias"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"learned rule: missing or malformed field ({e})") from None


def training_rows(answers: list[list], questions: Sequence[str | None]):
    """Every answer at k < L with token probabilities, its question, and whether it is the
    answer from all L layers: ([(answer, question)], target (n,) bool)."""
    pairs, target = [], []
    for row, q in zip(answers, questions):
        for a in row[:-1]:
            if a.token_probs:
                pairs.append((a, q))
                target.append(a.text == row[-1].text)
    return pairs, np.array(target, dtype=bool)


def fit(answers: list[list], questions: Sequence[str | None], l2: float = 1e-3,
        min_count: int = 5, iterations: int = 50) -> LearnedScorer:
    """Logistic regression (Newton's method, L2 penalty `l2` on standardised features) of
    "the answer at k is the answer at L" on every question's answers at k = 1..L-1. Token ids
    and question words seen at least `min_count` times get a feature."""
    pairs, y = training_rows(answers, questions)
    if len(pairs) < 10 or y.all() or not y.any():
        raise ValueError("the learned rule needs both answers that change and answers that do "
                         f"not by layer L; got {len(pairs)} answers, {int((~y).sum())} that change")
    from collections import Counter
    ids = Counter(int(t) for a, _ in pairs for t in set(a.token_ids))
    words = Counter(w for _, q in pairs for w in set(question_words(q)))
    token_ids = tuple(sorted(t for t, n in ids.items() if n >= min_count))
    word_list = tuple(sorted(w for w, n in words.items() if n >= min_count))
    n = len(PROB_FEATURES) + len(token_ids) + len(word_list)
    probe = LearnedScorer(token_ids, word_list, (0.0,) * n, (1.0,) * n, (0.0,) * n, 0.0)
    x = np.stack([probe.features(a, q) for a, q in pairs])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w, target = np.zeros(n + 1), y.astype(float)
    penalty = l2 * np.r_[np.ones(n), 0.0]
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (p - target) / len(z) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(z) + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LearnedScorer(token_ids, word_list, tuple(map(float, mean)), tuple(map(float, scale)),
                         tuple(map(float, w[:-1])), float(w[-1]))


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` separating positive from negative (ties halved)."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):  # average ranks over ties
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
