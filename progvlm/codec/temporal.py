"""Temporal coding of a stream's layers: frame t coded against what the cloud holds of frame t−1.

A camera's consecutive frames share almost every visual token. The cloud keeps, per stream, the
code indices it decoded last (`Reference`: the indices of every token and how many layers of it
it has, its depth). The edge mirrors that reference and codes each new frame as either

    a key frame    the intra bitstream of progvlm/codec/bitstream.py, unchanged (its header names
                   the MAE and N); the reference becomes its codes
    a delta frame  per token, "unchanged" or new codes for layers 1..k, in this form:

        byte 0      DELTA | k            (SAME set too, and nothing after it: every token unchanged)
        m           varint: tokens changed
        lengths     varint × (k − 1): the byte length of sections 1..k−1 (the last runs to the CRC)
        section 1   range-coded: the M change flags (p = m / M, known to both sides from m), then
                    the layer-1 codes of the m changed tokens (the MAE's stage-1 model)
        section l   the layer-l codes of the changed tokens (stage l's model), l = 2..k
        CRC-16      of everything before it

A static scene under sensor noise costs one byte per frame; a moving object costs the flags and
the codes of the few tokens it crosses. The decoder is told k as for an intra frame; a token's
latent is the sum of its first min(k, depth) codes.

Which tokens count as unchanged is the encoder's choice (`TemporalCoder.code`), rate–distortion
style as the MAE's own code assignment: a token keeps the reference's codes when their
distortion to the new latent is at most that of fresh codes plus what those would cost
(λ·bits, the stage tables' bit_cost) times `reuse_bias`. Every decision is on the MAE's latent,
so any VLM whose MAE codes it is covered, and the edge needs only the NumPy coding tables.

A delta frame names no reference: it is valid only against the reference the cloud holds for
this stream, which the cloud acknowledges frame by frame (progvlm/serve/watch.py). Anything
else (no reference, another N or grid) is a resync: the cloud refuses the delta and the edge
sends a key frame.
"""
from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass

import numpy as np

from . import bitstream, entropy
from .bitstream import BitstreamError
from .tables import MAEEncoderTables

DELTA = 0x80  # bit 7 of byte 0: a delta frame (an intra stream starts with "P", 0x50)
SAME = 0x40  # bit 6: every token unchanged; the frame is this one byte
_K_MASK = 0x0F
KEY_EVERY = 64  # a key frame at least this often (frames) by default, whatever else happens
REUSE_BIAS = 1.0  # the rate–distortion break-even (see TemporalCoder)
_CRC = struct.Struct(">H")
KEY, DELTA_KIND = "key", "delta"


def is_delta(data: bytes) -> bool:
    """Whether `data` is a delta frame (else it should be an intra stream, a key frame)."""
    return bool(data) and bool(data[0] & DELTA)


def unchanged_k(data: bytes) -> int | None:
    """k of a one-byte delta frame (every token unchanged), None for any other frame."""
    return data[0] & _K_MASK if len(data) == 1 and data[0] & DELTA and data[0] & SAME else None


@dataclass
class Reference:
    """What the cloud holds of a stream after a frame: code indices (L, M) of M tokens (rows at
    or past a token's depth are unused) and each token's depth (layers known, 1..L)."""
    indices: np.ndarray  # (L, M) int64
    depth: np.ndarray  # (M,) int64
    grid: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[1]

    @classmethod
    def from_key(cls, indices: np.ndarray, num_layers: int, grid=None) -> "Reference":
        """The reference a key frame of codes (k, M) leaves."""
        k, m = indices.shape
        full = np.zeros((num_layers, m), np.int64)
        full[:k] = indices
        return cls(full, np.full(m, k, np.int64), None if grid is None else tuple(grid))

    def latent(self, tables: MAEEncoderTables, k: int) -> np.ndarray:
        """(M, d): each token's sum of its first min(k, depth) codes."""
        out = np.zeros((self.num_tokens, tables.codebooks.shape[2]), np.float32)
        for layer in range(k):
            known = self.depth > layer
            out[known] += tables.codebooks[layer][self.indices[layer, known]]
        return out

    def updated(self, changed: np.ndarray, codes: np.ndarray) -> "Reference":
        """The reference after a delta: changed tokens get codes (j, m), depth j."""
        indices, depth = self.indices.copy(), self.depth.copy()
        j = codes.shape[0]
        indices[:j, changed] = codes
        depth[changed] = j
        return Reference(indices, depth, self.grid)


@dataclass
class Delta:
    """A decoded delta frame: k, which tokens changed, and their codes (j ≤ k layers, m)."""
    k: int
    changed: np.ndarray  # (M,) bool
    codes: np.ndarray  # (j, m) int64

    @property
    def layers(self) -> int:
        return self.codes.shape[0]


def _flag_model(m: int, total: int) -> entropy.StageModel:
    return entropy.StageModel([total - m + 0.5, m + 0.5])


def encode_delta(tables: MAEEncoderTables, k: int, changed: np.ndarray, codes: np.ndarray) -> bytes:
    """A delta frame's bytes (see the module's docstring): codes (k, m) of the changed tokens."""
    if not 1 <= k <= tables.num_layers:
        raise ValueError(f"k must be in 1..{tables.num_layers}, got {k}")
    m = int(changed.sum())
    if m == 0:
        return bytes([DELTA | SAME | k])
    sections = [entropy.encode_sequence([(changed.astype(np.int32), _flag_model(m, changed.size)),
                                         (codes[0], tables.stage_models[0])])]
    sections += [tables.stage_models[l].encode(codes[l]) for l in range(1, k)]
    body = bytes([DELTA | k]) + bitstream.write_varint(m)
    body += b"".join(bitstream.write_varint(len(s)) for s in sections[:-1]) + b"".join(sections)
    return body + _CRC.pack(binascii.crc_hqx(body, 0xFFFF))


def decode_delta(data: bytes, tables: MAEEncoderTables, num_tokens: int) -> Delta:
    """A delta frame's bytes → Delta for a reference of `num_tokens` tokens; BitstreamError for
    anything malformed (bad k, checksum, lengths, range-coder data)."""
    data = bytes(data)
    if not is_delta(data):
        raise BitstreamError("not a delta frame")
    k = data[0] & _K_MASK
    if not 1 <= k <= tables.num_layers:
        raise BitstreamError(f"delta frame of k={k}; this MAE has L={tables.num_layers}")
    if data[0] & SAME:
        if len(data) != 1:
            raise BitstreamError(f"a delta frame marked unchanged has {len(data) - 1} bytes more")
        return Delta(k, np.zeros(num_tokens, bool), np.zeros((k, 0), np.int64))
    if len(data) < 1 + 1 + _CRC.size:
        raise BitstreamError("truncated delta frame")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if crc != binascii.crc_hqx(body, 0xFFFF):
        raise BitstreamError("corrupt delta frame: checksum mismatch")
    m, pos = bitstream.read_varint(body, 1)
    if not 1 <= m <= num_tokens:
        raise BitstreamError(f"delta frame changes {m} tokens of {num_tokens}")
    lengths = []
    for _ in range(k - 1):
        n, pos = bitstream.read_varint(body, pos)
        lengths.append(n)
    last = len(body) - pos - sum(lengths)
    if last < 0:
        raise BitstreamError("corrupt delta frame: section lengths run past its end")
    sections, start = [], pos
    for n in lengths + [last]:
        sections.append(body[start:start + n])
        start += n
    try:
        flags, first = entropy.decode_sequence(sections[0], [(_flag_model(m, num_tokens), num_tokens),
                                                             (tables.stage_models[0], m)])
        codes = [first] + [tables.stage_models[l].decode(sections[l], m) for l in range(1, k)]
    except entropy.EntropyDecodeError as e:
        raise BitstreamError(f"corrupt delta frame: {e}") from None
    changed = flags.astype(bool)
    if int(changed.sum()) != m:
        raise BitstreamError(f"corrupt delta frame: {int(changed.sum())} flags set, {m} announced")
    return Delta(k, changed, np.stack(codes))


@dataclass
class Coded:
    """One frame as the edge codes it: its wire bytes, key or delta, the reference it leaves
    once the cloud has it, and how many tokens it sends codes for."""
    data: bytes
    kind: str  # KEY or DELTA_KIND
    reference: Reference
    changed: int
    reason: str = ""  # why a key frame: "first", "period", "scene change", "resync", "shape"


class TemporalCoder:
    """The edge's half: latent (M, d) → key or delta frame against the reference the cloud
    holds. `key_every`: a key frame at least every this many frames (0: never by period);
    `reuse_bias` scales how much a token's fresh codes must gain before it is resent (1: the
    rate–distortion break-even; larger reuses more)."""

    def __init__(self, tables: MAEEncoderTables, key_every: int = KEY_EVERY,
                 reuse_bias: float = REUSE_BIAS):
        if key_every < 0 or not reuse_bias >= 0:
            raise ValueError("key_every ≥ 0 and reuse_bias ≥ 0 required")
        self.tables, self.key_every, self.reuse_bias = tables, key_every, reuse_bias

    def _cumulative(self, indices: np.ndarray) -> np.ndarray:
        """Codes (k, M) → the latent they decode to (M, d)."""
        out = np.zeros((indices.shape[1], self.tables.codebooks.shape[2]), np.float32)
        for layer, idx in enumerate(indices):
            out += self.tables.codebooks[layer][idx]
        return out

    def key(self, latent: np.ndarray, k: int, grid=None, reason: str = "first",
            indices: np.ndarray | None = None) -> Coded:
        t = self.tables
        idx = t.indices(latent, k) if indices is None else indices
        layers = [t.stage_models[l].encode(idx[l]) for l in range(k)]
        data = bitstream.pack(t.fingerprint, len(latent), t.num_layers, layers, grid)
        return Coded(data, KEY, Reference.from_key(idx, t.num_layers, grid), len(latent), reason)

    def code(self, latent: np.ndarray, k: int, reference: Reference | None, grid=None,
             since_key: int = 0) -> Coded:
        """Frame `latent` at k layers against `reference` (None: the cloud holds nothing).
        `since_key`: frames sent since the last key frame (for the period). The delta goes
        unless its key frame is no larger ("scene change"); that key frame is encoded only
        when the delta is not shorter than any key frame could be (bitstream.min_stream_bytes)."""
        latent = np.asarray(latent, np.float32)
        grid = None if grid is None else tuple(grid)
        if reference is None:
            return self.key(latent, k, grid, "first")
        if reference.num_tokens != len(latent) or reference.grid != grid:
            return self.key(latent, k, grid, "shape")
        if self.key_every and since_key + 1 >= self.key_every:
            return self.key(latent, k, grid, "period")
        t = self.tables
        fresh = t.indices(latent, k)
        d_fresh = ((latent - self._cumulative(fresh)) ** 2).sum(1)
        d_held = ((latent - reference.latent(t, k)) ** 2).sum(1)
        cost = sum(t.bit_cost[l][fresh[l]] for l in range(k))
        changed = d_held > d_fresh + self.reuse_bias * cost
        data = encode_delta(t, k, changed, fresh[:, changed])
        if len(data) >= bitstream.min_stream_bytes(len(latent), k, grid):  # a key frame may be smaller
            key = self.key(latent, k, grid, "scene change", fresh)
            if len(key.data) <= len(data):
                return key
        return Coded(data, DELTA_KIND, reference.updated(changed, fresh[:, changed]),
                     int(changed.sum()))


def apply(data: bytes, tables: MAEEncoderTables, reference: Reference | None,
          expected_fingerprint: bytes | None = None,
          header: bitstream.Header | None = None) -> tuple[Reference, int, str]:
    """The cloud's half: a frame's bytes + the reference it holds → (the new reference, k, kind).
    A key frame is checked and parsed like any intra stream (the caller checks its header
    against the models first, bitstream.parse_header, and passes it as `header`, so it is
    parsed once); a delta needs a reference, else `NoReference`. BitstreamError for a
    malformed frame."""
    if is_delta(data):
        if reference is None:
            raise NoReference("a delta frame, but this stream holds no reference: send a key frame")
        delta = decode_delta(data, tables, reference.num_tokens)
        return reference.updated(delta.changed, delta.codes), delta.k, DELTA_KIND
    bs = bitstream.parse(data, expected_fingerprint=expected_fingerprint, header=header)
    if bs.truncated:
        raise BitstreamError(f"key frame cut after layer {len(bs.layers)} of {bs.k}")
    try:
        idx = tables.decode_indices(bs.layers, bs.num_tokens)
    except entropy.EntropyDecodeError as e:
        raise BitstreamError(f"corrupt layer data: {e}") from None
    return Reference.from_key(idx, tables.num_layers, bs.grid), bs.k, KEY


class NoReference(BitstreamError):
    """A delta frame for a stream whose reference the cloud does not hold: a resync."""
