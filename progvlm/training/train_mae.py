"""Train the MAE on the frozen VLM's own visual tokens; the VLM is never updated.

Objective per sample, for a k drawn per sample from 1..L (one model, every rate):
    recon           ‖T̂_k − T‖² in per-dimension standardised units
  + distill · KL    KL(LM(T) ‖ LM(T̂_k)) over answer tokens, through the frozen language model
  + 0.25 · commit   pulls the encoder's latents towards their codes (codebooks follow by EMA)

Two sources of samples feed the one loop (`_fit`):
  * `SceneData` (`train_mae`): the bundled VLM on generated scenes, tokens held in memory,
    questions with ground-truth answers, teacher-forced in batches;
  * `CachedSamples` (`train_mae_on_images`): any backend on a folder of images. The teacher is
    the VLM itself: its greedy answers to a few generic prompts from the uncompressed tokens.
    Tokens, tile grids and answers are computed once into safetensors shards in the working
    folder (resumable) and read back shard by shard.
The MAE codes blocks of `backend.tokens_per_block` tokens (one image, or one Idefics3 tile):
a tiled image's tokens are reshaped to (tiles, N, D), every tile is decoded with the sample's k,
and the tiles are flattened back for the language model.

Hugging Face Accelerate runs the loop: `accelerate launch -m progvlm train-mae ...` trains on
every GPU (--batch is per process), the plain command on one CPU. Working folders are keyed by
(VLM, MAE config, data): runs/train-mae/<slug>-<hash>, so a run never resumes another model's
checkpoint; the MAE goes to runs/mae/<slug>-<hash> unless --out says otherwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..toyworld.data import TRAIN_STREAM, pack_qas, pixels_from_uint8, render_set, scenes, training_questions
from ..models.mae import MAE, MAEConfig
from .checkpoint import resume_from, save_checkpoint

WORK_ROOT = Path("runs/train-mae")  # working folders: teacher cache, checkpoint
OUT_ROOT = Path("runs/mae")  # trained MAEs; assets/mae only when asked for with --out
DEFAULT_PROMPTS = ("Describe the image.", "What is in the picture?", "What colours do you see?",
                   "How many objects are there?", "Where is the main object?")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class TrainMAEError(ValueError):
    """A training request that cannot run as asked; the message says why (the CLI exits 2)."""


# ---- runs are keyed by what they train ------------------------------------------------------

def run_key(vlm_id: str, cfg: MAEConfig, data: dict) -> dict:
    """What a run is: the VLM, the MAE config and the data (not lr or steps, so a run extends)."""
    return {"vlm_id": vlm_id, "mae": cfg.to_dict(), "data": data}


def run_name(key: dict) -> str:
    """<slug of the VLM id>-<hash of the key>: the name of the working and output folders."""
    slug = re.sub(r"[^a-z0-9]+", "-", key["vlm_id"].lower())[-40:].strip("-") or "vlm"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def _claim(workdir: Path, key: dict, name: str):
    """Refuse a working folder of another run; mark a new one as this run's."""
    marker = workdir / "run.json"
    if marker.is_file():
        theirs = json.loads(marker.read_text())
        if theirs.get("name") != name:
            raise TrainMAEError(
                f"{workdir} is the working folder of run {theirs.get('name')!r} (VLM "
                f"{theirs.get('key', {}).get('vlm_id')!r}), not of this run {name!r} (VLM "
                f"{key['vlm_id']!r}); use another --workdir")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"name": name, "key": key}, indent=1))


def _resume(ckpt: Path, mae: MAE, opt, name: str, vlm_id: str, log):
    """(step, elapsed, history) from this run's checkpoint; another run's is refused."""
    if ckpt.is_file():
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        if meta.get("run") != name:
            raise TrainMAEError(
                f"checkpoint {ckpt} belongs to run {meta.get('run')!r} (VLM "
                f"{meta.get('vlm_id')!r}), not to this run {name!r} (VLM {vlm_id!r}); "
                "it was not resumed: use another --workdir, or delete it")
    return resume_from(ckpt, mae, opt, log)


# ---- the loop --------------------------------------------------------------------------------

def _fit(backend, cfg: MAEConfig, data, stats: tuple[torch.Tensor, torch.Tensor], *, key: dict,
         workdir: Path, out: Path, steps: int, batch: int, lr: float, seed: int, distill: float,
         resume: bool, ckpt_every: int, accelerator, log, training: dict) -> dict:
    """Train a fresh MAE (or resume this run's checkpoint) on `data` and save it to `out`.

    `data.batches(start, batch)` yields dicts with "tokens" (blocks, N, D) and "tiles" (blocks
    per sample); `data.kl(b, T_hat)` is the distillation term for that batch."""
    name, main = run_name(key), accelerator.is_main_process
    say = log if main else (lambda m: None)
    device = accelerator.device
    backend.model.requires_grad_(False).eval().to(device)  # frozen: the VLM is never updated
    torch.manual_seed(seed)
    mae = MAE(cfg)
    mae.token_mean.copy_(stats[0])
    mae.token_std.copy_(stats[1].clamp_min(1e-4))
    mae.to(device)
    opt = torch.optim.AdamW([p for p in mae.parameters()], lr=lr, weight_decay=0.0)
    ckpt = workdir / "checkpoint.safetensors"
    start, elapsed, history = (_resume(ckpt, mae, opt, name, key["vlm_id"], say) if resume
                               else (0, 0.0, []))
    model, opt = accelerator.prepare(mae, opt)  # `model` may wrap `mae` (DDP) on several GPUs
    batches = data.batches(start, batch)
    gen = torch.Generator().manual_seed(seed * 1000 + start)
    L = cfg.num_layers
    every = max(1, min(250, steps // 10))  # history points: 250 steps apart on long runs
    model.train()
    t0 = time.time() - elapsed
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train-mae", unit="step",
               disable=not main)
    for step in bar:
        # warm-up over 100 steps, then cosine down to 5%; the quantiser's own schedule
        frac = step / max(1, steps)
        for g in opt.param_groups:
            g["lr"] = (lr * min(1.0, (step + 1) / 100)
                       * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))))
        mae.quantiser.set_training_progress(step, steps)
        b = next(batches)
        T, tiles = b["tokens"], b["tiles"]
        k = torch.randint(1, L + 1, (len(tiles),), generator=gen).to(device)
        with accelerator.autocast():
            T_hat, commit = model(T, k.repeat_interleave(tiles))  # every tile of a sample: its k
            recon = ((T_hat.float() - T) / mae.token_std).pow(2).mean()  # fp32 under autocast
            kl = data.kl(b, T_hat) if distill > 0 else torch.zeros((), device=device)
            loss = recon + distill * kl + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(recon=f"{recon.item():.3f}", kl=f"{kl.item():.3f}",
                        commit=f"{commit.item():.3f}")
        done = step + 1
        if done % every == 0 or done == steps:
            history.append({"step": done, "recon": recon.item(), "kl": kl.item(),
                            "commit": commit.item(), "elapsed_s": round(time.time() - t0, 1)})
        if (done % ckpt_every == 0 or done == steps) and main:
            save_checkpoint(ckpt, mae, opt, {"step": done, "elapsed_s": time.time() - t0,
                                             "history": history, "seed": seed, "run": name,
                                             "vlm_id": key["vlm_id"]})
    accelerator.wait_for_everyone()
    mae = accelerator.unwrap_model(model).cpu().eval()
    mae.quantiser.set_training_progress(steps, steps)  # its state for inference
    mae.invalidate_caches()
    training = dict(training, steps=steps, batch=batch, lr=lr, seed=seed, distill=distill,
                    mixed_precision=accelerator.mixed_precision,
                    processes=accelerator.num_processes,
                    train_seconds=round(time.time() - t0, 1), history=history)
    if not main:  # the main process saves and reports
        return {"mae": cfg.to_dict(), "training": training, "out": str(out),
                "workdir": str(workdir)}
    summary = save_mae(mae, out, training)
    say(f"MAE written to {out}")
    return dict(summary, out=str(out), workdir=str(workdir))


def _accelerator(accelerator, mixed_precision: str | None):
    """The run's Accelerator; mixed_precision None takes `accelerate launch --mixed_precision`
    (else "no")."""
    if accelerator is not None:
        return accelerator
    from accelerate import Accelerator, PartialState
    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise TrainMAEError(f"--mixed-precision must be no, fp16 or bf16, got {mixed_precision!r}")
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if wanted == "fp16" and PartialState().device.type == "cpu":  # accelerate would ignore it
        raise TrainMAEError("--mixed-precision fp16 needs a GPU (this run is on the CPU): "
                            "use bf16 or no")
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError as e:  # one precision per process: accelerate's state is process-wide
        raise TrainMAEError(f"accelerate: {e}") from None


def save_mae(mae: MAE, out: Path, training: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()},
              str(out / "mae.safetensors"))
    summary = {"mae": mae.cfg.to_dict(), "fingerprint": mae.fingerprint().hex(),
               "parameters": sum(p.numel() for p in mae.parameters()), "training": training}
    (out / "config.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_options(steps: int, batch: int, distill: float, lr: float):
    """Refuse what no training can do, before anything loads."""
    if steps < 1:
        raise TrainMAEError(f"--steps must be at least 1, got {steps}")
    if batch < 1:
        raise TrainMAEError(f"--batch must be at least 1, got {batch}")
    if not distill >= 0:
        raise TrainMAEError(f"--distill must be 0 or more, got {distill}")
    if not lr > 0:
        raise TrainMAEError(f"--lr must be positive, got {lr}")


def _config(backend, cfg: MAEConfig | None) -> MAEConfig:
    cfg = cfg or MAEConfig.for_tokens(backend.tokens_per_block, backend.token_dim)
    cfg.vlm_id = backend.model_id
    cfg.num_tokens, cfg.token_dim = backend.tokens_per_block, backend.token_dim
    if len(cfg.rate_lambda) != cfg.num_layers:
        raise TrainMAEError(f"--rate-lambda takes one λ per stage: {cfg.num_layers} numbers, got "
                            f"{len(cfg.rate_lambda)}")
    return cfg


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


def train_mae(backend, out: Path | None = None, workdir: Path | None = None, steps: int = 3000,
              batch: int = 32, num_scenes: int = 12000, lr: float = 1e-3, seed: int = 0,
              distill: float = 1.0, cfg: MAEConfig | None = None, resume: bool = True,
              ckpt_every: int = 200, tokens: torch.Tensor | None = None, log=print, *,
              mixed_precision: str | None = None, accelerator=None, work_root: Path = WORK_ROOT,
              out_root: Path = OUT_ROOT) -> dict:
    """Train an MAE for the bundled VLM on generated scenes (or on given `tokens`).
    `out` / `workdir` default to out_root / work_root + the run's name."""
    check_options(steps, batch, distill, lr)
    if num_scenes < 1:
        raise TrainMAEError(f"--scenes must be at least 1, got {num_scenes}")
    accelerator = _accelerator(accelerator, mixed_precision)  # before any seeded draw
    cfg = _config(backend, cfg)
    if tokens is None:
        data_key = {"source": "scenes", "seed": seed, "scenes": num_scenes,
                    "image_size": backend.cfg.image_size}
    else:
        data_key = {"source": "tokens", "shape": list(tokens.shape),
                    "sum": round(float(tokens.double().sum()), 6)}
    key = run_key(backend.model_id, cfg, data_key)
    workdir = Path(workdir or Path(work_root) / run_name(key))
    out = Path(out or Path(out_root) / run_name(key))
    with accelerator.main_process_first():  # the main process renders; the others reuse it
        _claim(workdir, key, run_name(key))
        if tokens is None:  # on the CPU, where the bundled backend's halves run
            backend.model.cpu()
            frames = train_frames(workdir, seed, num_scenes, backend.cfg.image_size)
            tokens = visual_token_set(backend, frames, show=accelerator.is_main_process)
    scene_list = scenes(TRAIN_STREAM, seed, len(tokens)) if distill > 0 else []
    data = SceneData(backend.model, tokens, scene_list, seed, accelerator.device,
                     accelerator.process_index)
    return _fit(backend, cfg, data, (tokens.mean((0, 1)), tokens.std((0, 1))), key=key,
                workdir=workdir, out=out, steps=steps, batch=batch, lr=lr, seed=seed,
                distill=distill, resume=resume, ckpt_every=ckpt_every, accelerator=accelerator,
                log=log, training={"source": "scenes", "scenes": len(tokens)})


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
        _write_atomic(index_path, json.dumps(index))
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
    _write_atomic(index_path, json.dumps(index))
    return index


def _write_atomic(path: Path, text: str):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers (other processes, a resumed run) never see half a file


def _read_or(path: Path, default: str) -> str:
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


def train_mae_on_images(backend, folder: Path, out: Path | None = None,
                        workdir: Path | None = None, *, prompts=None, teacher_tokens: int = 24,
                        steps: int = 3000, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                        distill: float = 1.0, cfg: MAEConfig | None = None, resume: bool = True,
                        ckpt_every: int = 200, shard_images: int = 256,
                        mixed_precision: str | None = None,
                        accelerator=None, work_root: Path = WORK_ROOT, out_root: Path = OUT_ROOT,
                        log=print) -> dict:
    """Train an MAE for any backend on a folder of images: reconstruction + distillation of
    the VLM's own greedy answers to `prompts` (default: DEFAULT_PROMPTS) through its frozen LM.
    `out` / `workdir` default to out_root / work_root + the run's name."""
    check_options(steps, batch, distill, lr)
    if teacher_tokens < 1:
        raise TrainMAEError(f"--teacher-tokens must be at least 1, got {teacher_tokens}")
    prompts = list(prompts or DEFAULT_PROMPTS)
    folder = Path(folder)
    paths = list_images(folder)
    accelerator = _accelerator(accelerator, mixed_precision)
    cfg = _config(backend, cfg)
    listing = [[p.relative_to(folder).as_posix(), p.stat().st_size] for p in paths]
    data_key = {"source": "images", "folder": str(folder.resolve()), "count": len(paths),
                "images": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
                "prompts": prompts, "teacher_tokens": teacher_tokens,
                "teacher_answers": distill > 0}
    key = run_key(backend.model_id, cfg, data_key)
    name = run_name(key)
    workdir = Path(workdir or Path(work_root) / name)
    out = Path(out or Path(out_root) / name)
    cache = workdir / "teacher"
    main = accelerator.is_main_process
    if main:
        _claim(workdir, key, name)
        # the teacher runs where training will; the bundled backend's halves build their
        # inputs on the CPU, so its (small) cache is made there
        bundled = getattr(backend, "family", "") == "bundled"
        backend.model.to("cpu" if bundled else accelerator.device)
        build_teacher_cache(backend, folder, paths, cache, prompts, teacher_tokens, shard_images,
                            show=True, log=log, answers=distill > 0)
    else:  # the others wait for it by polling: a long build would time out a barrier
        while not json.loads(_read_or(cache / "index.json", "{}")).get("complete"):
            time.sleep(2)
    index = json.loads((cache / "index.json").read_text())
    samples = CachedSamples(cache, index, backend)
    n_images = len(samples.images)
    if main:
        log(f"teacher cache: {n_images} images × {len(prompts)} prompts in {cache}"
            + (f" ({len(index['skipped'])} unreadable, skipped)" if index["skipped"] else ""))
    data = ImageData(samples, backend, accelerator, seed)
    summary = _fit(backend, cfg, data, samples.stats(), key=key, workdir=workdir, out=out,
                   steps=steps, batch=batch, lr=lr, seed=seed, distill=distill, resume=resume,
                   ckpt_every=ckpt_every, accelerator=accelerator, log=log,
                   training={"source": "images", "folder": str(folder), "images": n_images,
                             "skipped": len(index["skipped"]), "prompts": len(prompts),
                             "teacher_tokens": teacher_tokens, "cache": str(cache)})
    return summary
