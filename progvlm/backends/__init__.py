"""VLM backends behind one interface, and the one call that turns a VLM spec into a backend.

A spec is what every entry point takes as `--vlm` (or the PROGVLM_VLM environment variable):

    bundled            the small VLM shipped in assets/tiny_vlm (the default)
    FOLDER             a local folder: a bundled-format model (config.json with a "model" key and
                       model.safetensors) or a `transformers` checkpoint
    ORG/NAME           a Hugging Face Hub id, read from the local Hub cache; downloaded only where
                       downloads are allowed (PROGVLM_ALLOW_DOWNLOAD=1, e.g. a hosted Space)

A new `transformers` family is one class in hf_families.py (its prompt expansion, image
features, tokens per block, input size, tile layouts) plus its `model_type` entry in
`hf_families.FAMILIES`; `load_vlm` then loads it like any other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .base import Answer, VLMBackend

VLM_ENV = "PROGVLM_VLM"
MAE_ENV = "PROGVLM_MAE"
ALLOW_DOWNLOAD_ENV = "PROGVLM_ALLOW_DOWNLOAD"
BUNDLED = "bundled"


class VLMSpecError(ValueError):
    """A VLM spec that cannot be loaded here; str(e) says why and what to do."""


def default_vlm_spec() -> str:
    return os.environ.get(VLM_ENV) or BUNDLED


def _is_bundled_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not (folder / "model.safetensors").is_file() or not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    # transformers configs carry model_type; the bundled format nests its config under "model"
    return isinstance(meta, dict) and "model" in meta and "model_type" not in meta


def load_vlm(spec: str | Path | None = None, **hf_kwargs) -> VLMBackend:
    """The backend for a VLM spec (see the module docstring); None means PROGVLM_VLM or bundled."""
    spec = str(spec) if spec is not None else default_vlm_spec()
    # the processor's own tiling setting: the tile grid travels with the visual tokens
    hf_kwargs.setdefault("image_splitting", None)
    if spec == BUNDLED:
        from .tiny import TinyVLMBackend
        return TinyVLMBackend.load()
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if _is_bundled_folder(folder):
            from .tiny import TinyVLMBackend
            return TinyVLMBackend.load(folder)
        if not (folder / "config.json").is_file():
            raise VLMSpecError(f"{folder} holds no config.json: not a bundled-format or "
                               "transformers model folder")
        from .hf import HFVLMBackend
        return HFVLMBackend.load(folder, local_files_only=True, **hf_kwargs)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise VLMSpecError(f"VLM {spec!r}: no such folder, and not a Hugging Face Hub id "
                           "(ORG/NAME); use 'bundled', a model folder or a Hub id")
    from .hf import HFVLMBackend
    allow = os.environ.get(ALLOW_DOWNLOAD_ENV, "") not in ("", "0")
    try:
        return HFVLMBackend.load(spec, local_files_only=not allow, **hf_kwargs)
    except OSError as e:  # transformers reports a cache miss as an OSError
        if allow:
            raise VLMSpecError(f"could not load {spec!r} from the Hugging Face Hub: {e}") from None
        raise VLMSpecError(
            f"{spec!r} is not in the local Hugging Face cache and downloads are off. Fetch it "
            f"once where there is a network with `hf download {spec}`, or set "
            f"{ALLOW_DOWNLOAD_ENV}=1 to download at start-up.") from None


__all__ = ["Answer", "VLMBackend", "VLMSpecError", "load_vlm", "default_vlm_spec",
           "VLM_ENV", "MAE_ENV", "BUNDLED"]
