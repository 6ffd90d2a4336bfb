"""The progressive bitstream: a versioned, checksummed binary format for MAE layers.

    header   "PV" | version u8 | MAE fingerprint 4B | N (varint) | [rows u8 | cols u8]
             | L<<4 | k (one byte) | k × layer length (varint) | CRC-16 of the header
                                                                  (12 bytes for k = 1, version 1)
    layer i  payload (entropy-coded code indices) | CRC-16 of (i, payload)

The version byte names the header's form: 1 for a fixed layout (no grid field), 2 when the
tokens come with a tile grid (Idefics3/SmolVLM image splitting: the cloud needs rows × cols to
rebuild the prompt, and N alone does not tell 2×3 from 3×2). A model with a fixed layout pays
nothing for the field it does not need.

Layers follow in order, each with its own checksum, so a stream cut anywhere after layer j
still decodes layers 1..j (and says it was truncated). Every other defect raises
BitstreamError with the reason. Never pickle: this is parsed byte by byte.
"""
from __future__ import annotations

import binascii
import itertools
import struct
from dataclasses import dataclass

MAGIC = b"PV"
VERSION = 1  # fixed layout
VERSION_GRID = 2  # with a tile grid
VERSIONS = (VERSION, VERSION_GRID)
FINGERPRINT_BYTES = 4
_FIXED = struct.Struct(">2sB4s")  # magic, version, fingerprint; then N, L|k, lengths
MAX_LAYERS = 15  # L and k share one byte
_CRC = struct.Struct(">H")
MAX_LAYER_BYTES = 1 << 20


class BitstreamError(ValueError):
    """A stream that cannot be decoded; str(e) says why."""


class TruncatedStream(BitstreamError):
    """Not even layer 1 is complete yet: a receiver reading a stream as it arrives waits for
    more bytes; a stream that ends here cannot be decoded."""


def _crc(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(4):  # at most 4 bytes: lengths below 2^28
        if pos >= len(data):
            raise TruncatedStream("truncated header: stream ends inside a length field")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
    raise BitstreamError("corrupt header: a length field is longer than 4 bytes")


# the varints of the header, for other framings of the codec (progvlm/codec/temporal.py)
write_varint, read_varint = _varint, _read_varint


@dataclass(frozen=True)
class Packed:
    """A stream in its wire form and where its header and each layer end: what a sender needs
    to send it layer by layer, known from packing it (pack_stream) or from parsing it once
    (Bitstream.packed), never by parsing it again."""
    data: bytes
    header_bytes: int
    layer_ends: list[int]  # offsets in `data` where each layer ends (its checksum included)

    @property
    def layer_bytes(self) -> list[int]:
        """Each layer's size on the wire (payload and checksum)."""
        return [b - a for a, b in zip([self.header_bytes] + self.layer_ends, self.layer_ends)]


@dataclass
class Bitstream:
    fingerprint: bytes
    num_tokens: int
    num_layers: int  # L of the MAE that wrote it
    k: int  # layers announced in the header
    layers: list[bytes]  # the complete layers present, in order (≤ k)
    header_bytes: int  # the header's size in the wire form
    grid: tuple[int, int] | None = None  # the tile grid (rows, cols), version 2 only
    data: bytes = b""  # the wire form it was parsed from

    def packed(self) -> Packed:
        """The complete layers present, in their wire form, with their ends."""
        ends = self.layer_ends()
        return Packed(self.data[:ends[-1]], self.header_bytes, ends)

    def layer_ends(self) -> list[int]:
        """Offsets in the wire form where each present layer ends (its checksum included)."""
        ends, end = [], self.header_bytes
        for payload in self.layers:
            end += len(payload) + _CRC.size
            ends.append(end)
        return ends

    @property
    def truncated(self) -> bool:
        return len(self.layers) < self.k


def pack_header(fingerprint: bytes, num_tokens: int, num_layers: int, lengths: list[int],
                grid: tuple[int, int] | None = None) -> bytes:
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
    if not 1 <= len(lengths) <= num_layers <= MAX_LAYERS or not 0 < num_tokens < 1 << 21:
        raise ValueError(f"bad header fields: N={num_tokens}, L={num_layers}, k={len(lengths)}")
    if grid is not None and not all(isinstance(g, int) and 0 <= g < 256 for g in grid):
        raise ValueError(f"grid must be two integers in 0..255, got {grid!r}")
    head = _FIXED.pack(MAGIC, VERSION if grid is None else VERSION_GRID, fingerprint)
    head += _varint(num_tokens) + (bytes(grid) if grid is not None else b"")
    head += bytes([num_layers << 4 | len(lengths)]) + b"".join(_varint(n) for n in lengths)
    return head + _CRC.pack(_crc(head))


def pack_layer(index: int, payload: bytes) -> bytes:
    """Layer `index` (0-based) as it goes on the wire: payload + its checksum."""
    return payload + _CRC.pack(_crc(bytes([index]) + payload))


def pack_stream(fingerprint: bytes, num_tokens: int, num_layers: int, layers: list[bytes],
                grid: tuple[int, int] | None = None) -> Packed:
    """The header and layers 1..k in the wire form, with where each part ends."""
    header = pack_header(fingerprint, num_tokens, num_layers, [len(p) for p in layers], grid)
    wire = [pack_layer(i, p) for i, p in enumerate(layers)]
    ends = list(itertools.accumulate(map(len, wire), initial=len(header)))[1:]
    return Packed(header + b"".join(wire), len(header), ends)


def pack(fingerprint: bytes, num_tokens: int, num_layers: int, layers: list[bytes],
         grid: tuple[int, int] | None = None) -> bytes:
    """pack_stream's bytes."""
    return pack_stream(fingerprint, num_tokens, num_layers, layers, grid).data


def min_stream_bytes(num_tokens: int, k: int, grid: tuple[int, int] | None = None) -> int:
    """The fewest bytes any stream of N tokens and k layers takes: its header and k empty
    layers (a lower bound on a key frame's size, progvlm/codec/temporal.py)."""
    return len(pack(bytes(FINGERPRINT_BYTES), num_tokens, MAX_LAYERS, [b""] * k, grid))


@dataclass
class Header:
    """The header of a stream: what a receiver needs to know where each layer ends."""
    fingerprint: bytes
    num_tokens: int
    num_layers: int
    lengths: list[int]  # payload bytes of layers 1..k (their checksums not included)
    header_bytes: int
    grid: tuple[int, int] | None = None

    @property
    def k(self) -> int:
        return len(self.lengths)

    def layer_ends(self) -> list[int]:
        """Offsets in the wire form where each announced layer ends (its checksum included)."""
        ends, end = [], self.header_bytes
        for length in self.lengths:
            end += length + _CRC.size
            ends.append(end)
        return ends


# magic, version, fingerprint, N (a varint: one byte at least) and L|k: the bytes needed before
# anything past the fixed fields can be read
_MIN_FIELDS_BYTES = _FIXED.size + 2
# the longest header: fixed fields, N, grid, L|k, k lengths (4-byte varints at most), checksum
MAX_HEADER_BYTES = _FIXED.size + 4 + 2 + 1 + 4 * MAX_LAYERS + _CRC.size


def parse_header(data: bytes, expected_fingerprint: bytes | None = None) -> Header:
    """The header at the start of `data` (a whole stream or any prefix of one). Reads the header
    bytes only, so a receiver can call it on a growing buffer at a cost that does not grow.
    Raises TruncatedStream while the header is incomplete, BitstreamError if it is bad."""
    if len(data) < _MIN_FIELDS_BYTES:
        raise TruncatedStream(f"truncated header: {len(data)} bytes; reading a header's fields "
                              f"(magic, version, fingerprint, N, L|k) needs at least "
                              f"{_MIN_FIELDS_BYTES}")
    magic, version, fp = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f"not a progvlm bitstream (magic {magic!r}, expected {MAGIC!r})")
    if version not in VERSIONS:
        raise BitstreamError(f"unsupported bitstream version {version} (this decoder reads "
                             f"versions {', '.join(map(str, VERSIONS))})")
    n, pos = _read_varint(data, _FIXED.size)
    grid = None
    if version == VERSION_GRID:
        if pos + 2 > len(data):
            raise TruncatedStream("truncated header: stream ends inside the grid field")
        grid = (data[pos], data[pos + 1])
        pos += 2
    if pos >= len(data):
        raise TruncatedStream("truncated header: stream ends before the layer count")
    L, k = data[pos] >> 4, data[pos] & 0x0F
    pos += 1
    if k == 0 or k > L or n == 0:
        raise BitstreamError(f"corrupt header: N={n}, L={L}, k={k}")
    lengths = []
    for _ in range(k):
        length, pos = _read_varint(data, pos)
        if length > MAX_LAYER_BYTES:
            raise BitstreamError(f"corrupt header: layer length {length} over the limit")
        lengths.append(length)
    if len(data) < pos + _CRC.size:
        raise TruncatedStream("truncated header: stream ends before the header checksum")
    (crc,) = _CRC.unpack_from(data, pos)
    if crc != _crc(data[:pos]):
        raise BitstreamError("corrupt header: checksum mismatch")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise BitstreamError(f"wrong MAE fingerprint: the stream was written by MAE {fp.hex()}, "
                             f"this decoder is {expected_fingerprint.hex()}")
    return Header(fp, n, L, lengths, pos + _CRC.size, grid)


def parse(data: bytes, expected_fingerprint: bytes | None = None,
          header: Header | None = None) -> Bitstream:
    """Bytes → Bitstream with the complete layers present. Raises BitstreamError otherwise.
    `header`: the header of `data` when the caller has parsed it already (parse_header), so it
    is not parsed again."""
    data = bytes(data)
    header = header or parse_header(data, expected_fingerprint)
    pos = header.header_bytes
    k = header.k
    layers = []
    for i, length in enumerate(header.lengths):
        end = pos + length + _CRC.size
        if end > len(data):
            break  # cut inside layer i: layers 0..i-1 stand
        payload = data[pos:pos + length]
        (crc,) = _CRC.unpack_from(data, pos + length)
        if crc != _crc(bytes([i]) + payload):
            raise BitstreamError(f"corrupt layer {i + 1}: checksum mismatch")
        layers.append(payload)
        pos = end
    if not layers:
        raise TruncatedStream("truncated stream: not even layer 1 is complete")
    if len(layers) == k and pos != len(data):
        raise BitstreamError(f"{len(data) - pos} unexpected bytes after the last layer")
    return Bitstream(header.fingerprint, header.num_tokens, header.num_layers, k, layers,
                     header.header_bytes, header.grid, data)
