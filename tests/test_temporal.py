"""Temporal coding of layers (progvlm/codec/temporal.py): key and delta frames, what the edge
mirrors equals what the cloud decodes, and every malformed frame is refused with a reason."""
import numpy as np
import pytest

from progvlm.codec import bitstream, temporal
from progvlm.codec.bitstream import BitstreamError
from progvlm.split import load_split


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def tables(split):
    return split.mae.edge_codec()


def latents(split, seed=0, count=3):
    """Latents of a few blocks of real visual tokens (the examples' distribution)."""
    from progvlm.toyworld.scenes import generate_scene, render_scene
    out = []
    for i in range(count):
        image = render_scene(generate_scene(seed * 100 + i))
        tokens, _ = split.vlm.vision(split.vlm.preprocess(image))
        out.append(split.mae._latent(tokens))
    return out


def test_the_same_latent_again_is_a_one_byte_frame(split, tables):
    z = latents(split)[0]
    coder = temporal.TemporalCoder(tables)
    key = coder.code(z, 2, None)
    assert key.kind == temporal.KEY and key.reason == "first"
    assert key.data == bitstream.pack(tables.fingerprint, len(z), tables.num_layers,
                                      tables.encode_layers(z, 2))  # an intra stream, unchanged
    again = coder.code(z, 2, key.reference)
    assert again.kind == temporal.DELTA_KIND and again.data == bytes([temporal.DELTA | temporal.SAME | 2])
    assert again.changed == 0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_delta_decodes_on_the_cloud_to_the_reference_the_edge_mirrors(split, tables, k):
    a, other, _ = latents(split, seed=1)
    moved = np.flatnonzero((tables.indices(a, 1) != tables.indices(other, 1))[0])[:6]
    assert len(moved) >= 2
    b = a.copy()
    b[moved] = other[moved]  # a few tokens take another scene's content
    coder = temporal.TemporalCoder(tables)
    key = coder.code(a, k, None)
    cloud_ref, kk, kind = temporal.apply(key.data, tables, None, tables.fingerprint)
    assert (kind, kk) == (temporal.KEY, k)
    np.testing.assert_array_equal(cloud_ref.indices, key.reference.indices)
    delta = coder.code(b, k, key.reference)
    assert delta.kind == temporal.DELTA_KIND and 1 <= delta.changed <= len(moved) + 4
    cloud_ref, kk, kind = temporal.apply(delta.data, tables, cloud_ref)
    assert (kind, kk) == (temporal.DELTA_KIND, k)
    np.testing.assert_array_equal(cloud_ref.indices, delta.reference.indices)
    np.testing.assert_array_equal(cloud_ref.depth, delta.reference.depth)
    # the changed tokens are coded as an intra frame codes them; the others keep the key's codes
    fresh = tables.indices(b, k)
    resent = cloud_ref.indices[:k] != key.reference.indices[:k]
    changed_tokens = np.flatnonzero(resent.any(0))
    np.testing.assert_array_equal(cloud_ref.indices[:k, changed_tokens], fresh[:, changed_tokens])
    assert set(changed_tokens) <= set(moved)
    assert len(delta.data) < len(coder.key(b, k).data)


def test_a_token_kept_at_a_coarser_depth_decodes_with_its_own_codes(split, tables):
    a = latents(split, seed=2)[0]
    coder = temporal.TemporalCoder(tables)
    ref1 = coder.code(a, 1, None).reference
    delta = coder.code(a, 3, ref1)  # k grows: tokens may keep depth 1 or be resent at depth 3
    latent = delta.reference.latent(tables, 3)
    kept = delta.reference.depth == 1
    one = tables.codebooks[0][ref1.indices[0]]
    np.testing.assert_allclose(latent[kept], one[kept])


def test_a_new_scene_costs_at_most_a_key_frame_and_a_new_shape_is_one(split, tables):
    a, b, _ = latents(split, seed=3)
    coder = temporal.TemporalCoder(tables)
    ref = coder.code(a, 1, None).reference
    # another scene: whichever is smaller, the key or the delta (backgrounds share codes)
    assert len(coder.code(b, 1, ref).data) <= len(coder.key(b, 1).data)
    far = -3 * a  # every token moved far: resent whole, as a delta (no 12-byte header) or a key
    everything = coder.code(far, 1, ref)
    assert len(everything.data) <= len(coder.key(far, 1).data)
    assert everything.changed == len(far) if everything.kind == temporal.DELTA_KIND \
        else everything.reason == "scene change"
    two = np.concatenate([a, a])
    coded = coder.code(two, 1, ref)
    assert coded.kind == temporal.KEY and coded.reason == "shape"


def test_a_key_frame_is_encoded_to_compare_only_when_it_could_be_the_smaller(split, tables,
                                                                            monkeypatch):
    a, other, _ = latents(split, seed=1)
    noise = np.random.default_rng(0)
    static = [a] + [a + 1e-4 * noise.standard_normal(a.shape).astype(np.float32) for _ in range(5)]
    moved = a.copy()
    moved[:6] = other[:6]
    clip = static + [moved, other, -3 * a]  # a few tokens move, another scene, every token far

    def play(frames):
        """Each frame coded as the Watcher codes it → [(kind, reason, bytes)], and how many
        key frames were encoded."""
        coder, encoded = temporal.TemporalCoder(tables), []
        key = coder.key
        monkeypatch.setattr(coder, "key", lambda *args, **kw: encoded.append(1) or key(*args, **kw))
        ref, since, out = None, 0, []
        for z in frames:
            coded = coder.code(z, 2, ref, since_key=since)
            since = since + 1 if coded.kind == temporal.DELTA_KIND else 0
            ref = coded.reference
            out.append((coded.kind, coded.reason, coded.data))
        return out, len(encoded)

    coded, encodes = play(static)
    assert [kind for kind, _, _ in coded] == ["key"] + ["delta"] * 5 and encodes == 1  # the first only
    coded, encodes = play(clip)
    with monkeypatch.context() as m:  # no shortcut: a key frame encoded for every frame, as before
        m.setattr(bitstream, "min_stream_bytes", lambda *args, **kw: 0)
        before, encodes_before = play(clip)
    assert coded == before  # the same kinds, reasons and bytes
    assert encodes_before == len(clip) and 1 < encodes < len(clip)


def test_key_frames_come_on_the_period(split, tables):
    z = latents(split)[0]
    coder = temporal.TemporalCoder(tables, key_every=3)
    ref, kinds = None, []
    for t in range(7):
        coded = coder.code(z, 1, ref, since_key=(kinds[::-1] + [temporal.KEY]).index(temporal.KEY)
                           if kinds else 0)
        kinds.append(coded.kind)
        ref = coded.reference
    assert kinds == ["key", "delta", "delta", "key", "delta", "delta", "key"]


def test_bad_delta_frames_are_refused_with_a_reason(split, tables):
    a = latents(split, seed=4)[0]
    b = latents(split, seed=5)[0]
    b[20:] = a[20:]  # a third of the tokens from another scene: a delta, not a key
    coder = temporal.TemporalCoder(tables)
    ref = coder.code(a, 2, None).reference
    coded = coder.code(b, 2, ref)
    assert coded.kind == temporal.DELTA_KIND and coded.changed > 0
    data = coded.data
    with pytest.raises(temporal.NoReference):
        temporal.apply(data, tables, None)
    flipped = bytearray(data)
    flipped[3] ^= 0x10
    with pytest.raises(BitstreamError, match="checksum"):
        temporal.apply(bytes(flipped), tables, ref)
    for cut in (1, 2, len(data) - 1):
        with pytest.raises(BitstreamError):
            temporal.apply(data[:cut], tables, ref)
    with pytest.raises(BitstreamError, match="k=9"):
        temporal.decode_delta(bytes([temporal.DELTA | temporal.SAME | 9]), tables, 64)
    with pytest.raises(BitstreamError, match="unchanged"):
        temporal.decode_delta(bytes([temporal.DELTA | temporal.SAME | 1, 0]), tables, 64)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_as_a_delta_never_crash(tables, seed):
    """Any byte string after a delta's first byte: a reference or BitstreamError, nothing else."""
    rng = np.random.default_rng(seed)
    ref = temporal.Reference.from_key(rng.integers(0, 8, (1, 64)), tables.num_layers)
    data = bytes([temporal.DELTA | int(rng.integers(1, 5))]) + rng.bytes(int(rng.integers(0, 40)))
    try:
        new, k, _ = temporal.apply(data, tables, ref)
    except BitstreamError:
        return
    assert new.indices.shape == ref.indices.shape and 1 <= k <= tables.num_layers
