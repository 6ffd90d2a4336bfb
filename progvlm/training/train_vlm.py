"""Train the bundled VLM on procedurally generated scenes (readable in one sitting).

What makes it converge on 2 CPU cores (measured; see README "Training the bundled VLM"):
  * a pre-rendered set of frames at model size, reused with fresh questions every epoch;
  * a conv stem before the ViT blocks (locality for free);
  * dense per-cell supervision of the visual tokens from the scene's ground truth, against
    the LM's own word embeddings (visual tokens and question words share one space);
  * attention supervision: one LM head is taught to look at the cells of the objects each
    answer word is about (the "binding" a small LM otherwise takes thousands of steps to find);
  * a training-only relation probe: where an answer is about two objects, the LM's state
    after the focus layer must say whether A is left of / above B, and which relation the
    question names. Without it "is A left of B" stays at chance however long training runs
    (the yes/no answer flips with the relation word, an XOR that gives no gradient to start);
  * every image carries one question of each type, and its visual prefix runs through the
    LM once for all of them.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..backends.tiny import TinyVLMBackend
from ..toyworld.data import TRAIN_STREAM, pack_qas, pixels_from_uint8, render_set, scenes, training_questions
from ..eval.evaluate import evaluate_backend
from ..toyworld.tiny_vlm import TinyVLM, TinyVLMConfig
from .checkpoint import resume_from, save_checkpoint


def lr_at(step: int, total: int, peak: float, warmup: int = 150) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * t)))


def train_vlm(out: Path, workdir: Path, steps: int = 4000, num_scenes: int = 24000,
              batch: int = 32, lr: float = 2e-3, seed: int = 0, eval_every: int = 500,
              ckpt_every: int = 200, resume: bool = True, cfg: TinyVLMConfig | None = None,
              focus_weight: float = 1.0, init_from: Path | None = None, warmup: int = 150,
              log=print) -> dict:
    cfg = cfg or TinyVLMConfig()
    torch.manual_seed(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / f"frames-s{seed}-n{num_scenes}-px{cfg.image_size}.npz"
    if cache.is_file():
        data = np.load(cache)
        frames, cells = data["frames"], data["cells"]
    else:
        with tqdm(total=num_scenes, desc="rendering scenes", unit="scene") as bar:
            frames, cells = render_set(TRAIN_STREAM, seed, num_scenes, cfg.image_size,
                                       progress=bar.update)
        np.savez(cache, frames=frames, cells=cells)
    scene_list = scenes(TRAIN_STREAM, seed, num_scenes)

    model = TinyVLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    ckpt = workdir / "checkpoint.safetensors"
    start, elapsed, history = resume_from(ckpt, model, opt, log) if resume else (0, 0.0, [])
    if start == 0 and init_from is not None:
        # warm start from earlier weights (e.g. to add a training-only head): fresh optimizer
        from safetensors.torch import load_file
        weights = {k.removeprefix("model."): v for k, v in load_file(str(init_from)).items()
                   if not k.startswith("opt.")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        log(f"initialised from {init_from}; new: {missing or 'none'}; dropped: {unexpected or 'none'}")
    rng = np.random.default_rng([seed, start])  # resumes to a fresh, still seeded stream

    def evaluate():
        model.eval()
        rep = evaluate_backend(TinyVLMBackend(model), seed=10_000 + seed, count=700)
        model.train()
        return rep

    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train-vlm", unit="step")
    t0 = time.time() - elapsed
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        idx = rng.integers(0, num_scenes, batch)
        batch_scenes = [scene_list[i] for i in idx]
        text, mask, focus = pack_qas([training_questions(sc, rng) for sc in batch_scenes],
                                     cfg.max_text_len, batch_scenes)
        lm_loss, aux_loss, focus_loss = model.training_losses(
            pixels_from_uint8(frames[idx]), torch.from_numpy(cells[idx]), text, mask, focus)
        opt.zero_grad(set_to_none=True)
        (lm_loss + aux_loss + focus_weight * focus_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(lm=f"{lm_loss.item():.3f}", aux=f"{aux_loss.item():.3f}",
                        focus=f"{focus_loss.item():.3f}")
        done = step + 1
        if done % eval_every == 0 or done == steps:
            rep = evaluate()
            history.append({"step": done, "elapsed_s": round(time.time() - t0, 1),
                            "lm_loss": lm_loss.item(), "val": rep})
            log(f"step {done}: val accuracy {rep['overall']:.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in rep["per_type"].items()))
        if done % ckpt_every == 0 or done == steps:
            save_checkpoint(ckpt, model, opt, {"step": done, "elapsed_s": time.time() - t0,
                                               "history": history, "seed": seed})
    train_s = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    summary = {"model": json.loads(cfg.to_json()),
               "training": {"steps": steps, "init_from": str(init_from) if init_from else None, "batch_images": batch, "scenes": num_scenes,
                            "lr": lr, "seed": seed, "train_seconds": round(train_s, 1),
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "history": history}}
    (out / "config.json").write_text(json.dumps(summary, indent=1))
    return summary
