"""The interface every VLM backend implements: the split at the visual tokens.

    edge half:   image → visual tokens (N × D float tensor), what the language model consumes
    cloud half:  visual tokens + question → answer
    whole model: image + question → answer, the unsplit reference

For every backend, cloud_half(edge_half(image), q) must generate exactly the tokens that
answer(image, q) generates (tests/test_split.py checks this).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class Answer:
    text: str
    token_ids: list[int] = field(default_factory=list)
    # where the backend can tell: prefill_ms (prompt pass) and generation_ms (further tokens)
    stage_ms: dict[str, float] = field(default_factory=dict)


class VLMBackend(ABC):
    #: a stable id naming the model (and its weights), e.g. "progvlm-tiny@<sha>"
    model_id: str
    #: visual token width D
    token_dim: int

    @abstractmethod
    def edge_half(self, image: Image.Image) -> torch.Tensor:
        """RGB image → visual tokens (N, D)."""

    @abstractmethod
    def cloud_half(self, tokens: torch.Tensor, question: str, max_new_tokens: int = 32) -> Answer:
        """Visual tokens (N, D) + question → answer."""

    @abstractmethod
    def answer(self, image: Image.Image, question: str, max_new_tokens: int = 32) -> Answer:
        """The whole model, unsplit."""

    # Batched forms; backends override them where batching pays.
    def edge_half_batch(self, images: list[Image.Image]) -> list[torch.Tensor]:
        return [self.edge_half(im) for im in images]

    def cloud_half_batch(self, tokens: list[torch.Tensor], questions: list[str]) -> list[Answer]:
        return [self.cloud_half(t, q) for t, q in zip(tokens, questions)]
