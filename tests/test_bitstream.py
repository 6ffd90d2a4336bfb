"""The bitstream format: round trip, any-prefix cuts, every defect a BitstreamError, fuzzed."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from progvlm.codec import entropy
from progvlm.codec.bitstream import BitstreamError, pack, pack_header, parse

FP = b"\x01\x02\x03\x04"


def _stream(k=4, L=4):
    layers = [bytes(range(i, i + 5 + 3 * i)) for i in range(k)]
    return layers, pack(FP, 64, L, layers)


def test_round_trip():
    layers, data = _stream()
    bs = parse(data, expected_fingerprint=FP)
    assert bs.layers == layers and bs.k == 4 and bs.num_tokens == 64 and not bs.truncated


def test_cut_at_or_inside_a_layer_decodes_the_complete_prefix():
    layers, data = _stream()
    header = len(pack_header(FP, 64, 4, [len(p) for p in layers]))
    ends = np.cumsum([len(p) + 2 for p in layers]) + header
    assert parse(data).header_bytes == header and parse(data).layer_ends() == list(ends)
    for j, end in enumerate(ends[:-1], start=1):
        for cut in (end, end + 1):  # at the boundary, and one byte into the next layer
            bs = parse(data[:cut])
            assert bs.layers == layers[:j] and bs.truncated


@pytest.mark.parametrize("mutate,reason", [
    (lambda d: b"XX" + d[2:], "not a progvlm bitstream"),
    (lambda d: d[:2] + b"\x09" + d[3:], "unsupported bitstream version 9"),
    (lambda d: d[:10], "truncated header"),
    (lambda d: d[:-3] + bytes([d[-3] ^ 0xFF]) + d[-2:], "corrupt layer 4"),
    (lambda d: d + b"\x00", "unexpected bytes"),
    (lambda d: d[:8] + bytes([d[8] ^ 0x01]) + d[9:], "corrupt header"),
])
def test_defects_raise_one_error_type_with_the_reason(mutate, reason):
    _, data = _stream()
    with pytest.raises(BitstreamError, match=reason):
        parse(mutate(data), expected_fingerprint=FP)


def test_wrong_fingerprint_names_both():
    _, data = _stream()
    with pytest.raises(BitstreamError, match="wrong MAE fingerprint.*01020304.*ffffffff"):
        parse(data, expected_fingerprint=b"\xff" * 4)


def _parse_or_none(data: bytes):
    """parse(data), or None when it raises BitstreamError with a reason; any other exception
    (an IndexError, a struct.error, …) propagates and fails the test."""
    try:
        return parse(data, expected_fingerprint=FP)
    except BitstreamError as e:
        assert str(e), "a BitstreamError must say why"
        return None


def _assert_accepted_stream_is_its_bytes(bs, data: bytes):
    """A stream the parser accepts holds only complete layers, each exactly the bytes on the
    wire before its checksum, and nothing after the last announced layer."""
    assert 1 <= len(bs.layers) <= bs.k <= bs.num_layers
    ends = bs.layer_ends()
    assert ends[-1] <= len(data) and (bs.truncated or ends[-1] == len(data))
    for payload, end in zip(bs.layers, ends):
        assert data[end - 2 - len(payload):end - 2] == payload


# arbitrary bytes, and arbitrary bytes behind a valid magic, version and fingerprint (so that
# the parser gets past its first checks)
ARBITRARY = st.one_of(st.binary(max_size=300),
                      st.sampled_from([b"PV\x01", b"PV\x02"]).flatmap(
                          lambda head: st.binary(max_size=300).map(lambda rest: head + FP + rest)))


@settings(max_examples=400, deadline=None)
@given(ARBITRARY)
def test_parser_never_crashes_on_arbitrary_bytes(data):
    bs = _parse_or_none(data)
    if bs is not None:
        _assert_accepted_stream_is_its_bytes(bs, data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_parser_never_crashes_on_mutated_valid_streams(draw):
    _, data = _stream()
    data = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, len(data) - 1))
        data[i] = draw.draw(st.integers(0, 255))
    data = bytes(data[:draw.draw(st.integers(0, len(data)))])
    bs = _parse_or_none(data)
    if bs is not None:
        _assert_accepted_stream_is_its_bytes(bs, data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=80), st.lists(st.integers(0, 500), min_size=16, max_size=16))
def test_entropy_coder_round_trip(symbols, counts):
    model = entropy.StageModel(np.asarray(counts) + 1e-3)
    assert entropy.StageModel(np.asarray(counts) + 1e-3).decode(model.encode(symbols), len(symbols)).tolist() == symbols


def test_entropy_coding_pays_for_skewed_codes():
    """A stage whose codes are mostly one value costs far less than fixed-length indices."""
    rng = np.random.default_rng(0)
    p = np.array([0.9] + [0.1 / 127] * 127)
    symbols = rng.choice(128, 64, p=p)
    coded = entropy.StageModel(p).encode(symbols)
    assert len(coded) < 64 * 7 / 8 / 2  # under half of 7 bits per index


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 100))
def test_entropy_decoder_never_crashes_on_garbage(data, count):
    model = entropy.StageModel(np.arange(16) + 1.0)
    try:
        out = model.decode(data, count)
        assert len(out) == count and all(0 <= s < 16 for s in out)
    except entropy.EntropyDecodeError:
        pass


def test_a_tile_grid_travels_in_version_2_and_costs_nothing_without_one():
    layers, plain = _stream(k=2)
    tiled = pack(FP, 64, 4, layers, grid=(2, 3))
    assert plain[2] == 1 and tiled[2] == 2 and len(tiled) == len(plain) + 2
    bs = parse(tiled, expected_fingerprint=FP)
    assert (bs.grid, bs.num_tokens, bs.layers) == ((2, 3), 64, layers)
    assert parse(plain).grid is None
    with pytest.raises(BitstreamError, match="truncated header"):
        parse(tiled[:9])  # ends inside the grid field
    with pytest.raises(ValueError, match="grid must be two integers"):
        pack(FP, 64, 4, layers, grid=(2, 300))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parser_never_crashes_on_mutated_tiled_streams(draw):
    layers, _ = _stream()
    data = bytearray(pack(FP, 320, 4, layers, grid=(2, 2)))
    for _ in range(draw.draw(st.integers(1, 4))):
        data[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    data = bytes(data[:draw.draw(st.integers(0, len(data)))])
    bs = _parse_or_none(data)
    if bs is not None:
        _assert_accepted_stream_is_its_bytes(bs, data)
