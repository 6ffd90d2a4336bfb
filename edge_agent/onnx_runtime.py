"""The edge runtime on ONNX Runtime and NumPy: no PyTorch anywhere in its imports.

Loads a folder made by `python -m edge_agent export` and checks it against its manifest
(every file present, every sha256 right, the same vocabulary as this code) before running
anything: a board that runs a half-copied or stale export would answer wrongly, not fail.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from progvlm.codec.tables import META_FILE, TABLES_FILE, MAEEncoderTables
from progvlm.images import model_input
from progvlm.toyworld.questions import (EOS, VOCAB, WORD_TO_ID, check_question_length, decode_ids, encode_words,
                                       question_ids)

from .runtime import EdgeRuntime

FORMAT = "progvlm-edge-onnx/1"
MODELS = ("vision", "mae_encoder", "language")
REQUIRED_FILES = tuple(f"{m}.onnx" for m in MODELS) + (TABLES_FILE, META_FILE)
REQUIRED_KEYS = ("vlm_id", "mae_fingerprint", "image_size", "num_tokens", "num_layers",
                 "max_text_len", "vocab", "sha256")
EXPORT_HINT = "make one with `python -m edge_agent export --out FOLDER`"


class ExportError(ValueError):
    """An export folder that cannot be used; str(e) says what is wrong with it."""


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not an ONNX export (no manifest.json); {EXPORT_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"corrupt export: {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a {FORMAT} manifest; {EXPORT_HINT}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ExportError(f"incomplete manifest {path}: no {', '.join(missing)}")
    unlisted = [f for f in REQUIRED_FILES if f not in manifest["sha256"]]
    if unlisted:
        raise ExportError(f"incomplete manifest {path}: no checksum for {', '.join(unlisted)}")
    if manifest["vocab"] != VOCAB:
        raise ExportError("the export's vocabulary differs from this progvlm's: re-export with "
                          "the progvlm version copied to the board")
    return manifest


def _check_files(folder: Path, sha256: dict):
    for name, digest in sha256.items():
        f = folder / name
        if not f.is_file():
            raise ExportError(f"incomplete export: {name} is missing from {folder}")
        if hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise ExportError(f"corrupt export: {name} does not match its sha256 in the manifest")


class OnnxRuntime(EdgeRuntime):
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        self.folder, self.manifest = folder, manifest
        self.model_id = manifest["vlm_id"]
        self.mae_fingerprint = bytes.fromhex(manifest["mae_fingerprint"])
        self.num_layers = manifest["num_layers"]
        self.tokens_per_block = manifest["num_tokens"]
        self.image_size = manifest["image_size"]
        self.max_text_len = manifest["max_text_len"]
        self.codec = MAEEncoderTables.load(folder)
        if self.codec.fingerprint != self.mae_fingerprint:
            raise ExportError(f"corrupt export: the coding tables are for MAE "
                              f"{self.codec.fingerprint.hex()}, the manifest names "
                              f"{self.mae_fingerprint.hex()}")
        self.default_threads = threads or 0  # 0: ONNX Runtime's own choice
        self.set_threads(self.default_threads)

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> "OnnxRuntime":
        folder = Path(folder)
        manifest = _read_manifest(folder)
        _check_files(folder, manifest["sha256"])
        return cls(folder, manifest, threads)

    def set_threads(self, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {m: ort.InferenceSession(str(self.folder / f"{m}.onnx"), options,
                                                 providers=["CPUExecutionProvider"])
                         for m in MODELS}

    def preprocess(self, image):
        return model_input(image, self.image_size)

    def check_question(self, question):
        """The exported language graph reads <bos> question <sep> and the answer in
        max_text_len positions (the manifest's)."""
        check_question_length(question, self.max_text_len)

    def domain_note(self, image):
        """The bundled model's check that a frame looks like its scenes (NumPy and Pillow)."""
        from progvlm.toyworld.domain import check_scene_domain
        check = check_scene_domain(image)
        return None if check.in_domain else check.reason

    def vision(self, pixels):
        return self.sessions["vision"].run(None, {"pixels": np.asarray(pixels, np.float32)})[0][0], None

    def mae_encode(self, tokens, k):
        latent = self.sessions["mae_encoder"].run(None, {"tokens": np.asarray(tokens, np.float32)})[0]
        return self.codec.encode_layers(latent, k)

    def language(self, tokens, question, grid=None, max_new_tokens=32):
        """Greedy decoding as TinyVLM.generate does it, re-running the whole prompt per token
        (no KV cache in the graph: answers are a few words, the prompt under 32 ids)."""
        self.check_question(question)
        ids = question_ids(encode_words(question))
        batch = np.asarray(tokens, np.float32)[None]
        answer = []
        for _ in range(min(max_new_tokens, self.max_text_len - len(ids))):
            logits = self.sessions["language"].run(None, {"tokens": batch,
                                                          "ids": np.asarray([ids], np.int64)})[0]
            nxt = int(logits[0].argmax())
            if nxt == WORD_TO_ID[EOS]:
                break
            answer.append(nxt)
            ids.append(nxt)
        return decode_ids(answer)
