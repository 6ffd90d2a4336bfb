"""The Meta AutoEncoder (MAE): visual tokens → L progressive layers → visual tokens.

Layer scheme: entropy-constrained residual vector quantisation (EC-RVQ) of a per-token latent,
by default; the quantiser is a module the MAE is built with (MAEConfig.quantiser, see
progvlm/models/quantisers.py), and the MAE only calls its public methods.

    edge:  tokens (N×D) ─► per-token MLP ─► z (N×d) ─► quantiser stage 1..L ─► indices (L×N)
    cloud: quantiser.get_output_from_indices(idx_1..k) (N×d), k ─► transformer decoder told k
           ─► tokens (N×D)

Why this scheme (see README "MAE design" for the measurements):
  * residual stages make every prefix meaningful by construction: stage l codes what stages
    1..l-1 left, so decoding k stages is always a coarser version of decoding k+1;
  * the encoder is per-token and tiny, so the edge pays almost nothing for it; the decoder,
    on the GPU side, is a small transformer that sees all tokens and k, so it can infer what
    the coarse layers leave out (one decoder for every rate: the "meta" in MAE);
  * the assignment to a code minimises distortion + λ·(code length in bits) under each
    stage's code frequencies (entropy-constrained VQ), so frequent codes such as "plain
    background" cost a fraction of a bit after arithmetic coding, and the rate lands on the
    few tokens that carry objects.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ASSETS
from ..codec import bitstream, entropy
from ..codec.tables import MAEEncoderTables
from .saved import read_saved
from .layers import Block
from .quantisers import Quantiser, build_quantiser

DEFAULT_MAE = ASSETS / "mae"


@dataclass
class MAEConfig:
    vlm_id: str = "unknown"
    num_tokens: int = 64  # N
    token_dim: int = 128  # D
    latent_dim: int = 32  # d
    num_layers: int = 4  # L
    codebook_size: int = 128  # K per stage
    encoder_hidden: int = 256
    decoder_width: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    # λ per stage: how many "typical distortions" one bit is worth in the code assignment
    rate_lambda: list = field(default_factory=lambda: [0.2, 0.1, 0.05, 0.02])
    quantiser: str = "rvq"  # a name in progvlm.models.quantisers.QUANTISERS

    def to_dict(self) -> dict:
        """The config as config.json and the fingerprint hold it. The quantiser is named only
        when it is not the default: an MAE saved before quantisers had names keeps its
        fingerprint, and its config.json (with no name) still loads as ResidualVQ."""
        d = asdict(self)
        if d["quantiser"] == MAEConfig.quantiser:
            del d["quantiser"]
        return d

    @classmethod
    def for_tokens(cls, num_tokens: int, token_dim: int, **overrides) -> "MAEConfig":
        """The config for blocks of N visual tokens of width D, the MAE's width following D.

        D = 128 (the bundled VLM) gives exactly the default sizes (latent 32, encoder 256,
        decoder 128, 4 heads). Wider tokens get a wider MAE, capped at a 512-wide decoder
        (D = 576 for SmolVLM-256M up to 4096 for LLaVA-7B): the code rate is set by the
        codebooks, not the width, and the decoder only has to read a latent of width/4."""
        width = min(512, max(128, -(-token_dim // 64) * 64))  # D rounded up to 64, in 128..512
        sizes = dict(num_tokens=num_tokens, token_dim=token_dim, latent_dim=width // 4,
                     encoder_hidden=2 * width, decoder_width=width,
                     decoder_heads=max(4, width // 64))
        return cls(**{**sizes, **overrides})


class MAE(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if not 1 <= cfg.num_layers <= bitstream.MAX_LAYERS:
            raise ValueError(f"an MAE has 1..{bitstream.MAX_LAYERS} layers (what the bitstream "
                             f"carries), not {cfg.num_layers}")
        self.cfg = cfg
        D, d, W = cfg.token_dim, cfg.latent_dim, cfg.decoder_width
        self.register_buffer("token_mean", torch.zeros(D))
        self.register_buffer("token_std", torch.ones(D))
        self.encoder = nn.Sequential(nn.Linear(D, cfg.encoder_hidden), nn.GELU(),
                                     nn.Linear(cfg.encoder_hidden, d))
        quantiser = build_quantiser(cfg)
        self._quantiser_name = quantiser.weights_prefix
        self.add_module(quantiser.weights_prefix, quantiser)
        self.dec_in = nn.Linear(d, W)
        self.dec_pos = nn.Parameter(torch.zeros(1, cfg.num_tokens, W))
        self.dec_k = nn.Embedding(cfg.num_layers + 1, W)  # the decoder is told k
        self.dec_blocks = nn.ModuleList(Block(W, cfg.decoder_heads) for _ in range(cfg.decoder_layers))
        self.dec_out = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, D))

    @property
    def quantiser(self) -> Quantiser:
        """The quantiser module (saved under its weights_prefix: rvq.* for ResidualVQ)."""
        return self._modules[self._quantiser_name]

    @property
    def num_layers(self) -> int:
        """L: the layers this MAE codes (1..bitstream.MAX_LAYERS)."""
        return self.cfg.num_layers

    # ---- the two halves ----------------------------------------------------------------
    def encode_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., N, D) → latent (..., N, d)."""
        return self.encoder((tokens - self.token_mean) / self.token_std)

    def decode_latent(self, latent: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
        """Σ of the first k stages (B, N, d), k (B,) or int → tokens (B, N, D)."""
        B = latent.shape[0]
        k = torch.as_tensor(k).expand(B) if not torch.is_tensor(k) or k.dim() == 0 else k
        x = self.dec_in(latent) + self.dec_pos + self.dec_k(k)[:, None]
        for blk in self.dec_blocks:
            x, _ = blk(x, causal=False)
        return self.dec_out(x) * self.token_std + self.token_mean

    # ---- differentiable path, for training ----------------------------------------------------
    def forward(self, tokens: torch.Tensor, k: torch.Tensor, update_codebooks: bool = True):
        """tokens (B, N, D), k (B,) in 1..L → reconstruction (B, N, D), commitment loss.
        Straight-through: the decoder's gradient reaches the encoder as if quantisation
        were the identity."""
        B, N, _ = tokens.shape
        z = self.encode_latent(tokens)
        _, cumulative, commit = self.quantiser.quantise(z.reshape(B * N, -1), update=update_codebooks)
        q_k = cumulative.view(self.num_layers, B, N, -1)[k - 1, torch.arange(B)]
        z_st = z + (q_k - z).detach()
        return self.decode_latent(z_st, k), commit

    # ---- bytes: what crosses the link ---------------------------------------------------
    def fingerprint(self) -> bytes:
        """4 bytes naming these exact weights (and config); written into every bitstream."""
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()[:bitstream.FINGERPRINT_BYTES]

    def check_belongs_to(self, backend):
        """Raise ValueError unless this MAE was trained on `backend`'s visual tokens."""
        if self.cfg.vlm_id != backend.model_id:
            raise ValueError(f"MAE {self.fingerprint().hex()} belongs to {self.cfg.vlm_id}, "
                             f"not to {backend.model_id}")

    def stage_models(self) -> list[entropy.StageModel]:
        """The range coder's model of each stage, from the quantiser's code frequencies."""
        return [entropy.StageModel(u) for u in self.quantiser.coding_tables()["usage"]]

    def _latent(self, tokens: torch.Tensor):
        """The edge's latent as a NumPy array: the folded encoder, no autograd bookkeeping,
        no copies."""
        with torch.inference_mode():
            return self.inference_encoder()(tokens.to(torch.float32)).numpy()

    def check_tokens(self, tokens: torch.Tensor):
        N, D = self.cfg.num_tokens, self.cfg.token_dim
        if tokens.ndim != 2 or tokens.shape[1] != D or tokens.shape[0] % N or not tokens.shape[0]:
            raise ValueError(f"expected tokens of shape (a multiple of {N}, {D}), "
                             f"got {tuple(tokens.shape)}")

    def compress(self, tokens: torch.Tensor, k: int | None = None) -> list[bytes]:
        """tokens (M, D), M a multiple of N (one block per image or tile) → the entropy-coded
        payloads of layers 1..k (default: all L), unframed: the caller packs them
        (progvlm.split.Split.pack, the versioned, checksummed bitstream)."""
        self.check_tokens(tokens)
        k = self.num_layers if k is None else k
        return self.edge_codec().encode_layers(self._latent(tokens), k)

    def check_layers(self, k: int, num_tokens: int):
        """ValueError unless k layers of num_tokens tokens are something this MAE decodes."""
        N = self.cfg.num_tokens
        if not 1 <= k <= self.num_layers or num_tokens <= 0 or num_tokens % N:
            raise ValueError(f"{k} layers of {num_tokens} tokens do not fit this MAE "
                             f"(1..{self.num_layers} layers, blocks of {N})")

    @torch.no_grad()
    def decompress_batch(self, streams: list[tuple[list[bytes], int]]) -> list[torch.Tensor]:
        """(payloads of layers 1..k, num_tokens) of many streams → their tokens (num_tokens, D),
        the decoder run once over all their blocks, each block told its own stream's k.
        Raises ValueError (check_layers) or EntropyDecodeError for the first stream this MAE
        cannot decode."""
        N = self.cfg.num_tokens
        latents, ks = [], []
        for layers, num_tokens in streams:
            self.check_layers(len(layers), num_tokens)
            idx = torch.from_numpy(self.edge_codec().decode_indices(layers, num_tokens))
            latents.append(self.quantiser.get_output_from_indices(idx).view(num_tokens // N, N, -1))
            ks += [len(layers)] * (num_tokens // N)
        if not latents:
            return []
        tokens = self.decode_latent(torch.cat(latents), torch.tensor(ks))
        return [block.reshape(-1, tokens.shape[-1])
                for block in tokens.split([num_tokens // N for _, num_tokens in streams])]

    def decompress(self, layers: list[bytes], num_tokens: int) -> torch.Tensor:
        """Payloads of layers 1..k → tokens (num_tokens, D), decoded with k: decompress_batch
        of one stream."""
        return self.decompress_batch([(layers, num_tokens)])[0]

    # cached per instance (the weights are frozen once trained); invalidate_caches() after loading
    def edge_codec(self) -> MAEEncoderTables:
        """The MAE's coding tables in NumPy (from the quantiser's coding_tables()): the edge's
        half of compress (assignment and entropy coding), and the range coder's models that
        decompress uses too."""
        if getattr(self, "_cached_codec", None) is None:
            self._cached_codec = MAEEncoderTables.from_mae(self)
        return self._cached_codec

    def inference_encoder(self) -> "FoldedEncoder":
        """encode_latent for frozen weights, with the token standardisation folded into the
        first linear layer (see FoldedEncoder): what compress and the ONNX export run."""
        if getattr(self, "_cached_encoder", None) is None:
            self._cached_encoder = FoldedEncoder(self)
        return self._cached_encoder

    def invalidate_caches(self):
        self._cached_codec = self._cached_encoder = None


class FoldedEncoder:
    """MAE.encode_latent of (M, D) tokens as two affine maps and a GELU, the standardisation
    (t − mean) / std folded into the first map: W·((t − m)/s) + b = (W/s)·t + (b − (W/s)·m).

    Two fewer full-size tensor ops per call, and addmm on pre-transposed weights instead of a
    Sequential of Linear modules. The fold is computed in float64 and rounded once, so the
    latent differs from encode_latent's by float32 rounding only (~1e-5 at most); the code
    indices, hence the bitstream, are the same on the bundled MAE (tests/test_mae.py).
    A plain object, not a submodule: the MAE's state_dict, hence its fingerprint, is unchanged."""

    def __init__(self, mae: "MAE"):
        first, second = mae.encoder[0], mae.encoder[2]
        with torch.no_grad():
            w1 = first.weight.double() / mae.token_std.double()  # (H, D): column j over std_j
            b1 = first.bias.double() - w1 @ mae.token_mean.double()
            self.w1_t = w1.T.float().contiguous()  # (D, H)
            self.b1 = b1.float()
            self.w2_t = second.weight.detach().T.contiguous()  # (H, d)
            self.b2 = second.bias.detach().clone()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (M, D) float32 → latent (M, d)."""
        return torch.addmm(self.b2, F.gelu(torch.addmm(self.b1, tokens, self.w1_t)), self.w2_t)


def load_mae(folder) -> MAE:
    """An MAE saved by train-mae (mae.safetensors + config.json)."""
    meta, state, _ = read_saved(folder, "mae.safetensors", "MAE", "train-mae")
    mae = MAE(MAEConfig(**meta["mae"]))
    mae.load_state_dict(state)
    mae.eval()
    mae.invalidate_caches()
    if mae.fingerprint().hex() != meta["fingerprint"]:
        raise ValueError(f"MAE weights in {folder} do not match the fingerprint in its config")
    return mae
