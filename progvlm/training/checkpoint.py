"""Resumable checkpoints in plain formats: tensors in safetensors, everything else in JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    scalars = {}
    for pid, st in opt_state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"opt.{pid}.{name}"] = v.contiguous()
            else:
                scalars[f"{pid}.{name}"] = float(v)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a torn checkpoint
    meta = dict(meta, opt_scalars=scalars, param_groups=opt_state["param_groups"])
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in meta["opt_scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(v)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def resume_from(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, log=print):
    """(step, elapsed seconds, history) of the checkpoint at path, loaded into model and
    optimiser; (0, 0.0, []) where there is none."""
    if not path.is_file():
        return 0, 0.0, []
    meta = load_checkpoint(path, model, opt)
    log(f"resumed from {path} at step {meta['step']}")
    return meta["step"], meta["elapsed_s"], meta["history"]
