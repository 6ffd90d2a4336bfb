"""A model saved as a folder: `config.json` and a safetensors file of weights (never pickle)."""
from __future__ import annotations

import json
from pathlib import Path


def read_saved(folder: str | Path, weights_file: str, what: str, train_command: str) -> tuple[dict, dict, Path]:
    """(the folder's config.json, its weights as a state dict, the weights' path). A folder
    without the weights raises FileNotFoundError naming `what` and how to train one."""
    from safetensors.torch import load_file
    weights = Path(folder) / weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"no {what} weights at {weights}; train them with "
                                f"`python -m progvlm {train_command}`")
    meta = json.loads((Path(folder) / "config.json").read_text())
    return meta, load_file(str(weights)), weights
