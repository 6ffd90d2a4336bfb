"""The edge runtime on ONNX Runtime and NumPy: no PyTorch anywhere in its imports.

Loads a folder made by `python -m edge_agent export` (checked against its manifest first:
edge_agent/exported.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from progvlm.toyworld.questions import EOS, WORD_TO_ID, decode_ids, encode_words, question_ids

from .exported import TABLE_FILES, ExportedRuntime, ExportError  # noqa: F401 - ExportError: the board's import

FORMAT = "progvlm-edge-onnx/1"
MODELS = ("vision", "mae_encoder", "language")
REQUIRED_FILES = tuple(f"{m}.onnx" for m in MODELS) + TABLE_FILES
EXPORT_HINT = "make one with `python -m edge_agent export --out FOLDER`"


class OnnxRuntime(ExportedRuntime):
    name = "onnxruntime"

    format, required_files, export_hint = FORMAT, REQUIRED_FILES, EXPORT_HINT

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest)
        self.default_threads = threads or 0  # 0: ONNX Runtime's own choice
        self.set_threads(self.default_threads)

    def set_threads(self, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.sessions = {m: ort.InferenceSession(str(self.folder / f"{m}.onnx"), options,
                                                 providers=["CPUExecutionProvider"])
                         for m in MODELS}

    def vision(self, pixels):
        return self.sessions["vision"].run(None, {"pixels": np.asarray(pixels, np.float32)})[0][0], None

    def latent(self, tokens):
        return self.sessions["mae_encoder"].run(None, {"tokens": np.asarray(tokens, np.float32)})[0]

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
