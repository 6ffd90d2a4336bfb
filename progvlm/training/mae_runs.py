"""What an MAE training run is and where it lives: its key (VLM, MAE config, data), its
working folder (claimed, so a run never resumes another's checkpoint), and the MAE it saves.
The loop itself is in train_mae.py."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from safetensors.torch import save_file

from ..models.mae import MAE, MAEConfig
from .checkpoint import resume_from

WORK_ROOT = Path("runs/train-mae")  # working folders: teacher cache, checkpoint
OUT_ROOT = Path("runs/mae")  # trained MAEs; assets/mae only when asked for with --out


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


def claim_workdir(workdir: Path, key: dict, name: str):
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


def resume_run(ckpt: Path, mae: MAE, opt, name: str, vlm_id: str, log):
    """(step, elapsed, history) from this run's checkpoint; another run's is refused."""
    if ckpt.is_file():
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        if meta.get("run") != name:
            raise TrainMAEError(
                f"checkpoint {ckpt} belongs to run {meta.get('run')!r} (VLM "
                f"{meta.get('vlm_id')!r}), not to this run {name!r} (VLM {vlm_id!r}); "
                "it was not resumed: use another --workdir, or delete it")
    return resume_from(ckpt, mae, opt, log)


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
