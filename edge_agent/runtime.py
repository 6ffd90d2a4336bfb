"""The device's compute behind one small interface, in two runtimes.

    PyTorchRuntime  the library's own modules: the reference, for development on a host
    OnnxRuntime     exported ONNX graphs plus the NumPy MAE coder (edge_agent/onnx_runtime.py):
                    what an aarch64 i.MX95 board runs, without PyTorch installed

Stages, each timed by the agent where it calls them. They start from a camera frame
(progvlm.images.raw_frame: pixels, as a camera delivers them); decoding an image FILE
(progvlm.images.load_image) is host work before the device's stages, timed apart from them.
    preprocess  image → model input (the backend's own: the processor for transformers VLMs)
    vision      model input → visual tokens (N, D) and the layout the cloud needs (grid)
    mae_encode  visual tokens → payloads of layers 1..k (only the k stages sent are assigned
                and coded; the encoder runs with the token standardisation folded in)
    language    visual tokens + question → answer text (full-edge: the VLM on the device)
and, for every runtime alike, `pack`: layers → the wire form (progvlm/codec/bitstream.py), keeping
what packing knew (where the header and each layer end) so that nobody parses it again.

Nothing at module level imports torch: a board without PyTorch imports this file too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image

from progvlm.codec import bitstream
from progvlm.codec.tables import MAEEncoderTables


class EdgeRuntime(ABC):
    name: str  # "pytorch" or "onnxruntime"
    model_id: str  # the VLM the visual tokens belong to
    mae_fingerprint: bytes
    num_layers: int  # L
    tokens_per_block: int  # N of one image or tile
    image_size: int  # the side of the frame the model sees (full-cloud's JPEG)
    has_language = True  # False: the edge half only (no full-edge mode)
    delegate: str | None = None  # the accelerator delegate that ran, where the runtime has one

    @abstractmethod
    def set_threads(self, threads: int):
        """Intra-op threads for the compute (a device profile sets this)."""

    @abstractmethod
    def preprocess(self, image: Image.Image):
        """RGB camera frame (progvlm.images.raw_frame or a decoded file) → the model's input."""

    @abstractmethod
    def vision(self, model_input):
        """Model input → (visual tokens (N, D), grid or None)."""

    codec: "MAEEncoderTables"  # the MAE's coding tables (NumPy): assignment and range coding

    @abstractmethod
    def latent(self, tokens) -> np.ndarray:
        """Visual tokens (M, D) → the MAE encoder's latent (M, d), what the layers code (a
        stream's frames are coded from it against the cloud's reference: edge_agent/watch.py)."""

    def mae_encode(self, tokens, k: int) -> list[bytes]:
        """Visual tokens → payloads of layers 1..k."""
        return self.codec.encode_layers(self.latent(tokens), k)

    @abstractmethod
    def language(self, tokens, question: str, grid=None, max_new_tokens: int = 32) -> str:
        """Visual tokens + question → answer (the language half, run on the device)."""

    def check_question(self, question: str):
        """Raise ValueError (saying the limit) for a question the model cannot read, before any
        work is done; by default every question is accepted."""

    def domain_note(self, image: Image.Image) -> str | None:
        """A warning when the frame is outside what the model knows (None: no warning)."""
        return None

    def info(self) -> dict:
        return {"vlm_id": self.model_id, "mae_fingerprint": self.mae_fingerprint.hex(),
                "num_layers": self.num_layers, "tokens_per_block": self.tokens_per_block}

    def pack(self, layers: list[bytes], num_tokens: int, grid=None) -> bitstream.Packed:
        """Layers 1..k in the wire form (progvlm/codec/bitstream.py: versioned, checksummed),
        with where each part ends."""
        return bitstream.pack_stream(self.mae_fingerprint, num_tokens, self.num_layers, layers, grid)

    def frame_bytes(self, layers: list[bytes], num_tokens: int, grid=None) -> bytes:
        """The wire form of layers 1..k (`pack`'s bytes)."""
        return self.pack(layers, num_tokens, grid).data

    def stream_sizes(self, layers: list[bytes], num_tokens: int, grid=None) -> list[int]:
        """The bytes a request for k = 1..len(layers) layers sends (each stream its own header)."""
        return [len(self.frame_bytes(layers[:k], num_tokens, grid)) for k in range(1, len(layers) + 1)]

    def read(self, data: bytes) -> bitstream.Bitstream:
        """A stream this device packed before (a conversation's), read back once."""
        return bitstream.parse(data, expected_fingerprint=self.mae_fingerprint)


class PyTorchRuntime(EdgeRuntime):
    """The edge half of a progvlm.split.Split: any VLM backend with its MAE."""
    name = "pytorch"

    def __init__(self, split):
        import torch  # this runtime needs it; the module does not
        self.default_threads = torch.get_num_threads()
        self.split = split
        self.model_id = split.vlm.model_id
        self.mae_fingerprint = split.fingerprint
        self.num_layers = split.num_layers
        self.tokens_per_block = split.vlm.tokens_per_block
        self.image_size = split.vlm.input_size

    @classmethod
    def load(cls, vlm=None, mae=None) -> "PyTorchRuntime":
        from progvlm.split import load_split
        return cls(load_split(vlm, mae))

    def info(self) -> dict:
        return self.split.info()

    def check_question(self, question):
        check = getattr(self.split.vlm, "check_question", None)  # the backend's own, if any
        if check is not None:
            check(question)

    def set_threads(self, threads):
        import torch
        torch.set_num_threads(threads)

    def preprocess(self, image):
        return self.split.vlm.preprocess(image)

    def vision(self, model_input):
        return self.split.vlm.vision(model_input)

    @property
    def codec(self) -> MAEEncoderTables:
        return self.split.mae.edge_codec()

    def latent(self, tokens):
        return self.split.mae._latent(_tensor(tokens))

    def mae_encode(self, tokens, k):
        return self.split.mae.compress(_tensor(tokens), k)

    def language(self, tokens, question, grid=None, max_new_tokens=32):
        return self.split.vlm.cloud_half(_tensor(tokens), question, max_new_tokens, grid=grid).text

    def domain_note(self, image):
        return self.split.vlm.domain_note(image)


def _tensor(tokens):
    """Visual tokens from either runtime (NumPy from ONNX Runtime, tensors from PyTorch)."""
    import torch
    return tokens if torch.is_tensor(tokens) else torch.from_numpy(np.asarray(tokens, np.float32))
