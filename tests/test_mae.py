"""The MAE: any-prefix decoding, bytes that round-trip, a frozen VLM, resumable training."""
import json

import pytest
import torch

from progvlm.backends.tiny import TinyVLMBackend
from progvlm.bitstream import BitstreamError, parse
from progvlm.models.mae import MAE, MAEConfig, load_mae
from progvlm.models.tiny_vlm import TinyVLM, TinyVLMConfig
from progvlm.split import Frame, Split
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
