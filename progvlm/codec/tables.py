"""The MAE's coding tables in NumPy: latent ⇄ per-layer payloads, the one place where the
code-assignment rule and the range coding live.

What a board needs besides the ONNX encoder (tokens → latent): the residual codebooks, each
code's cost in bits times λ (the entropy-constrained assignment), the per-stage code
frequencies (the range coder's model) and the MAE's fingerprint, all from the quantiser's
public `coding_tables()` (progvlm/models/quantisers.py). `MAE.compress` (PyTorch host), the ONNX
edge and the cloud's `MAE.decompress` all go through this class, so their payloads are
byte-identical for the same latent. Framing (header, checksums) is not done here: the edge packs
the payloads once (progvlm/codec/bitstream.py through `Split.pack`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from . import entropy

TABLES_FILE, META_FILE = "mae_tables.safetensors", "mae_tables.json"


class MAEEncoderTables:
    def __init__(self, codebooks: np.ndarray, bit_cost: np.ndarray, usage: np.ndarray,
                 fingerprint: bytes, num_tokens: int):
        self.codebooks = np.ascontiguousarray(codebooks, np.float32)  # (L, K, d)
        self.codebook_sq = (self.codebooks ** 2).sum(-1)  # (L, K)
        # −2·codebookᵀ per stage (L, d, K): r @ (−2cᵀ) is exactly −(2r @ cᵀ) (scaling by a power
        # of two rounds nowhere), so the cost below is today's, bit for bit, one op shorter
        self.neg2_codebooks_t = np.ascontiguousarray(-2.0 * self.codebooks.transpose(0, 2, 1))
        self.bit_cost = np.ascontiguousarray(bit_cost, np.float32)  # (L, K)
        self.usage = np.asarray(usage, np.float64)  # (L, K)
        self.fingerprint = bytes(fingerprint)
        self.num_tokens = int(num_tokens)
        self.num_layers = len(self.codebooks)
        self.stage_models = [entropy.StageModel(u) for u in self.usage]  # the range coder's model

    @classmethod
    def from_mae(cls, mae) -> "MAEEncoderTables":
        """The tables of a PyTorch MAE: its quantiser's coding_tables() (the bit costs are the
        float32 values the quantiser's own assignment adds), its fingerprint and block size."""
        return cls(**mae.quantiser.coding_tables(), fingerprint=mae.fingerprint(),
                   num_tokens=mae.cfg.num_tokens)

    def save(self, folder: str | Path):
        folder = Path(folder)
        save_file({"codebooks": self.codebooks, "bit_cost": self.bit_cost, "usage": self.usage},
                  str(folder / TABLES_FILE))
        (folder / META_FILE).write_text(json.dumps({"fingerprint": self.fingerprint.hex(),
                                                    "num_tokens": self.num_tokens}))

    @classmethod
    def load(cls, folder: str | Path) -> "MAEEncoderTables":
        folder = Path(folder)
        t = load_file(str(folder / TABLES_FILE))
        meta = json.loads((folder / META_FILE).read_text())
        return cls(t["codebooks"], t["bit_cost"], t["usage"], bytes.fromhex(meta["fingerprint"]),
                   meta["num_tokens"])

    def indices(self, latent: np.ndarray, k: int | None = None) -> np.ndarray:
        """latent (N, d) → code indices (k, N) of stages 1..k (default L): argmin distortion +
        λ·bits, stage by stage. |r|² is left out of the distortion: it is the same for every
        code of a token. The cost is |c|² − 2r·c + λ·bits, summed in that order (in place, to
        spare the allocations: per-op overhead is most of the cost at these sizes)."""
        k = self.num_layers if k is None else k
        residual = np.asarray(latent, np.float32)
        out = np.empty((k, len(residual)), np.intp)
        for layer in range(k):
            cost = residual @ self.neg2_codebooks_t[layer]
            cost += self.codebook_sq[layer]
            cost += self.bit_cost[layer]
            cost.argmin(1, out=out[layer])
            if layer + 1 < k:  # the last stage's residual is never used
                residual = residual - self.codebooks[layer][out[layer]]
        return out

    def encode_layers(self, latent: np.ndarray, k: int) -> list[bytes]:
        """latent (M, d), M a multiple of the block size N → the payloads of layers 1..k.
        Only the k stages sent are assigned and coded."""
        integer = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
        if not integer or not 1 <= k <= self.num_layers:
            raise ValueError(f"k must be an integer in 1..{self.num_layers}, got {k!r}")
        d = self.codebooks.shape[2]
        if latent.ndim != 2 or latent.shape[1] != d or latent.shape[0] % self.num_tokens \
                or not latent.shape[0]:
            raise ValueError(f"expected a latent of shape (a multiple of {self.num_tokens}, {d}), "
                             f"got {tuple(latent.shape)}")
        idx = self.indices(latent, k)
        return [self.stage_models[l].encode(idx[l]) for l in range(k)]

    def decode_indices(self, layers: list[bytes], count: int) -> np.ndarray:
        """Payloads of layers 1..k → code indices (k, count); EntropyDecodeError if corrupt."""
        return np.stack([self.stage_models[l].decode(p, count) for l, p in enumerate(layers)])
