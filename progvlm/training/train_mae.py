"""Train the MAE on the frozen VLM's own visual tokens; the VLM is never updated.

Objective, for a k drawn per image from 1..L (one model, every rate):
    recon    ‖T̂_k − T‖² in per-dimension standardised units
  + distill  KL(LM(T) ‖ LM(T̂_k)) over the answer tokens of generated questions, through the
             frozen language model (bundled VLM only; other backends train on recon alone)
  + commit   pulls the encoder's latents towards their codes (codebooks follow by EMA)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..data import TRAIN_STREAM, pack_qas, pixels_from_uint8, render_set, scenes, training_questions
from ..models.mae import MAE, MAEConfig
from .checkpoint import resume_from, save_checkpoint


def visual_token_set(backend, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The frozen VLM's visual tokens for pre-rendered frames (M, S, S, 3) uint8."""
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(frames), batch), desc="visual tokens", unit="batch"):
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


def train_mae(backend, out: Path, workdir: Path, steps: int = 3000, batch: int = 32,
              num_scenes: int = 12000, lr: float = 1e-3, seed: int = 0, distill: float = 1.0,
              cfg: MAEConfig | None = None, resume: bool = True, ckpt_every: int = 200,
              tokens: torch.Tensor | None = None, log=print) -> dict:
    """Train an MAE for the bundled VLM on generated scenes (or on given `tokens`)."""
    torch.manual_seed(seed)
    vlm = backend.model
    vlm.requires_grad_(False).eval()
    if tokens is None:
        tokens = visual_token_set(backend, train_frames(workdir, seed, num_scenes,
                                                        backend.cfg.image_size))
    scene_list = scenes(TRAIN_STREAM, seed, len(tokens)) if distill > 0 else []
    cfg = cfg or MAEConfig()
    cfg.vlm_id, cfg.num_tokens, cfg.token_dim = backend.model_id, tokens.shape[1], tokens.shape[2]
    mae = MAE(cfg)
    mae.token_mean.copy_(tokens.mean((0, 1)))
    mae.token_std.copy_(tokens.std((0, 1)).clamp_min(1e-4))
    opt = torch.optim.AdamW([p for p in mae.parameters()], lr=lr, weight_decay=0.0)
    ckpt = workdir / "checkpoint.safetensors"
    start, elapsed, history = resume_from(ckpt, mae, opt, log) if resume else (0, 0.0, [])
    rng = np.random.default_rng([seed, start])
    gen = torch.Generator().manual_seed(seed * 1000 + start)
    L = cfg.num_layers
    mae.train()
    t0 = time.time() - elapsed
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train-mae", unit="step")
    for step in bar:
        frac = step / max(1, steps)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        mae.rvq.rate_scale = min(1.0, step / (0.4 * steps))
        idx = rng.integers(0, len(tokens), batch)
        T = tokens[idx]
        k = torch.randint(1, L + 1, (batch,), generator=gen)
        T_hat, commit = mae(T, k)
        recon = ((T_hat - T) / mae.token_std).pow(2).mean()
        kl = torch.zeros(())
        if distill > 0:
            text, mask = pack_qas([training_questions(scene_list[i], rng) for i in idx],
                                  vlm.cfg.max_text_len)
            m = mask.view(-1, mask.shape[-1])[:, 1:]
            with torch.no_grad():
                teacher = vlm.teacher_forced_logits(T, text)[m].log_softmax(-1)
            student = vlm.teacher_forced_logits(T_hat, text)[m].log_softmax(-1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        loss = recon + distill * kl + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(recon=f"{recon.item():.3f}", kl=f"{kl.item():.3f}", commit=f"{commit.item():.3f}")
        done = step + 1
        if done % 250 == 0 or done == steps:
            history.append({"step": done, "recon": recon.item(), "kl": kl.item(),
                            "elapsed_s": round(time.time() - t0, 1)})
        if done % ckpt_every == 0 or done == steps:
            save_checkpoint(ckpt, mae, opt, {"step": done, "elapsed_s": time.time() - t0,
                                             "history": history, "seed": seed})
    mae.eval()
    mae.rvq.rate_scale = 1.0
    mae.invalidate_caches()
    return save_mae(mae, out, {"steps": steps, "batch": batch, "scenes": len(tokens), "lr": lr,
                               "seed": seed, "distill": distill,
                               "train_seconds": round(time.time() - t0, 1), "history": history})


def save_mae(mae: MAE, out: Path, training: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(out / "mae.safetensors"))
    summary = {"mae": mae.cfg.to_dict(), "fingerprint": mae.fingerprint().hex(),
               "parameters": sum(p.numel() for p in mae.parameters()), "training": training}
    (out / "config.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_mae_on_images(backend, folder: Path, out: Path, workdir: Path, **kw) -> dict:
    """Train an MAE for any backend (e.g. a transformers VLM) on a folder of images, with the
    reconstruction objective alone (distillation needs scene questions with answers)."""
    from ..images import ImageInputError, load_image
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file())
    tokens = []
    for p in tqdm(paths, desc="visual tokens", unit="image"):
        try:
            tokens.append(backend.edge_half(load_image(p)).float())
        except ImageInputError as e:
            print(f"skipping {p.name}: {e}")
    if not tokens:
        raise ValueError(f"no readable images in {folder}")
    shapes = {tuple(t.shape) for t in tokens}
    if len(shapes) != 1:
        raise ValueError(f"the MAE needs a fixed token count; this backend gave {sorted(shapes)}")
    kw.pop("distill", None)
    return train_mae(backend, out, workdir, tokens=torch.stack(tokens), distill=0.0, **kw)
