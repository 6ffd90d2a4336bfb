"""The MAE: any-prefix decoding, bytes that round-trip, a frozen VLM, resumable training."""
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from progvlm.backends.tiny import TinyVLMBackend
from progvlm.codec.bitstream import BitstreamError, parse
from progvlm.toyworld.examples import load_examples
from progvlm.images import load_image
from progvlm.models.mae import DEFAULT_MAE, MAE, MAEConfig, load_mae
from progvlm.toyworld.tiny_vlm import TinyVLM, TinyVLMConfig
from progvlm.toyworld.scenes import generate_scene, render_scene
from progvlm.split import Frame, Split, load_split
from progvlm.training.train_mae import train_mae

SMALL_VLM = TinyVLMConfig(vision_width=32, vision_layers=1, token_dim=32, lm_layers=1)
SMALL_MAE = dict(latent_dim=8, codebook_size=16, encoder_hidden=32, decoder_width=32,
                 decoder_layers=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MAE trained briefly for a small random VLM, and that VLM's weights before."""
    torch.manual_seed(0)
    backend = TinyVLMBackend(TinyVLM(SMALL_VLM))
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    tokens = torch.randn(96, 64, 32) + torch.linspace(-1, 1, 64)[None, :, None]
    out = tmp_path_factory.mktemp("mae")
    summary = train_mae(backend, out / "mae", out / "work", steps=12, batch=8, tokens=tokens,
                        cfg=MAEConfig(**SMALL_MAE), resume=False, log=lambda m: None)
    return backend, before, tokens, out, summary


def test_vlm_weights_are_bit_identical_after_mae_training(trained):
    backend, before, *_ = trained
    after = backend.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in backend.model.parameters())


def test_saved_mae_names_its_vlm_and_fingerprint(trained):
    backend, _, _, out, summary = trained
    cfg = json.loads((out / "mae" / "config.json").read_text())
    assert cfg["mae"]["vlm_id"] == backend.model_id
    mae = load_mae(out / "mae")
    assert mae.fingerprint().hex() == cfg["fingerprint"] == summary["fingerprint"]


def test_every_prefix_decodes_and_a_cut_stream_equals_the_shorter_stream(trained):
    _, _, tokens, out, _ = trained
    backend = trained[0]
    split = Split(backend, load_mae(out / "mae"))
    mae = split.mae
    L = mae.cfg.num_layers
    full = split.pack(Frame(mae.compress(tokens[0], L), 64))
    bs = parse(full)
    errors = []
    for k in range(1, L + 1):
        layers = mae.compress(tokens[0], k)
        assert layers == bs.layers[:k]  # a prefix of layers is a prefix of the coding
        t_k = mae.decompress(layers, 64)
        assert t_k.shape == (64, 32)
        cut = bs.layer_ends()[k - 1]
        frame_cut = split.unpack(full[:cut])
        assert frame_cut.k == k and frame_cut.partial == (k < L)
        assert torch.equal(split.decode(frame_cut), t_k)
        errors.append((t_k - tokens[0]).pow(2).mean().item())
    assert errors[-1] < errors[0]  # more layers, closer to the tokens


def test_streams_of_another_mae_or_corrupt_layers_are_refused(trained):
    _, _, tokens, out, _ = trained
    split = Split(trained[0], load_mae(out / "mae"))
    other = MAE(MAEConfig(**SMALL_MAE, num_tokens=64, token_dim=32))
    foreign = Split.__new__(Split)  # another MAE's wire form, without pairing it to a VLM
    foreign.mae, foreign.fingerprint, foreign.num_layers = other, other.fingerprint(), 4
    with pytest.raises(BitstreamError, match="wrong MAE fingerprint"):
        split.unpack(foreign.pack(Frame(other.compress(tokens[0], 1), 64)))
    data = bytearray(split.pack(Frame(split.mae.compress(tokens[0], 2), 64)))
    data[-3] ^= 0x55
    with pytest.raises(BitstreamError, match="corrupt layer 2"):
        split.unpack(bytes(data))


def test_compress_rejects_bad_k_and_shapes(trained):
    _, _, tokens, out, _ = trained
    mae = load_mae(out / "mae")
    for k in (0, mae.cfg.num_layers + 1):
        with pytest.raises(ValueError, match="k must be an integer in"):
            mae.compress(tokens[0], k)
    with pytest.raises(ValueError, match="expected tokens of shape"):
        mae.compress(tokens[0][:10])


def test_training_resumes_from_its_checkpoint(trained, tmp_path):
    backend, _, tokens, _, _ = trained
    logs = []
    kw = dict(batch=8, tokens=tokens, cfg=MAEConfig(**SMALL_MAE), log=logs.append)
    train_mae(backend, tmp_path / "m", tmp_path / "w", steps=4, **kw)
    s = train_mae(backend, tmp_path / "m", tmp_path / "w", steps=6, **kw)
    assert any("resumed" in m and "step 4" in m for m in logs)
    assert s["training"]["steps"] == 6


# ---- the edge's fast path against today's bitstream (bundled VLM and MAE) ----------------------

GENERATED_SCENES = 18  # with the six examples: 24 frames × 64 tokens × every k (300 more
# scenes were checked once, by hand: no index differed)


@contextmanager
def _one_thread():
    """The edge's setting (its device profiles run one thread); on a busy shared host, two
    threads on these small ops mostly wait for each other (measured: 10× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def bundled():
    """The bundled split and the visual tokens of the examples and of generated scenes."""
    split = load_split()
    images = [load_image(ex["path"]) for ex in load_examples()]
    size = split.vlm.input_size  # rendered at the model's size: no resize to pay for
    images += [render_scene(generate_scene(90_000 + seed), size) for seed in range(GENERATED_SCENES)]
    with _one_thread():
        return split, [split.vlm.vision(split.vlm.preprocess(im))[0] for im in images]


def _unfolded_layers(mae: MAE, tokens: torch.Tensor, k: int) -> list[bytes]:
    """The edge coding as it was before the fold, restated independently of MAE.compress and
    MAEEncoderTables.indices: the training path's encode_latent (standardise, then the
    Sequential encoder), the cost |c|² − 2r·c + λ·bits as one expression, fresh stage models."""
    with torch.no_grad():
        latent = mae.encode_latent(tokens).numpy()
    q, residual, indices = mae.quantiser, latent, []
    for layer in range(k):
        cb = q.codebooks[layer].numpy()
        bits = (q.rate_lambda[layer] * q.rate_scale * q.typical_dist[layer] * q.code_bits(layer)).numpy()
        cost = (cb ** 2).sum(-1) - 2.0 * residual @ cb.T + bits
        indices.append(cost.argmin(1))
        residual = residual - cb[indices[-1]]
    models = mae.stage_models()
    return [models[l].encode(indices[l]) for l in range(k)]


def test_compress_is_byte_identical_to_the_unfolded_coding_for_every_k(bundled, one_thread):
    split, frames = bundled
    mae, L = split.mae, split.num_layers
    for tokens in frames:
        for k in range(1, L + 1):
            assert mae.compress(tokens, k) == _unfolded_layers(mae, tokens, k), k
    two_blocks = torch.cat(frames[:2])  # M = 2N: tiles or a batch of frames, coded as one
    assert mae.compress(two_blocks, L) == _unfolded_layers(mae, two_blocks, L)


def test_the_committed_fingerprint_survives_the_edge_caches(bundled):
    split, frames = bundled
    mae = split.mae
    committed = json.loads((DEFAULT_MAE / "config.json").read_text())["fingerprint"]
    keys = set(mae.state_dict())
    mae.compress(frames[0], 1)  # builds the folded encoder and the coding tables
    assert mae.inference_encoder() is mae.inference_encoder()  # built once, not per call
    assert set(mae.state_dict()) == keys  # the folded copy is no part of the weights
    assert mae.fingerprint().hex() == committed == split.fingerprint.hex()


def test_the_coder_assigns_only_the_stages_asked_and_each_is_a_prefix(bundled):
    split, frames = bundled
    codec, L = split.mae.edge_codec(), split.num_layers
    latent = split.mae._latent(frames[0])
    every = codec.indices(latent)
    assert every.shape == (L, 64)
    for k in range(1, L + 1):
        assert np.array_equal(codec.indices(latent, k), every[:k])


def test_the_folded_encoder_is_the_standardised_encoder():
    """With a mean and std far from 0 and 1 per channel, so a fold that scaled rows instead of
    columns, or forgot the mean, would be far off."""
    torch.manual_seed(1)
    mae = MAE(MAEConfig(**SMALL_MAE, num_tokens=64, token_dim=32)).eval()
    mae.token_mean.copy_(torch.randn(32) * 3)
    mae.token_std.copy_(torch.rand(32) * 4 + 0.1)
    tokens = mae.token_mean + mae.token_std * torch.randn(64, 32)
    with torch.no_grad():
        reference = mae.encode_latent(tokens)
    assert torch.allclose(mae.inference_encoder()(tokens), reference, atol=1e-5, rtol=1e-5)
    mae.token_mean.add_(1.0)  # new weights: stale until the caches are invalidated, as documented
    mae.invalidate_caches()
    with torch.no_grad():
        assert torch.allclose(mae.inference_encoder()(tokens), mae.encode_latent(tokens),
                              atol=1e-5, rtol=1e-5)


def test_an_mae_has_no_more_layers_than_the_bitstream_carries():
    """The bitstream's layer limit is checked once, where the MAE is built."""
    from progvlm.codec.bitstream import MAX_LAYERS
    sizes = {**SMALL_MAE, "num_tokens": 64, "token_dim": 32}
    assert MAE(MAEConfig(**sizes, num_layers=MAX_LAYERS)).num_layers == MAX_LAYERS
    with pytest.raises(ValueError, match=f"1..{MAX_LAYERS} layers"):
        MAE(MAEConfig(**sizes, num_layers=MAX_LAYERS + 1))
