"""Static-model arithmetic coding of code indices (integer arithmetic, bit-exact).

The classic Witten–Neal–Cleary coder with 32-bit registers: each layer's indices are coded
with a fixed frequency table learned from training data (stored with the MAE), so a layer
whose codes are predictable costs far fewer bits than N·log2(K).
"""
from __future__ import annotations

import numpy as np

_BITS = 32
_TOP = (1 << _BITS) - 1
_HALF = 1 << (_BITS - 1)
_QUARTER = 1 << (_BITS - 2)
MAX_TOTAL = 1 << 16  # frequency tables are scaled to sum to at most this


class EntropyDecodeError(ValueError):
    pass


def quantised_frequencies(counts, total: int = MAX_TOTAL) -> np.ndarray:
    """Counts → integer frequencies ≥ 1 (every symbol stays codable) summing to ≤ total."""
    counts = np.asarray(counts, np.float64)
    k = len(counts)
    p = (counts + 1e-3) / (counts + 1e-3).sum()
    f = np.maximum(1, np.floor(p * (total - k))).astype(np.int64)
    return f


def _cumulative(freqs) -> list[int]:
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + int(f))
    return cum


def encode(symbols, freqs) -> bytes:
    cum = _cumulative(freqs)
    total = cum[-1]
    low, high, pending = 0, _TOP, 0
    bits: list[int] = []

    def emit(bit):
        nonlocal pending
        bits.append(bit)
        bits.extend([1 - bit] * pending)
        pending = 0

    for s in symbols:
        s = int(s)
        span = high - low + 1
        high = low + span * cum[s + 1] // total - 1
        low = low + span * cum[s] // total
        while True:
            if high < _HALF:
                emit(0)
            elif low >= _HALF:
                emit(1)
                low -= _HALF
                high -= _HALF
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                pending += 1
                low -= _QUARTER
                high -= _QUARTER
            else:
                break
            low, high = low * 2, high * 2 + 1
    # flush: enough bits to pin a value inside [low, high]
    pending += 1
    emit(0 if low < _QUARTER else 1)
    while bits and bits[-1] == 0:  # trailing zeros are implied by the decoder
        bits.pop()
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def decode(data: bytes, freqs, count: int) -> list[int]:
    cum = _cumulative(freqs)
    total = cum[-1]
    nbits = len(data) * 8

    def bit(i):
        return (data[i >> 3] >> (7 - (i & 7))) & 1 if i < nbits else 0

    low, high, value, pos = 0, _TOP, 0, 0
    for _ in range(_BITS):
        value = (value << 1) | bit(pos)
        pos += 1
    out = []
    for _ in range(count):
        span = high - low + 1
        target = ((value - low + 1) * total - 1) // span
        if not 0 <= target < total:
            raise EntropyDecodeError("arithmetic decoder left its interval (corrupt layer data)")
        s = int(np.searchsorted(cum, target, side="right")) - 1
        out.append(s)
        high = low + span * cum[s + 1] // total - 1
        low = low + span * cum[s] // total
        while True:
            if high < _HALF:
                pass
            elif low >= _HALF:
                low -= _HALF
                high -= _HALF
                value -= _HALF
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                low -= _QUARTER
                high -= _QUARTER
                value -= _QUARTER
            else:
                break
            low, high = low * 2, high * 2 + 1
            value = (value << 1) | bit(pos)
            pos += 1
    if pos - _BITS > nbits + _BITS:
        raise EntropyDecodeError("layer data too short for its symbols")
    return out
