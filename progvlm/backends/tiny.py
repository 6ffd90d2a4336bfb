"""The bundled default VLM as a backend (weights in assets/tiny_vlm/)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import ASSETS
from ..toyworld.data import pixels_from_uint8
from ..images import model_input, resize_for_model, to_rgb
from ..toyworld.tiny_vlm import TinyVLM, TinyVLMConfig
from ..toyworld.questions import EOS, PAD, WORD_TO_ID, check_question_length, decode_ids, encode_words, question_ids
from ..models.saved import read_saved
from .base import Answer, VLMBackend, with_confidence

DEFAULT_WEIGHTS = ASSETS / "tiny_vlm"


def weights_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _answer(ids: list[int], probs: dict | None = None, row: int = 0) -> Answer:
    """Generated ids → Answer: the text, and the ids up to (without) the first <eos>; with
    TinyVLM.generate's `probs`, the confidence of row `row` over those tokens and the <eos>."""
    eos = ids.index(WORD_TO_ID[EOS]) if WORD_TO_ID[EOS] in ids else len(ids)
    answer = Answer(decode_ids(ids), ids[:eos])
    if probs is None:
        return answer
    n = min(eos + 1, len(ids))  # the decision to stop is part of the answer
    return with_confidence(answer, probs["chosen"][row, :n], probs["runner_up"][row, :n])


class TinyVLMBackend(VLMBackend):
    def __init__(self, model: TinyVLM, model_id: str = "progvlm-tiny@untrained"):
        self.model = model.eval()
        self.cfg = model.cfg
        self.model_id = model_id
        self.token_dim = self.cfg.token_dim
        self.num_tokens = self.tokens_per_block = self.cfg.num_tokens
        self.family = "bundled"
        self.input_size = self.cfg.image_size

    @classmethod
    def load(cls, folder: str | Path = DEFAULT_WEIGHTS) -> "TinyVLMBackend":
        meta, state, weights = read_saved(folder, "model.safetensors", "bundled VLM", "train-vlm")
        model = TinyVLM(TinyVLMConfig(**meta["model"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # training-only heads (aux_*) may be absent: inference never uses them
        missing = [k for k in missing if not k.startswith("aux_")]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit this model: missing {missing}, "
                             f"unexpected {unexpected}")
        return cls(model, f"progvlm-tiny@{weights_fingerprint(weights)}")

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        size = self.cfg.image_size
        frames = np.stack([np.asarray(resize_for_model(to_rgb(im), size)) for im in images])
        return pixels_from_uint8(frames)

    def preprocess(self, image):
        # NumPy (progvlm.images.model_input): the ONNX edge runs the very same code
        return torch.from_numpy(model_input(image, self.cfg.image_size))

    @torch.no_grad()
    def vision(self, model_input):
        return self.model.visual_tokens(torch.as_tensor(model_input))[0], None

    @torch.no_grad()
    def edge_half_batch(self, images):
        return list(self.model.visual_tokens(self.pixels(images)))

    def domain_note(self, image):
        from ..toyworld.domain import check_scene_domain
        check = check_scene_domain(image)
        return None if check.in_domain else check.reason

    #: cloud_half_batch runs one padded batch (see TinyVLM.generate), not a loop
    batches_language = True

    @torch.no_grad()
    def cloud_half_batch(self, tokens, questions, max_new_tokens: int = 32, grids=None):
        """One batch, questions of any lengths (left-padded, masked): every answer is the one
        cloud_half gives alone. Each answer's stage_ms holds the batch's prefill and
        generation times (the whole batch's, shared)."""
        if grids is not None and any(g is not None for g in grids):
            raise ValueError("the bundled VLM has a fixed layout: grid must be None")
        if not tokens:
            return []
        timings, probs = {}, {}
        ids = self.model.generate(torch.stack(list(tokens)).float(),
                                  [question_ids(encode_words(q)) for q in questions],
                                  max_new_tokens, timings, probs)
        answers = [_answer(row, probs, i) for i, row in enumerate(ids.tolist())]
        for a in answers:
            a.stage_ms = dict(timings)
        return answers

    @torch.no_grad()
    def gives_answers(self, tokens, questions, answers, max_new_tokens: int = 32, grids=None):
        """One teacher-forced pass over every request's prompt and answer (right-padded: the LM
        is causal) instead of generating: greedy decoding gives the answer exactly when each of
        its tokens is the argmax after the ones before, and then <eos> is (or the row's token
        limit, TinyVLM.generate's, is reached). Requests that pass the same tokens tensor (one
        refinement asked several questions) share its visual prefix's pass."""
        if grids is not None and any(g is not None for g in grids):
            raise ValueError("the bundled VLM has a fixed layout: grid must be None")
        eos, pad, L = WORD_TO_ID[EOS], WORD_TO_ID[PAD], self.cfg.max_text_len
        rows, checks = [], []
        for question, answer in zip(questions, answers):
            prompt, said = question_ids(encode_words(question)), list(answer.token_ids)
            limit = min(max_new_tokens, L - len(prompt))  # as TinyVLM.generate stops a row
            stops = len(said) < limit  # the answer ended with <eos>, not at the limit
            rows.append(prompt + said + [eos] * stops)
            checks.append((len(prompt), said + [eos] * stops, len(said) <= limit))
        images: dict[int, list[int]] = {}  # one tokens tensor → the requests that pass it
        for i, t in enumerate(tokens):
            images.setdefault(id(t), []).append(i)
        by_count: dict[int, list[list[int]]] = {}  # TinyVLM.teacher_forced_logits takes Q texts
        for group in images.values():  # per image: one call per Q
            by_count.setdefault(len(group), []).append(group)
        best: list = [None] * len(rows)
        for groups in by_count.values():
            width = max(len(rows[i]) for g in groups for i in g)
            text = torch.tensor([[rows[i] + [pad] * (width - len(rows[i])) for i in g] for g in groups])
            argmax = self.model.teacher_forced_logits(torch.stack([tokens[g[0]] for g in groups]).float(),
                                                      text).argmax(-1)  # (images × Q, width - 1)
            for r, i in enumerate(i for g in groups for i in g):
                best[i] = argmax[r]
        return [fits and best[i][start - 1:start - 1 + len(want)].tolist() == want
                for i, (start, want, fits) in enumerate(checks)]

    @torch.no_grad()
    def cloud_half(self, tokens, question, max_new_tokens: int = 32, grid=None):
        if grid is not None:
            raise ValueError("the bundled VLM has a fixed layout: grid must be None")
        timings, probs = {}, {}
        ids = self.model.generate(tokens[None].float(),
                                  torch.tensor([question_ids(encode_words(question))]),
                                  max_new_tokens, timings, probs)[0].tolist()
        answer = _answer(ids, probs)
        answer.stage_ms = timings
        return answer

    @torch.no_grad()
    def answer(self, image, question, max_new_tokens: int = 32):
        # The whole model in one call: vision, projector and LM without leaving the module.
        probs = {}
        ids = self.model.generate(self.model.visual_tokens(self.pixels([image])),
                                  torch.tensor([question_ids(encode_words(question))]),
                                  max_new_tokens, probs=probs)[0].tolist()
        return _answer(ids, probs)

    # ---- distillation (MAE training) ---------------------------------------------------------
    def answer_logits(self, tokens, question, answer_ids, grid=None):
        """The LM's logits (len(answer_ids), V) for each answer token, teacher-forced after the
        prompt cloud_half builds (visual tokens, <bos> question <sep>): row j predicts
        answer_ids[j]. Differentiable with respect to `tokens`; the weights are not updated."""
        if grid is not None:
            raise ValueError("the bundled VLM has a fixed layout: grid must be None")
        prompt = question_ids(encode_words(question))
        text = prompt + [int(t) for t in answer_ids]
        if len(text) > self.cfg.max_text_len:
            raise ValueError(f"question and answer are {len(text)} tokens; this model reads at "
                             f"most {self.cfg.max_text_len}")
        text = torch.tensor(text, device=tokens.device)
        logits = self.model.teacher_forced_logits(tokens[None].float(), text[None, None])
        return logits[0, len(prompt) - 1:]  # position i predicts text[i + 1]

    def check_question(self, question: str):
        """ValueError if `question` is longer than the model reads (TinyVLM.generate's limit:
        <bos> question <sep> and at least one answer token in max_text_len positions)."""
        check_question_length(question, self.cfg.max_text_len)
