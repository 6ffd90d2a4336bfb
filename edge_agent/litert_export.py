"""Export the device's edge half for LiteRT (TensorFlow Lite), float32 or full-integer int8.

    vision.tflite        pixels (1, 3, S, S) → visual tokens (1, N, D)
    mae_encoder.tflite   visual tokens (N, D) → latent (N, d); the code assignment and range
                         coding of the k layers sent run in NumPy (mae_tables.*), as for ONNX
    mae_tables.*         the MAE's coding tables (progvlm/codec/tables.py)
    manifest.json        model ids, shapes, vocabulary, int8 and its calibration, sha256s

Converter: litert-torch (PyPI; works with the pinned torch 2.13) straight from the PyTorch
modules. int8 is PT2E static quantisation with litert-torch's quantiser (symmetric, per-channel
weights, int8 activations), calibrated on frames of the bundled scenes from the training seed
stream (never the evaluation scenes); the graphs' inputs and outputs are int8 too (full-integer,
what an NPU delegate takes), and edge_agent/litert_runtime.py quantises at their edges.
No language half: full-edge mode runs on `--runtime onnx` or `pytorch`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from progvlm.toyworld.questions import VOCAB

from .exported import sha256
from .litert_runtime import FORMAT, MODELS, REQUIRED_FILES
from .onnx_export import _Encoder, _Vision

CALIBRATION_SEED = 19  # of data.TRAIN_STREAM: the scenes the int8 ranges are observed on
CALIBRATION_FRAMES = 64


def calibration_frames(size: int, count: int = CALIBRATION_FRAMES, seed: int = CALIBRATION_SEED):
    """Model inputs (1, 3, S, S) of `count` scenes of the training stream, preprocessed as the
    runtime does it (progvlm.images.model_input)."""
    from progvlm.images import model_input
    from progvlm.toyworld.data import TRAIN_STREAM, scenes
    from progvlm.toyworld.scenes import render_scene
    return [torch.from_numpy(model_input(render_scene(s), size))
            for s in scenes(TRAIN_STREAM, seed, count)]


def _converter():
    """litert-torch, its progress display off (it prints to stdout, where the export's JSON goes)."""
    try:
        import litert_torch
        from litert_torch._config import config
    except ImportError:
        raise ValueError("the LiteRT export needs litert-torch: pip install -e \".[litert]\"") from None
    config.show_progress = False
    return litert_torch


def _convert(module, sample, calibration=None):
    """A float32 LiteRT model of `module`, or (calibration given) a full-integer int8 one."""
    litert_torch = _converter()
    if calibration is None:
        return litert_torch.convert(module.eval(), (sample,))
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = torch.export.export(module.eval(), (sample,)).module()
    graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
    for x in calibration:
        graph(x)
    graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    return litert_torch.convert(graph, (sample,),
                                quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))


def export_litert(out: str | Path, vlm=None, mae=None, int8: bool = False,
                  calibration_count: int = CALIBRATION_FRAMES) -> dict:
    """Write the LiteRT export of a (VLM, MAE) pair (default the bundled ones) into `out`;
    returns the manifest without its vocabulary, for printing. Bundled-format VLMs only."""
    from progvlm.backends.tiny import TinyVLMBackend
    from progvlm.split import load_split
    split = load_split(vlm, mae)
    backend, mae = split.vlm, split.mae.eval()
    if not isinstance(backend, TinyVLMBackend):
        raise ValueError(f"LiteRT export covers bundled-format VLMs; {backend.model_id} is a "
                         "transformers model: run its edge with `--runtime pytorch`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm, cfg = backend.model.eval(), backend.cfg
    S, N, D = cfg.image_size, cfg.num_tokens, cfg.token_dim
    vision, encoder = _Vision(vlm), _Encoder(mae)
    with torch.no_grad():
        frames = calibration_frames(S, calibration_count) if int8 else None
        # the encoder's calibration inputs: the float vision's tokens of the same frames
        tokens = [vision(x)[0] for x in frames] if int8 else None
        _convert(vision, torch.zeros(1, 3, S, S), frames).export(str(out / "vision.tflite"))
        _convert(encoder, torch.zeros(N, D), tokens).export(str(out / "mae_encoder.tflite"))
    mae.edge_codec().save(out)
    manifest = {"format": FORMAT, "vlm_id": backend.model_id,
                "mae_fingerprint": mae.fingerprint().hex(), "image_size": S, "num_tokens": N,
                "token_dim": D, "num_layers": mae.num_layers, "max_text_len": cfg.max_text_len,
                "vocab": VOCAB, "int8": int8,
                "calibration": ({"stream": "TRAIN_STREAM", "seed": CALIBRATION_SEED,
                                 "frames": calibration_count, "scheme": "PT2E static, symmetric, "
                                 "per-channel weights, int8 activations and I/O"} if int8 else None),
                "sha256": {f: sha256(out / f) for f in REQUIRED_FILES}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {k: v for k, v in manifest.items() if k != "vocab"}


def _macs(op, details) -> int:
    """Multiply-accumulates of the ops that hold nearly all of them (from tensor shapes)."""
    out = details.get(op["outputs"][0])
    if out is None:
        return 0
    n = int(np.prod(out["shape"]))
    if op["op_name"] in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL"):
        w = details.get(op["inputs"][1])
        if op["op_name"] == "FULLY_CONNECTED" and w is not None:
            return n * int(w["shape"][-1])
        if op["op_name"] == "CONV_2D" and w is not None:
            return n * int(np.prod(w["shape"][1:]))
        if op["op_name"] == "DEPTHWISE_CONV_2D" and w is not None:
            return n * int(np.prod(w["shape"][1:3]))
        a = details.get(op["inputs"][0])
        return n * int(a["shape"][-1]) if a is not None else 0
    return 0


def op_coverage(path: str | Path) -> dict:
    """The ops of a .tflite model, and their MACs, by whether they run on int8 tensors (what an
    int8 NPU can take) or on float32 (what stays on the CPU); QUANTIZE/DEQUANTIZE are `other`."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_path=str(path))
    details = {t["index"]: t for t in interp.get_tensor_details()}
    ops, macs = {"int8": 0, "float": 0, "other": 0}, {"int8": 0, "float": 0, "other": 0}
    by_op: dict[str, dict] = {}
    for op in interp._get_ops_details():
        types = {np.dtype(details[i]["dtype"]).name for i in op["inputs"] if i in details}
        kind = "float" if "float32" in types else "int8" if types & {"int8", "int32"} else "other"
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            kind = "other"
        ops[kind] += 1
        macs[kind] += _macs(op, details)
        by_op.setdefault(op["op_name"], {"int8": 0, "float": 0, "other": 0})[kind] += 1
    n_ops, n_macs = sum(ops.values()), sum(macs.values())
    return {"ops": n_ops, "int8_fraction": ops["int8"] / max(1, n_ops),
            "float_fraction": ops["float"] / max(1, n_ops), "macs": n_macs,
            "int8_mac_fraction": macs["int8"] / max(1, n_macs),
            "float_mac_fraction": macs["float"] / max(1, n_macs), "by_op": by_op}


def export_coverage(folder: str | Path) -> dict:
    """op_coverage of every model of a LiteRT export, without the per-operator breakdown."""
    return {m: {k: v for k, v in op_coverage(Path(folder) / f"{m}.tflite").items() if k != "by_op"}
            for m in MODELS}
