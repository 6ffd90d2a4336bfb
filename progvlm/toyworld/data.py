"""Seeded streams of scenes, pre-rendered training sets, and question batches as tensors."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from ..images import normalise_frames
from .questions import QA, WORD_TO_ID, EOS, PAD, encode_words, questions_for, QUESTION_TYPES
from .scenes import GRID, Scene, cell_index, cell_targets, generate_scene, render_scene
from .questions import question_ids
from .tiny_vlm import FOCUS_HEADS

# Separate seed streams, so that evaluation scenes are never the training scenes of equal seed.
TRAIN_STREAM, EVAL_STREAM = 1, 2


def scene_seed(stream: int, seed: int, index: int) -> int:
    return int(np.random.SeedSequence([stream, seed, index]).generate_state(1)[0])


def scenes(stream: int, seed: int, count: int, start: int = 0) -> list[Scene]:
    return [generate_scene(scene_seed(stream, seed, i)) for i in range(start, start + count)]


def pixels_from_uint8(frames: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 → normalised (B, 3, S, S) float tensor."""
    return torch.from_numpy(normalise_frames(frames))


def _render_chunk(args):
    stream, seed, start, count, size = args
    out = np.empty((count, size, size, 3), np.uint8)
    cells = np.empty((count, 64, 3), np.int64)
    for j, sc in enumerate(scenes(stream, seed, count, start)):
        out[j] = np.asarray(render_scene(sc, size))
        t = cell_targets(sc)
        cells[j] = np.stack([t["colour"], t["shape"], t["size"]], -1)
    return out, cells


def render_set(stream: int, seed: int, count: int, size: int, workers: int = 2, progress=None):
    """Pre-render `count` frames at model size (uint8) with their per-cell targets."""
    chunk = 250
    jobs = [(stream, seed, s, min(chunk, count - s), size) for s in range(0, count, chunk)]
    frames, cells = [], []
    with ProcessPoolExecutor(workers) as pool:
        for f, c in pool.map(_render_chunk, jobs):
            frames.append(f)
            cells.append(c)
            if progress:
                progress(len(f))
    return np.concatenate(frames), np.concatenate(cells)


def pack_qas(qas_per_image: list[list[QA]], max_len: int, scenes: list[Scene] | None = None):
    """Teacher-forcing tensors: text (B, Q, T) = <bos> q <sep> a <eos> <pad>…, and the mask of
    positions whose token is a target (answer words and <eos>). With the scenes given, also
    focus (B, Q, T, 2, N): for each answer word, the grid cells each taught head should see."""
    B, Q = len(qas_per_image), max(len(q) for q in qas_per_image)
    text = torch.full((B, Q, max_len), WORD_TO_ID[PAD], dtype=torch.long)
    mask = torch.zeros((B, Q, max_len), dtype=torch.bool)
    focus = (torch.zeros((B, Q, max_len, FOCUS_HEADS, GRID * GRID), dtype=torch.bool)
             if scenes else None)
    for b, qas in enumerate(qas_per_image):
        for q, qa in enumerate(qas):
            prompt = question_ids(encode_words(qa.question))
            seq = prompt + encode_words(qa.answer) + [WORD_TO_ID[EOS]]
            assert len(seq) <= max_len, qa
            text[b, q, :len(seq)] = torch.tensor(seq)
            mask[b, q, len(prompt):len(seq)] = True
            if focus is not None:
                for w, per_head in enumerate(qa.focus):
                    for h, objs in enumerate(per_head):
                        for j in objs:
                            cell = cell_index(scenes[b].objects[j])
                            focus[b, q, len(prompt) + w, h, cell] = True
    return (text, mask) if focus is None else (text, mask, focus)


def training_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    qas = questions_for(scene, rng, QUESTION_TYPES)
    while len(qas) < len(QUESTION_TYPES):  # keep Q fixed per image; pad with another count
        qas.append(questions_for(scene, rng, ("count",))[0])
    return qas
