"""Entropy coding of code indices with a static per-stage model (constriction's range coder).

Each MAE stage has a fixed probability table learned from training data (its code usage,
stored with the MAE weights), so a stage whose codes are predictable costs far fewer bits than
N·log2(K). The coder emits 32-bit words; they travel big-endian with trailing zero bytes
dropped (the decoder pads them back), so a layer costs whole bytes, not whole words.
"""
from __future__ import annotations

import constriction
import numpy as np

# constriction exposes its coders as attributes of a compiled module, not as importable submodules
Categorical = constriction.stream.model.Categorical
RangeDecoder = constriction.stream.queue.RangeDecoder
RangeEncoder = constriction.stream.queue.RangeEncoder


class EntropyDecodeError(ValueError):
    pass


class StageModel:
    """The probability model of one stage: probabilities (K,) ≥ 0, normalised internally."""

    def __init__(self, probabilities):
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or len(p) < 2 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError("a stage model needs ≥ 2 finite, non-negative probabilities")
        self.num_symbols = len(p)
        self._model = Categorical(p / p.sum(), perfect=False)

    def encode(self, symbols) -> bytes:
        symbols = np.asarray(symbols, dtype=np.int32)
        if symbols.size and (symbols.min() < 0 or symbols.max() >= self.num_symbols):
            raise ValueError(f"symbols must lie in 0..{self.num_symbols - 1}")
        coder = RangeEncoder()
        if symbols.size:
            coder.encode(symbols, self._model)
        return coder.get_compressed().astype(">u4").tobytes().rstrip(b"\x00")

    def decode(self, data: bytes, count: int) -> np.ndarray:
        data = bytes(data) + b"\x00" * (-len(data) % 4)
        words = np.frombuffer(data, dtype=">u4").astype(np.uint32)
        try:
            out = RangeDecoder(words).decode(self._model, count) if count else np.zeros(0, np.int32)
        except BaseException as e:  # the Rust side reports corrupt input as various errors
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise EntropyDecodeError(f"range decoder failed: {e}") from None
        return np.asarray(out, dtype=np.int64)


def encode_sequence(parts: list[tuple[np.ndarray, StageModel]]) -> bytes:
    """Several symbol arrays, each under its own model, as ONE range-coded message (no length
    between them: the decoder knows each part's count), in StageModel.encode's byte form."""
    coder = RangeEncoder()
    for symbols, model in parts:
        symbols = np.asarray(symbols, dtype=np.int32)
        if symbols.size and (symbols.min() < 0 or symbols.max() >= model.num_symbols):
            raise ValueError(f"symbols must lie in 0..{model.num_symbols - 1}")
        if symbols.size:
            coder.encode(symbols, model._model)
    return coder.get_compressed().astype(">u4").tobytes().rstrip(b"\x00")


def decode_sequence(data: bytes, parts: list[tuple[StageModel, int]]) -> list[np.ndarray]:
    """encode_sequence's inverse: (model, count) per part → the symbol arrays."""
    data = bytes(data) + b"\x00" * (-len(data) % 4)
    decoder = RangeDecoder(np.frombuffer(data, dtype=">u4").astype(np.uint32))
    out = []
    try:
        for model, count in parts:
            out.append(np.asarray(decoder.decode(model._model, count), dtype=np.int64)
                       if count else np.zeros(0, np.int64))
    except BaseException as e:  # the Rust side reports corrupt input as various errors
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise EntropyDecodeError(f"range decoder failed: {e}") from None
    return out
