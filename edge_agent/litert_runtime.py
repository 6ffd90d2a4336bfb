"""The edge runtime on LiteRT (ai-edge-litert's interpreter) and NumPy: no PyTorch imported.

Loads a folder made by `python -m edge_agent export --runtime litert [--int8]`. On a CPU the
interpreter runs XNNPACK; a delegate library named by PROGVLM_LITERT_DELEGATE (NXP's Neutron
delegate on an i.MX95: DEFAULT_DELEGATE) is loaded when present, and `info()` says which ran.
Full-integer models take and give int8: inputs are quantised and outputs dequantised here with
each tensor's own scale and zero point.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from progvlm import ASSETS

from .exported import TABLE_FILES, ExportedRuntime

FORMAT = "progvlm-edge-litert/1"
MODELS = ("vision", "mae_encoder")
REQUIRED_FILES = tuple(f"{m}.tflite" for m in MODELS) + TABLE_FILES
# the bundled model's int8 export, shipped (668 kB): `--model-dir assets/edge_litert_int8`;
# tests/test_shipped_export.py fails when it goes stale against assets/tiny_vlm and assets/mae
SHIPPED_INT8_EXPORT = ASSETS / "edge_litert_int8"
EXPORT_HINT = ("make one with `python -m edge_agent export --runtime litert [--int8] --out FOLDER` "
               "(the bundled model's int8 export ships in assets/edge_litert_int8)")
XNNPACK = "xnnpack"  # the interpreter's own CPU delegate, applied by default
DELEGATE_ENV = "PROGVLM_LITERT_DELEGATE"
DEFAULT_DELEGATE = "/usr/lib/libneutron_delegate.so"  # the i.MX95 BSP's path (NXP eIQ)


def delegate_path() -> str | None:
    """The delegate library to load: $PROGVLM_LITERT_DELEGATE, else the board's if present."""
    path = os.environ.get(DELEGATE_ENV)
    if path:
        return path
    return DEFAULT_DELEGATE if Path(DEFAULT_DELEGATE).is_file() else None


def _interpreter(path: Path, threads: int | None, delegate: str | None):
    from ai_edge_litert.interpreter import Interpreter, load_delegate
    delegates = [load_delegate(delegate)] if delegate else None
    interp = Interpreter(model_path=str(path), num_threads=threads or None,
                         experimental_delegates=delegates)
    interp.allocate_tensors()
    return interp


def _run(interp, x: np.ndarray) -> np.ndarray:
    """One input, one output, quantised at the edges when the model is full-integer."""
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    x = np.asarray(x, np.float32)
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    y = interp.get_tensor(out["index"])
    if out["dtype"] != np.float32:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return y


class LiteRTRuntime(ExportedRuntime):
    name = "litert"
    has_language = False

    format, required_files, export_hint = FORMAT, REQUIRED_FILES, EXPORT_HINT

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest)
        self.int8 = bool(manifest.get("int8"))
        # the record's `delegate`: the library loaded, else the interpreter's CPU default
        self.delegate = delegate_path() or XNNPACK
        self.default_threads = threads or os.cpu_count() or 1
        self.set_threads(self.default_threads)

    def set_threads(self, threads: int):
        library = None if self.delegate == XNNPACK else self.delegate
        self.interpreters = {m: _interpreter(self.folder / f"{m}.tflite", threads, library)
                             for m in MODELS}

    def info(self) -> dict:
        return {**super().info(), "runtime": self.name, "int8": self.int8,
                "delegate": self.delegate}

    def vision(self, pixels):
        return _run(self.interpreters["vision"], pixels)[0], None

    def latent(self, tokens) -> np.ndarray:
        return _run(self.interpreters["mae_encoder"], tokens)

    def language(self, tokens, question, grid=None, max_new_tokens=32):
        raise ValueError("the LiteRT export holds the edge half only (vision and MAE "
                                  "encoder): full-edge mode needs `--runtime onnx` or `pytorch`")
