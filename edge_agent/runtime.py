"""The device's compute behind one small interface, in two runtimes.

    PyTorchRuntime  the library's own modules: the reference, for development on a host
    OnnxRuntime     exported ONNX graphs plus the NumPy MAE coder (edge_agent/onnx_runtime.py):
                    what an aarch64 i.MX95 board runs, without PyTorch installed

Stages, each timed by the agent where it calls them:
    preprocess  image → model input (NumPy; the same code in both runtimes)
    vision      model input → visual tokens (N, D) float32
    mae_encode  visual tokens → bitstream with layers 1..k
    language    visual tokens + question → answer text (full-edge: the whole VLM on the device)

Nothing at module level imports torch: a board without PyTorch imports this file too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from progvlm.images import model_input


class EdgeRuntime(ABC):
    name: str  # "pytorch" or "onnxruntime"
    model_id: str  # the VLM the visual tokens belong to
    mae_fingerprint: bytes
    num_layers: int  # L
    num_tokens: int  # N
    image_size: int

    @abstractmethod
    def set_threads(self, threads: int):
        """Intra-op threads for the compute (a device profile sets this)."""

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return model_input(image, self.image_size)

    @abstractmethod
    def vision(self, pixels: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) float32 → visual tokens (N, D) float32."""

    @abstractmethod
    def mae_encode(self, tokens: np.ndarray, k: int) -> bytes:
        """Visual tokens → bitstream with layers 1..k."""

    @abstractmethod
    def language(self, tokens: np.ndarray, question: str, max_new_tokens: int = 32) -> str:
        """Visual tokens + question → answer (the language half, run on the device)."""


class PyTorchRuntime(EdgeRuntime):
    name = "pytorch"

    def __init__(self, backend, mae):
        import torch  # this runtime needs it; the module does not
        self.default_threads = torch.get_num_threads()
        mae.check_belongs_to(backend)
        self.backend, self.mae = backend, mae
        self.model_id = backend.model_id
        self.mae_fingerprint = mae.fingerprint()
        self.num_layers = mae.cfg.num_layers
        self.num_tokens = mae.cfg.num_tokens
        self.image_size = backend.cfg.image_size

    def set_threads(self, threads):
        import torch
        torch.set_num_threads(threads)

    @classmethod
    def bundled(cls, vlm_folder: str | Path | None = None, mae_folder: str | Path | None = None):
        from progvlm.backends.tiny import DEFAULT_WEIGHTS, TinyVLMBackend
        from progvlm.models.mae import DEFAULT_MAE, load_mae
        return cls(TinyVLMBackend.load(vlm_folder or DEFAULT_WEIGHTS), load_mae(mae_folder or DEFAULT_MAE))

    def vision(self, pixels):
        import torch
        with torch.inference_mode():
            return self.backend.model.visual_tokens(torch.from_numpy(pixels))[0].numpy()

    def mae_encode(self, tokens, k):
        import torch
        return self.mae.compress(torch.from_numpy(np.asarray(tokens, np.float32)), k)

    def language(self, tokens, question, max_new_tokens=32):
        import torch
        return self.backend.cloud_half(torch.from_numpy(np.asarray(tokens, np.float32)),
                                       question, max_new_tokens).text
