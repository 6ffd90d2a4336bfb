"""The interface every VLM backend implements: the split at the visual tokens.

    edge half:   image → visual tokens (N × D float tensor), what the language model consumes,
                 plus the layout the cloud needs to rebuild the prompt (the Idefics3 tile grid;
                 None for most families)
    cloud half:  visual tokens (+ layout) + question → answer
    whole model: image + question → answer, the unsplit reference

For every backend, cloud_half(*edge_half_with_grid(image), q) generates exactly the tokens that
answer(image, q) generates (tests/test_hf_backend.py, tests/test_tiny_vlm.py check this).

Visual tokens come in blocks of `tokens_per_block` (one image, or one tile of a split image):
the MAE codes block by block, so a backend whose token count varies with the image (tiling)
still has one MAE.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from PIL import Image

Grid = tuple[int, int] | None  # Idefics3 tiles (rows, cols); None where the layout is fixed


@dataclass
class Answer:
    text: str
    token_ids: list[int] = field(default_factory=list)
    # where the backend can tell: prefill_ms (prompt pass) and generation_ms (further tokens)
    stage_ms: dict[str, float] = field(default_factory=dict)
    # How sure the language model was of this greedy answer, in [0, 1] (progvlm.adaptive's
    # rule over the two lists below); None where the backend cannot tell.
    confidence: float | None = None
    # per generated token, the stop token included where one was generated: the softmax
    # probability of the chosen token, and of the best other token at that step
    token_probs: list[float] = field(default_factory=list)
    runner_up_probs: list[float] = field(default_factory=list)
    # the fraction of the cloud's drawn refinements whose answer is this one (progvlm.adaptive_probe);
    # None where no probe ran (not layer 1, or a rule without one)
    refinement_agreement: float | None = None


def top2_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token logits (..., V) → (..., 2): the softmax probabilities (float32) of the greedy
    choice and of the runner-up."""
    return logits.float().softmax(-1).topk(2, -1).values


def with_confidence(answer: Answer, chosen, runner_up) -> Answer:
    """`answer` with its per-token probabilities (the first len(chosen) generated tokens) and
    the confidence the default rule gives them."""
    from ..adaptive import DEFAULT_RULE
    answer.token_probs = [float(p) for p in chosen]
    answer.runner_up_probs = [float(p) for p in runner_up]
    answer.confidence = DEFAULT_RULE.confidence(answer)
    return answer


def check_fixed_layout(model_id: str, tokens_per_block: int, num_tokens: int, grid: Grid) -> None:
    """ValueError unless num_tokens is one block of tokens_per_block with no tile grid."""
    if grid is not None or num_tokens != tokens_per_block:
        raise ValueError(f"{model_id} takes {tokens_per_block} visual tokens with no tile grid, "
                         f"not {num_tokens}" + (f" in a {grid} grid" if grid else ""))


class VLMBackend(ABC):
    #: a stable id naming the model (and its weights), e.g. "progvlm-tiny@<sha>"
    model_id: str
    #: visual token width D
    token_dim: int
    #: tokens of one image or tile: the MAE's block size
    tokens_per_block: int

    #: the side of the square frame the model sees (full-cloud sends a JPEG of this size)
    input_size: int

    # ---- the split: the edge half in two timed stages ----------------------------------------
    @abstractmethod
    def preprocess(self, image: Image.Image):
        """RGB image → the model's input (the backend's own resizing and normalisation)."""

    @abstractmethod
    def vision(self, model_input) -> tuple[torch.Tensor, Grid]:
        """Model input → visual tokens (N, D) and the layout the cloud needs (None: fixed)."""

    def edge_half_with_grid(self, image: Image.Image) -> tuple[torch.Tensor, Grid]:
        return self.vision(self.preprocess(image))

    def edge_half(self, image: Image.Image) -> torch.Tensor:
        """RGB image → visual tokens (N, D)."""
        return self.edge_half_with_grid(image)[0]

    @abstractmethod
    def cloud_half(self, tokens: torch.Tensor, question: str, max_new_tokens: int = 32,
                   grid: Grid = None) -> Answer:
        """Visual tokens (N, D) + question → answer."""

    @abstractmethod
    def answer(self, image: Image.Image, question: str, max_new_tokens: int = 32) -> Answer:
        """The whole model, unsplit."""

    def check_layout(self, num_tokens: int, grid: Grid) -> None:
        """Raise ValueError, saying why, unless the language half takes `num_tokens` visual
        tokens laid out as `grid`. The cloud asks this of a stream's header before it decodes
        anything, so a header cannot make it decode tokens the model would refuse. This
        default is a fixed layout: one block of tokens_per_block, no grid."""
        check_fixed_layout(self.model_id, self.tokens_per_block, num_tokens, grid)

    # ---- what the page and the records show ---------------------------------------------------
    def describe(self) -> dict:
        return {"vlm_id": self.model_id, "tokens_per_block": self.tokens_per_block,
                "token_dim": self.token_dim, "family": getattr(self, "family", type(self).__name__)}

    def domain_note(self, image: Image.Image) -> str | None:
        """A warning when the image is outside what this model knows (None: no warning)."""
        return None

    # Batched forms; backends override them where batching pays.
    #: True where cloud_half_batch runs the requests as one batch (not this default loop)
    batches_language: bool = False

    def edge_half_batch(self, images: list[Image.Image]) -> list[torch.Tensor]:
        return [self.edge_half(im) for im in images]

    def cloud_half_batch(self, tokens: list[torch.Tensor], questions: list[str],
                         max_new_tokens: int = 32, grids: list[Grid] | None = None) -> list[Answer]:
        """cloud_half for many requests: the same answers, in order. This default runs them one
        by one; a backend that overrides it batches them (and sets batches_language)."""
        grids = grids if grids is not None else [None] * len(tokens)
        return [self.cloud_half(t, q, max_new_tokens, grid=g)
                for t, q, g in zip(tokens, questions, grids)]

    def gives_answers(self, tokens: list[torch.Tensor], questions: list[str], answers: list[Answer],
                      max_new_tokens: int = 32, grids: list[Grid] | None = None) -> list[bool]:
        """For each request: would cloud_half of these tokens and question give `answer` (its
        text)? The refinement probe asks it of drawn refinements (progvlm.adaptive_probe). This
        default answers them (cloud_half_batch) and compares; a backend that can tell from one
        teacher-forced pass of each answer, without generating, overrides it (the bundled
        VLM's: one pass instead of a decoding step per answer token)."""
        got = self.cloud_half_batch(tokens, questions, max_new_tokens, grids)
        return [g.text == a.text for g, a in zip(got, answers)]
