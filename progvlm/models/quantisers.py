"""The MAE's quantisers: latent (M, d) ⇄ L stages of code indices, as modules the MAE is built with.

What the MAE, its training, the coding tables and the cloud's decoder ask of a quantiser is the
`Quantiser` interface below, and nothing else (vector-quantize-pytorch style: the quantiser is a
module passed in, with public methods):

    quantise(z, update)               training and the reference coding: indices (L, M), the
                                      cumulative reconstructions (L, M, d), a commitment loss
    get_output_from_indices(indices)  the cloud: indices of stages 1..k (k, M) → Σ of their codes
    coding_tables()                   the edge (progvlm/codec/tables.py): per stage, the
                                      codebook, each code's cost (λ·bits) and code frequencies
    set_training_progress(step, n)    training's per-step schedule (the rate term's ramp)

The coding tables are the wire contract: an edge without PyTorch (NumPy, ONNX Runtime) assigns
each residual the code of least |c|² − 2r·c + cost and range-codes it under the frequencies, so a
quantiser is one whose stages can be written that way (any codebook, cost 0 for plain VQ).

A new quantiser is its class here (or anywhere) plus its entry in QUANTISERS; MAEConfig.quantiser
names it, and config.json carries the name (tests/test_mae.py adds one from the test file).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Quantiser(nn.Module):
    """The interface. `cfg` is the MAE's MAEConfig: num_layers (L), codebook_size (K),
    latent_dim (d), rate_lambda. Subclasses register their state (codebooks, statistics) as
    buffers or parameters: it is saved with the MAE and named in its fingerprint."""

    #: the name of the quantiser's submodule in the MAE, hence the prefix of its weights' keys
    weights_prefix: str = "quantiser"

    def __init__(self, cfg):
        super().__init__()
        self.num_layers = cfg.num_layers

    def quantise(self, z: torch.Tensor, update: bool = False):
        """z (M, d) → indices (L, M), cumulative reconstructions (L, M, d) (row l: the sum of
        stages 1..l+1), commitment loss. `update`: learn from z (training mode only)."""
        raise NotImplementedError

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (k, M) of stages 1..k → the latent they decode to (M, d)."""
        raise NotImplementedError

    def coding_tables(self) -> dict[str, np.ndarray]:
        """The edge's tables, as progvlm.codec.tables.MAEEncoderTables takes them: codebooks
        (L, K, d) float32, bit_cost (L, K) float32 (added to |c|² − 2r·c in the assignment),
        usage (L, K) float64 (the range coder's code frequencies)."""
        raise NotImplementedError

    def set_training_progress(self, step: int, steps: int) -> None:
        """Called by training before each step of `steps`, and with step == steps when done
        (the state inference uses). This default has no schedule."""


class ResidualVQ(Quantiser):
    """L stages of entropy-constrained VQ with EMA codebooks and usage counts."""

    weights_prefix = "rvq"  # the bundled MAE's weights say rvq.*: the prefix is part of them
    #: the fraction of training over which the rate term ramps in from 0
    RATE_RAMP = 0.4

    def __init__(self, cfg, decay: float = 0.99):
        super().__init__(cfg)
        L, K, d = cfg.num_layers, cfg.codebook_size, cfg.latent_dim
        self.decay = decay
        self.rate_lambda = list(cfg.rate_lambda) + [cfg.rate_lambda[-1]] * (L - len(cfg.rate_lambda))
        self.register_buffer("codebooks", torch.randn(L, K, d) * 0.1)
        self.register_buffer("ema_sum", self.codebooks.clone())
        self.register_buffer("ema_count", torch.ones(L, K))
        self.register_buffer("usage", torch.ones(L, K))  # code frequencies: the entropy model
        self.register_buffer("typical_dist", torch.ones(L))
        self.register_buffer("initialised", torch.zeros(L, dtype=torch.bool))
        # training ramps the rate term in from 0: with it at full strength from the start, the
        # most frequent code gets cheaper, hence more frequent, and later stages collapse
        self.rate_scale = 1.0

    def set_training_progress(self, step: int, steps: int) -> None:
        self.rate_scale = min(1.0, step / (self.RATE_RAMP * steps))

    def code_bits(self, layer: int) -> torch.Tensor:
        p = self.usage[layer] / self.usage[layer].sum()
        return -torch.log2(p.clamp_min(1e-6))

    def bit_cost(self, layer: int) -> torch.Tensor:
        """(K,): what a code of stage `layer` costs in the assignment: λ·(typical distortion)·bits."""
        lam = self.rate_lambda[layer] * self.rate_scale
        return lam * self.typical_dist[layer] * self.code_bits(layer)

    def assign(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """residual (M, d) → code indices (M,): argmin distortion + λ·bits."""
        cb = self.codebooks[layer]
        dist = (residual.pow(2).sum(1, keepdim=True) - 2 * residual @ cb.T + cb.pow(2).sum(1))
        return (dist + self.bit_cost(layer)).argmin(1)

    @torch.no_grad()
    def _update(self, layer: int, residual: torch.Tensor, idx: torch.Tensor):
        K = self.codebooks.shape[1]
        if not bool(self.initialised[layer]):  # start from data, not noise
            pick = torch.randperm(len(residual))[:K]
            self.codebooks[layer, :len(pick)] = residual[pick]
            self.ema_sum[layer, :len(pick)] = residual[pick]
            self.typical_dist[layer] = residual.pow(2).sum(1).mean()
            self.initialised[layer] = True
            return
        onehot = F.one_hot(idx, K).type_as(residual)
        count = onehot.sum(0)
        self.ema_count[layer].mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum[layer].mul_(self.decay).add_(onehot.T @ residual, alpha=1 - self.decay)
        self.usage[layer].mul_(self.decay).add_(count + 1e-3, alpha=1 - self.decay)
        self.codebooks[layer] = self.ema_sum[layer] / self.ema_count[layer].clamp_min(1e-5)[:, None]
        err = (residual - self.codebooks[layer][idx]).pow(2).sum(1).mean()
        self.typical_dist[layer].mul_(self.decay).add_(err, alpha=1 - self.decay)
        dead = self.ema_count[layer] < 1e-2  # restart unused codes on current residuals
        if bool(dead.any()):
            n = int(dead.sum())
            pick = residual[torch.randint(len(residual), (n,))]
            self.codebooks[layer, dead] = pick
            self.ema_sum[layer, dead] = pick
            self.ema_count[layer, dead] = 1.0

    def quantise(self, z: torch.Tensor, update: bool = False):
        residual, total = z, torch.zeros_like(z)
        indices, cumulative, commit = [], [], z.new_zeros(())
        for layer in range(self.num_layers):
            r = residual.detach()
            idx = self.assign(layer, r)
            if update and self.training:
                self._update(layer, r, idx)
            q = self.codebooks[layer][idx]
            commit = commit + F.mse_loss(residual, q.detach())
            residual = residual - q.detach()
            total = total + q
            indices.append(idx)
            cumulative.append(total)
        return torch.stack(indices), torch.stack(cumulative), commit

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return sum(self.codebooks[l][indices[l]] for l in range(len(indices)))

    def coding_tables(self) -> dict[str, np.ndarray]:
        """The bit costs are bit_cost's float32 values: the very expression assign() adds."""
        with torch.no_grad():
            return {"codebooks": self.codebooks.numpy().copy(),
                    "bit_cost": np.stack([self.bit_cost(l).numpy() for l in range(self.num_layers)]),
                    "usage": self.usage.double().numpy()}


#: MAEConfig.quantiser → the class the MAE is built with
QUANTISERS: dict[str, type[Quantiser]] = {"rvq": ResidualVQ}


def build_quantiser(cfg) -> Quantiser:
    """The quantiser MAEConfig `cfg` names; ValueError for a name nobody registered."""
    if cfg.quantiser not in QUANTISERS:
        raise ValueError(f"unknown quantiser {cfg.quantiser!r}; registered: {', '.join(QUANTISERS)}")
    return QUANTISERS[cfg.quantiser](cfg)
