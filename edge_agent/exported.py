"""What every exported edge runtime shares (ONNX Runtime, LiteRT): the export folder's manifest
and its checks, and the stages that are NumPy and Pillow only. No PyTorch, and no inference
engine, in this module's imports: each runtime's own module imports its engine.

A folder is checked against its manifest (every file present, every sha256 right, the same
vocabulary as this code) before anything runs: a board that runs a half-copied or stale export
would answer wrongly, not fail.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from progvlm.codec.tables import META_FILE, TABLES_FILE, MAEEncoderTables
from progvlm.images import model_input
from progvlm.toyworld.questions import VOCAB, check_question_length

from .runtime import EdgeRuntime

TABLE_FILES = (TABLES_FILE, META_FILE)
REQUIRED_KEYS = ("vlm_id", "mae_fingerprint", "image_size", "num_tokens", "num_layers",
                 "max_text_len", "vocab", "sha256")


class ExportError(ValueError):
    """An export folder that cannot be used; str(e) says what is wrong with it."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path, fmt: str, required_files: tuple[str, ...], hint: str) -> dict:
    """folder/manifest.json, checked to be a `fmt` manifest listing every required file."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not an export (no manifest.json); {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"corrupt export: {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ExportError(f"{path} is not a {fmt} manifest; {hint}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ExportError(f"incomplete manifest {path}: no {', '.join(missing)}")
    unlisted = [f for f in required_files if f not in manifest["sha256"]]
    if unlisted:
        raise ExportError(f"incomplete manifest {path}: no checksum for {', '.join(unlisted)}")
    if manifest["vocab"] != VOCAB:
        raise ExportError("the export's vocabulary differs from this progvlm's: re-export with "
                          "the progvlm version copied to the board")
    return manifest


def check_files(folder: Path, digests: dict):
    for name, digest in digests.items():
        f = folder / name
        if not f.is_file():
            raise ExportError(f"incomplete export: {name} is missing from {folder}")
        if sha256(f) != digest:
            raise ExportError(f"corrupt export: {name} does not match its sha256 in the manifest")


class ExportedRuntime(EdgeRuntime):
    """An EdgeRuntime read from an export folder: the manifest's facts, the MAE's coding tables
    (progvlm/codec/tables.py: code assignment and range coding in NumPy), and the bundled
    model's preprocessing, question check and domain check."""

    format: str  # the manifest's format this runtime reads
    required_files: tuple[str, ...]  # the files an export folder must hold
    export_hint: str  # how to make one

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None):
        """The runtime of an export folder, its manifest and every file's sha256 checked."""
        folder = Path(folder)
        manifest = read_manifest(folder, cls.format, cls.required_files, cls.export_hint)
        check_files(folder, manifest["sha256"])
        return cls(folder, manifest, threads)

    def __init__(self, folder: Path, manifest: dict):
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
