"""Where MAE training's samples come from; `train_mae._fit` reads both through
`batches(start, batch)` and `kl(batch, T_hat)`.

  * `SceneData`: the bundled VLM on generated scenes, tokens held in memory, questions with
    ground-truth answers, teacher-forced in batches;
  * `ImageData` over `CachedSamples`: any backend on a folder of images. The teacher is the VLM
    itself: its greedy answers to a few generic prompts from the uncompressed tokens. Tokens,
    tile grids and answers are computed once into safetensors shards in the working folder
    (`build_teacher_cache`, resumable) and read back shard by shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..toyworld.data import TRAIN_STREAM, pack_qas, pixels_from_uint8, render_set, training_questions
from .mae_runs import TrainMAEError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---- the bundled VLM on generated scenes -----------------------------------------------------

def visual_token_set(backend, frames: np.ndarray, batch: int = 256,
                     show: bool = True) -> torch.Tensor:
    """The frozen VLM's visual tokens for pre-rendered frames (M, S, S, 3) uint8."""
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(frames), batch), desc="visual tokens", unit="batch",
                      disable=not show):
            out.append(backend.model.visual_tokens(pixels_from_uint8(frames[i:i + batch])))
    return torch.cat(out)


def train_frames(workdir: Path, seed: int, num_scenes: int, image_size: int) -> np.ndarray:
    """Frames of the training stream: reuse the VLM's pre-rendered set when it is there."""
    for cached in sorted(Path("runs/train-vlm").glob(f"frames-s{seed}-n*-px{image_size}.npz")):
        frames = np.load(cached)["frames"]
        if len(frames) >= num_scenes:
            return frames[:num_scenes]
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / f"frames-s{seed}-n{num_scenes}-px{image_size}.npz"
    if cache.is_file():
        return np.load(cache)["frames"]
    with tqdm(total=num_scenes, desc="rendering scenes", unit="scene") as bar:
        frames, cells = render_set(TRAIN_STREAM, seed, num_scenes, image_size, progress=bar.update)
    np.savez(cache, frames=frames, cells=cells)
    return frames


class SceneData:
    """Generated scenes: tokens in memory, batches of `batch` scenes drawn with replacement, and
    each scene's questions with their ground-truth answers, teacher-forced in one LM pass."""

    def __init__(self, vlm, tokens: torch.Tensor, scene_list: list, seed: int, device,
                 process: int = 0):
        self.vlm, self.tokens, self.scene_list, self.device = vlm, tokens, scene_list, device
        self.seed = [seed] if process == 0 else [seed, process]  # another stream per process

    def batches(self, start: int, batch: int):
        rng = np.random.default_rng(self.seed + [start])
        ones = torch.ones(batch, dtype=torch.long, device=self.device)  # one block per scene
        while True:
            idx = rng.integers(0, len(self.tokens), batch)
            b = {"tokens": self.tokens[idx].to(self.device), "tiles": ones}
            if self.scene_list:
                text, mask = pack_qas([training_questions(self.scene_list[i], rng) for i in idx],
                                      self.vlm.cfg.max_text_len)
                b["text"] = text.to(self.device)
                b["mask"] = mask.view(-1, mask.shape[-1])[:, 1:].to(self.device)
            yield b

    def kl(self, b, T_hat):
        with torch.no_grad():
            teacher = self.vlm.teacher_forced_logits(b["tokens"], b["text"])[b["mask"]]
            teacher = teacher.log_softmax(-1)
        student = self.vlm.teacher_forced_logits(T_hat, b["text"])[b["mask"]].log_softmax(-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


# ---- any backend on a folder of images --------------------------------------------------------

def read_prompts(path: Path) -> list[str]:
    """Questions for the teacher, one per line; blank lines and # comments are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainMAEError(f"cannot read the questions file {path}: {e}") from None
    prompts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        raise TrainMAEError(f"the questions file {path} holds no questions (one per line; blank "
                            "lines and # comments are ignored)")
    return prompts


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, by suffix), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainMAEError(f"--images {folder}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise TrainMAEError(f"--images {folder} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def build_teacher_cache(backend, folder: Path, paths: list[Path], cache: Path, prompts: list[str],
                        teacher_tokens: int, shard_images: int = 256, show: bool = True,
                        log=print, answers: bool = True) -> dict:
    """Visual tokens, tile grids and the VLM's greedy answer to every prompt, for every image,
    into cache/shard_NNNNN.safetensors ("tokens" (ΣN, D), "answers" (ΣA,) int64) and
    cache/index.json (per image: name, grid, token and answer offsets). Never pickle.

    Resumable: images of shards already written are skipped, so a half-built cache is
    continued. Images go in a fixed shuffled order, so each shard is a random subset and
    reading shard by shard still mixes the data."""
    from ..images import ImageInputError, load_image
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "index.json"
    index = (json.loads(index_path.read_text()) if index_path.is_file()
             else {"version": 1, "prompts": prompts, "teacher_tokens": teacher_tokens,
                   "shards": [], "skipped": []})
    done = {im["name"] for s in index["shards"] for im in s["images"]} | set(index["skipped"])
    order = np.random.default_rng(0).permutation(len(paths))
    todo = [paths[i] for i in order if paths[i].relative_to(folder).as_posix() not in done]
    block, skipped, buf = backend.tokens_per_block, [], []

    def flush():
        if not buf and not skipped:
            return
        file = f"shard_{len(index['shards']):05d}.safetensors"
        images, answers, t0, a0 = [], [], 0, 0
        for name, tokens, grid, ids in buf:
            spans = []
            for a in ids:
                spans.append([a0, a0 + len(a)])
                answers += a
                a0 += len(a)
            images.append({"name": name, "grid": None if grid is None else list(grid),
                           "tokens": [t0, t0 + len(tokens)], "answers": spans})
            t0 += len(tokens)
        if buf:
            tensors = {"tokens": torch.cat([t for _, t, _, _ in buf]).cpu().contiguous(),
                       "answers": torch.tensor(answers, dtype=torch.long)}
            save_file(tensors, str(cache / (file + ".tmp")))
            os.replace(cache / (file + ".tmp"), cache / file)  # no torn shard after a crash
            index["shards"].append({"file": file, "images": images})
        index["skipped"] += skipped
        write_atomic(index_path, json.dumps(index))
        buf.clear()
        skipped.clear()

    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="teacher cache",
               unit="image", disable=not show)
    for path in todo:
        name = path.relative_to(folder).as_posix()
        try:
            image = load_image(path)
        except ImageInputError as e:
            log(f"skipping {name}: {e}")
            skipped.append(name)
            bar.update()
            continue
        with torch.no_grad():
            tokens, grid = backend.edge_half_with_grid(image)
            if tokens.shape[0] % block or tokens.shape[1] != backend.token_dim:
                raise TrainMAEError(f"{name}: {tuple(tokens.shape)} visual tokens are not blocks "
                                    f"of {block} × {backend.token_dim}")
            # the teacher: the VLM's own greedy answer from the uncompressed tokens (not
            # needed, so not generated, when training on reconstruction alone: --distill 0)
            ids = [list(backend.cloud_half(tokens, q, max_new_tokens=teacher_tokens,
                                           grid=grid).token_ids) if answers else []
                   for q in prompts]
        buf.append((name, tokens, grid, ids))
        if len(buf) == shard_images:
            flush()
        bar.update()
    flush()
    bar.close()
    if not index["shards"]:
        raise TrainMAEError(f"no readable images in {folder}")
    index["complete"] = True  # what the other processes wait for
    write_atomic(index_path, json.dumps(index))
    return index


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers (other processes, a resumed run) never see half a file


def read_or(path: Path, default: str) -> str:
    return path.read_text() if path.is_file() else default


class CachedSamples(torch.utils.data.Dataset):
    """(image, prompt) samples of a teacher cache. Item i is image i // P with prompt i % P;
    one shard file is open at a time (memory-mapped), so the cache is never all in memory."""

    def __init__(self, cache: Path, index: dict, backend):
        self.cache, self.prompts = cache, index["prompts"]
        self.block, self.dim = backend.tokens_per_block, backend.token_dim
        self.images = [(s["file"], im) for s in index["shards"] for im in s["images"]]
        P = len(self.prompts)
        self.shard_ranges, i = [], 0  # sample indices of each shard, for ShardLocalSampler
        for s in index["shards"]:
            self.shard_ranges.append(range(i * P, (i + len(s["images"])) * P))
            i += len(s["images"])
        self._open = (None, None)

    def __len__(self):
        return len(self.images) * len(self.prompts)

    def _shard(self, file: str):
        if self._open[0] != file:
            self._open = (file, safe_open(str(self.cache / file), framework="pt"))
        return self._open[1]

    def __getitem__(self, i):
        (file, im), p = self.images[i // len(self.prompts)], i % len(self.prompts)
        shard = self._shard(file)
        a, b = im["answers"][p]
        return {"tokens": shard.get_slice("tokens")[im["tokens"][0]:im["tokens"][1]].float(),
                "grid": None if im["grid"] is None else tuple(im["grid"]),
                "prompt": self.prompts[p], "answer": shard.get_slice("answers")[a:b]}

    def collate(self, samples: list[dict]) -> dict:
        tokens = [s["tokens"] for s in samples]
        return {"tokens": torch.cat(tokens).view(-1, self.block, self.dim),  # (blocks, N, D)
                "tiles": torch.tensor([len(t) // self.block for t in tokens]),
                "grids": [s["grid"] for s in samples], "prompts": [s["prompt"] for s in samples],
                "answers": [s["answer"] for s in samples]}

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std of every cached token, one shard at a time."""
        n, s, ss = 0, torch.zeros(self.dim, dtype=torch.float64), 0
        for file in dict.fromkeys(f for f, _ in self.images):
            with safe_open(str(self.cache / file), framework="pt") as f:
                t = f.get_tensor("tokens").double()
            n, s, ss = n + len(t), s + t.sum(0), ss + t.pow(2).sum(0)
        mean = s / n
        var = (ss - n * mean.pow(2)) / max(1, n - 1)
        return mean.float(), var.clamp_min(0).sqrt().float()


class ShardLocalSampler(torch.utils.data.Sampler):
    """Endless sample order: shards in random order, samples shuffled within each shard, so
    reads stay in one shard file at a time. Seeded by (seed, start step): a resumed run draws
    afresh, as the scene path does; every process draws the same order (accelerate splits it)."""

    def __init__(self, shard_ranges: list[range], seed: int, start: int):
        self.shard_ranges, self.seed = shard_ranges, [seed, start]

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            for s in rng.permutation(len(self.shard_ranges)):
                r = self.shard_ranges[s]
                yield from (r.start + int(i) for i in rng.permutation(len(r)))


class ImageData:
    """Batches of cached (image, prompt) samples through an accelerate-prepared DataLoader;
    the distillation term runs the frozen LM per sample (prompts and tile counts differ)."""

    def __init__(self, samples: CachedSamples, backend, accelerator, seed: int):
        self.samples, self.backend = samples, backend
        self.accelerator, self.seed = accelerator, seed

    def batches(self, start: int, batch: int):
        loader = torch.utils.data.DataLoader(
            self.samples, batch_size=batch, collate_fn=self.samples.collate,
            sampler=ShardLocalSampler(self.samples.shard_ranges, self.seed, start))
        return iter(self.accelerator.prepare(loader))

    def kl(self, b, T_hat):
        student, teacher = [], []
        per_sample = zip(b["tokens"].split(b["tiles"].tolist()), T_hat.split(b["tiles"].tolist()),
                         b["prompts"], b["answers"], b["grids"])
        for T, T_k, prompt, answer, grid in per_sample:
            if len(answer) == 0:  # the VLM stopped at once: no answer token to match
                continue
            with torch.no_grad():  # the teacher: the LM on the uncompressed tokens
                teacher.append(self.backend.answer_logits(T.flatten(0, 1), prompt, answer, grid)
                               .float().log_softmax(-1))
            student.append(self.backend.answer_logits(T_k.flatten(0, 1), prompt, answer, grid)
                           .float().log_softmax(-1))
        if not student:
            return T_hat.new_zeros(())
        return F.kl_div(torch.cat(student), torch.cat(teacher), log_target=True,
                        reduction="batchmean")  # per answer token
