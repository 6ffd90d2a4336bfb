"""Export the device's models for ONNX Runtime: what a board runs without PyTorch.

    vision.onnx        pixels (1, 3, S, S) → visual tokens (1, N, D)
    mae_encoder.onnx   visual tokens (N, D) → latent (N, d); the code assignment and range
                       coding of the k layers sent run in NumPy (mae_tables.*)
    language.onnx      visual tokens (1, N, D) + text ids (1, T) → next-token logits (1, V)
                       (full-edge; one greedy step over the whole prompt, no KV cache: the
                       answers here are a few tokens long)
    mae_tables.*       the MAE's coding tables (progvlm/codec/tables.py)
    manifest.json      model ids, shapes, vocabulary and the sha256 of every file
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from progvlm.toyworld.questions import VOCAB

from .exported import sha256
from .onnx_runtime import FORMAT, REQUIRED_FILES

OPSET = 17  # ONNX Runtime ≥ 1.12 runs it; the graphs use only standard ops


class _Language(nn.Module):
    """Visual tokens + prompt ids → logits of the next token (the cloud half, one step)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, tokens, ids):
        hidden, _ = self.vlm.lm.forward_embeds(self.vlm._prompt(tokens, ids))
        return self.vlm.lm.logits(hidden[:, -1])


class _Vision(nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, pixels):
        return self.vlm.visual_tokens(pixels)


class _Encoder(nn.Module):
    """The MAE's inference encoder (MAE.inference_encoder): the token standardisation folded
    into the first layer, so the graph is Gemm → GELU → Gemm, as in the PyTorch runtime."""

    def __init__(self, mae):
        super().__init__()
        self.encoder = mae.inference_encoder()

    def forward(self, tokens):
        return self.encoder(tokens)


def export_onnx(out: str | Path, vlm=None, mae=None) -> dict:
    """Write the export of a (VLM, MAE) pair into `out` (progvlm.split.load_split: default the
    bundled VLM and MAE); returns the manifest without its vocabulary, for printing.

    Bundled-format VLMs only: a `transformers` VLM's edge needs its processor and generation
    loop, which need transformers and PyTorch, so such a device runs `--runtime pytorch`."""
    from progvlm.backends.tiny import TinyVLMBackend
    from progvlm.split import load_split
    split = load_split(vlm, mae)
    backend, mae = split.vlm, split.mae
    if not isinstance(backend, TinyVLMBackend):
        raise ValueError(f"ONNX export covers bundled-format VLMs; {backend.model_id} is a "
                         "transformers model: run its edge with `--runtime pytorch --vlm SPEC "
                         "--mae FOLDER` (its processor and generation loop need transformers)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm, cfg = backend.model.eval(), backend.cfg
    S, N, D = cfg.image_size, cfg.num_tokens, cfg.token_dim
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter announces its deprecation, and the tracer flags two benign
        # spots in tiny_vlm.Attention: unpacking q, k, v (always 3) and `causal and T > 1`
        # (T ≥ N + 2 in language.onnx, so always true); tests/test_onnx.py compares the graphs
        # with PyTorch on every prompt length the example questions have.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        export = dict(dynamo=False, opset_version=OPSET, do_constant_folding=True)
        torch.onnx.export(_Vision(vlm), (torch.zeros(1, 3, S, S),), str(out / "vision.onnx"),
                          input_names=["pixels"], output_names=["tokens"], **export)
        torch.onnx.export(_Encoder(mae.eval()), (torch.zeros(N, D),), str(out / "mae_encoder.onnx"),
                          input_names=["tokens"], output_names=["latent"], **export)
        torch.onnx.export(_Language(vlm), (torch.zeros(1, N, D), torch.ones(1, 8, dtype=torch.long)),
                          str(out / "language.onnx"), input_names=["tokens", "ids"],
                          output_names=["logits"], dynamic_axes={"ids": {1: "text_len"}}, **export)
    mae.edge_codec().save(out)  # the coding tables compress itself uses
    manifest = {"format": FORMAT, "vlm_id": backend.model_id,
                "mae_fingerprint": mae.fingerprint().hex(), "image_size": S, "num_tokens": N,
                "token_dim": D, "num_layers": mae.num_layers, "max_text_len": cfg.max_text_len,
                "vocab": VOCAB, "opset": OPSET, "sha256": {f: sha256(out / f) for f in REQUIRED_FILES}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {k: v for k, v in manifest.items() if k != "vocab"}
