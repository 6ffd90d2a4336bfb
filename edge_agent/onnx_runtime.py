"""The edge runtime on ONNX Runtime and NumPy: no PyTorch anywhere in its imports.

Loads a folder made by `python -m edge_agent export` and checks it against its manifest
(every file present, every sha256 right) before running anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from progvlm.edge_codec import MAEEncoderTables
from progvlm.questions import BOS, EOS, SEP, decode_ids, encode_words

from .runtime import EdgeRuntime


class ExportError(ValueError):
    """An export folder that cannot be used; str(e) says what is wrong with it."""


class OnnxRuntime(EdgeRuntime):
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        self.folder, self.manifest = folder, manifest
        self.model_id = manifest["vlm_id"]
        self.mae_fingerprint = bytes.fromhex(manifest["mae_fingerprint"])
        self.num_layers = manifest["num_layers"]
        self.num_tokens = manifest["num_tokens"]
        self.image_size = manifest["image_size"]
        self.vocab = manifest["vocab"]
        self.codec = MAEEncoderTables.load(folder)
        self.default_threads = threads or 0  # 0: ONNX Runtime's own choice
        self.set_threads(self.default_threads)

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> "OnnxRuntime":
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise ExportError(f"{folder} is not an ONNX export (no manifest.json); make one with "
                              "`python -m edge_agent export --out FOLDER`")
        manifest = json.loads(path.read_text())
        for name, digest in manifest["sha256"].items():
            f = folder / name
            if not f.is_file():
                raise ExportError(f"incomplete export: {name} is missing from {folder}")
            if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                raise ExportError(f"corrupt export: {name} does not match its sha256 in the manifest")
        return cls(folder, manifest, threads)

    def set_threads(self, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {name: ort.InferenceSession(str(self.folder / f"{name}.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
                         for name in ("vision", "mae_encoder", "language")}

    def vision(self, pixels):
        return self.sessions["vision"].run(None, {"pixels": np.asarray(pixels, np.float32)})[0][0]

    def mae_encode(self, tokens, k):
        latent = self.sessions["mae_encoder"].run(None, {"tokens": np.asarray(tokens, np.float32)})[0]
        return self.codec.compress(latent, k)

    def language(self, tokens, question, max_new_tokens=32):
        word_to_id = {w: i for i, w in enumerate(self.vocab)}
        ids = [word_to_id[BOS]] + encode_words(question) + [word_to_id[SEP]]
        limit = self.manifest["max_text_len"]
        if len(ids) >= limit:
            raise ValueError(f"question too long: {len(ids) - 2} words, this model reads at most {limit - 3}")
        batch = np.asarray(tokens, np.float32)[None]
        answer = []
        for _ in range(min(max_new_tokens, limit - len(ids))):
            logits = self.sessions["language"].run(None, {"tokens": batch, "ids": np.asarray([ids], np.int64)})[0]
            nxt = int(logits[0].argmax())
            if nxt == word_to_id[EOS]:
                break
            answer.append(nxt)
            ids.append(nxt)
        return decode_ids(answer)
