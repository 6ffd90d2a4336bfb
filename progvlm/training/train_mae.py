"""Train the MAE on the frozen VLM's own visual tokens; the VLM is never updated.

Objective per sample, for a k drawn per sample from 1..L (one model, every rate):
    recon           ‖T̂_k − T‖² in per-dimension standardised units
  + distill · KL    KL(LM(T) ‖ LM(T̂_k)) over answer tokens, through the frozen language model
  + 0.25 · commit   pulls the encoder's latents towards their codes (codebooks follow by EMA)

Two sources of samples feed the one loop (`_fit`), both in mae_data.py: `SceneData`
(`train_mae`: the bundled VLM on generated scenes, ground-truth answers) and `ImageData`
(`train_mae_on_images`: any backend on a folder of images, the VLM's own answers as teacher,
cached in safetensors shards). What a run is (its key, working folder, checkpoint and saved
MAE) is mae_runs.py. The quantiser's own schedule (its rate ramp) is asked of it each step.
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
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.mae import MAE, MAEConfig
from ..toyworld.data import TRAIN_STREAM, scenes
from .checkpoint import save_checkpoint
from .mae_data import (CachedSamples, ImageData, SceneData, build_teacher_cache, list_images,
                       read_or, read_prompts, train_frames, visual_token_set)
from .mae_runs import (OUT_ROOT, WORK_ROOT, TrainMAEError, check_options, claim_workdir,
                       resume_run, run_key, run_name, save_mae)

DEFAULT_PROMPTS = ("Describe the image.", "What is in the picture?", "What colours do you see?",
                   "How many objects are there?", "Where is the main object?")
# the names the CLI and callers take from here, wherever they are defined
__all__ = ["DEFAULT_PROMPTS", "TrainMAEError", "build_teacher_cache", "check_options",
           "list_images", "read_prompts", "save_mae", "train_mae", "train_mae_on_images"]


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
    start, elapsed, history = (resume_run(ckpt, mae, opt, name, key["vlm_id"], say) if resume
                               else (0, 0.0, []))
    model, opt = accelerator.prepare(mae, opt)  # `model` may wrap `mae` (DDP) on several GPUs
    batches = data.batches(start, batch)
    gen = torch.Generator().manual_seed(seed * 1000 + start)
    L = mae.num_layers
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


def _config(backend, cfg: MAEConfig | None) -> MAEConfig:
    cfg = cfg or MAEConfig.for_tokens(backend.tokens_per_block, backend.token_dim)
    cfg.vlm_id = backend.model_id
    cfg.num_tokens, cfg.token_dim = backend.tokens_per_block, backend.token_dim
    if len(cfg.rate_lambda) != cfg.num_layers:
        raise TrainMAEError(f"--rate-lambda takes one λ per stage: {cfg.num_layers} numbers, got "
                            f"{len(cfg.rate_lambda)}")
    return cfg


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
        claim_workdir(workdir, key, run_name(key))
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
        claim_workdir(workdir, key, name)
        # the teacher runs where training will; the bundled backend's halves build their
        # inputs on the CPU, so its (small) cache is made there
        bundled = getattr(backend, "family", "") == "bundled"
        backend.model.to("cpu" if bundled else accelerator.device)
        build_teacher_cache(backend, folder, paths, cache, prompts, teacher_tokens, shard_images,
                            show=True, log=log, answers=distill > 0)
    else:  # the others wait for it by polling: a long build would time out a barrier
        while not json.loads(read_or(cache / "index.json", "{}")).get("complete"):
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
