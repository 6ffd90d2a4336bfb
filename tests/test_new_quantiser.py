"""Where a change lands: a new quantiser is its class plus its QUANTISERS entry, nothing else.

The quantiser below is defined here, in the test file: fixed random residual codebooks, plain
nearest-code assignment (no rate term), uniform code frequencies. Registered under a name, it
is built by MAEConfig, trained by train_mae, saved and loaded with its name in config.json, and
its codes cross the bitstream and decode on the cloud's path, with no edit to the MAE, the
coding tables, the Split, training or the bitstream.
"""
import json

import numpy as np
import pytest
import torch

from progvlm.backends.tiny import TinyVLMBackend
from progvlm.codec import bitstream
from progvlm.models.mae import MAE, MAEConfig, load_mae
from progvlm.models.quantisers import QUANTISERS, Quantiser
from progvlm.split import Frame, Split
from progvlm.toyworld.tiny_vlm import TinyVLM, TinyVLMConfig
from progvlm.training.train_mae import train_mae


class FixedVQ(Quantiser):
    """L stages of nearest-code residual VQ over fixed random codebooks."""

    weights_prefix = "fixed_vq"

    def __init__(self, cfg):
        super().__init__(cfg)
        generator = torch.Generator().manual_seed(7)
        scale = 0.5 ** torch.arange(cfg.num_layers, dtype=torch.float32)  # finer each stage
        codebooks = torch.randn(cfg.num_layers, cfg.codebook_size, cfg.latent_dim,
                                generator=generator) * scale[:, None, None]
        self.register_buffer("codebooks", codebooks)

    def quantise(self, z, update=False):
        residual, total, indices, cumulative = z, torch.zeros_like(z), [], []
        for cb in self.codebooks:
            idx = torch.cdist(residual.detach(), cb).argmin(1)
            residual = residual - cb[idx]
            total = total + cb[idx]
            indices.append(idx)
            cumulative.append(total)
        return torch.stack(indices), torch.stack(cumulative), (z - total.detach()).pow(2).mean()

    def get_output_from_indices(self, indices):
        return sum(self.codebooks[l][indices[l]] for l in range(len(indices)))

    def coding_tables(self):
        L, K, _ = self.codebooks.shape
        return {"codebooks": self.codebooks.numpy().copy(), "bit_cost": np.zeros((L, K), np.float32),
                "usage": np.ones((L, K))}


SIZES = dict(num_tokens=16, token_dim=32, latent_dim=4, codebook_size=8, encoder_hidden=32,
             decoder_width=32, decoder_layers=1, decoder_heads=2, num_layers=3,
             rate_lambda=[0.0, 0.0, 0.0])


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(QUANTISERS, "fixed", FixedVQ)


def test_an_mae_is_built_with_the_named_quantiser(registered):
    mae = MAE(MAEConfig(**SIZES, quantiser="fixed"))
    assert isinstance(mae.quantiser, FixedVQ)
    assert "fixed_vq.codebooks" in mae.state_dict() and not any(
        k.startswith("rvq.") for k in mae.state_dict())
    assert MAEConfig(**SIZES, quantiser="fixed").to_dict()["quantiser"] == "fixed"
    with pytest.raises(ValueError, match="unknown quantiser 'nope'"):
        MAE(MAEConfig(**SIZES, quantiser="nope"))


def test_its_codes_cross_the_bitstream_and_decode(registered):
    torch.manual_seed(0)
    mae = MAE(MAEConfig(**SIZES, quantiser="fixed")).eval()
    tokens = torch.randn(2 * 16, 32)  # two blocks
    layers = mae.compress(tokens)
    assert len(layers) == 3
    wire = bitstream.pack(mae.fingerprint(), len(tokens), mae.num_layers, layers)
    stream = bitstream.parse(wire, expected_fingerprint=mae.fingerprint())
    # the edge's coding tables assigned exactly the quantiser's own codes
    with torch.no_grad():
        codes = mae.quantiser.quantise(mae.encode_latent(tokens))[0]
    sent = mae.edge_codec().decode_indices(stream.layers, stream.num_tokens)
    assert np.array_equal(sent, codes.numpy())
    for k in (1, 3):  # any prefix decodes, to the quantiser's output for those codes
        decoded = mae.decompress(stream.layers[:k], stream.num_tokens)
        latent = mae.quantiser.get_output_from_indices(codes[:k]).view(2, 16, -1)
        with torch.no_grad():
            expected = mae.decode_latent(latent, k).reshape(len(tokens), -1)
        assert decoded.shape == tokens.shape and torch.equal(decoded, expected)


def test_it_trains_saves_loads_and_serves_a_split(registered, tmp_path):
    torch.manual_seed(0)
    backend = TinyVLMBackend(TinyVLM(TinyVLMConfig(vision_width=32, vision_layers=1, token_dim=32,
                                                   lm_layers=1, grid=4)))
    tokens = torch.randn(24, 16, 32)
    summary = train_mae(backend, tmp_path / "mae", tmp_path / "work", steps=3, batch=4,
                        tokens=tokens, distill=0.0, cfg=MAEConfig(**SIZES, quantiser="fixed"),
                        resume=False, log=lambda m: None)
    assert json.loads((tmp_path / "mae" / "config.json").read_text())["mae"]["quantiser"] == "fixed"
    mae = load_mae(tmp_path / "mae")
    assert isinstance(mae.quantiser, FixedVQ)
    assert mae.fingerprint().hex() == summary["fingerprint"]
    split = Split(backend, mae)
    frame = Frame(mae.compress(tokens[0]), 16)
    received = split.unpack(split.pack(frame))
    assert received.layers == frame.layers
    assert torch.equal(split.decode(received), mae.decompress(frame.layers, 16))
    assert split.decode_batch([received, received.prefix(1)])[1].shape == (16, 32)
