"""Transformer layers shared by the models: pre-norm blocks of multi-head attention and an MLP.

The MAE's decoder and the bundled VLM's vision encoder and language model are stacks of
`Block`; neither model file defines a layer of its own, and nothing here knows either model.
The parameter names (ln1, ln2, attn.qkv, attn.proj, mlp.0, mlp.2) are those of the saved
weights in assets/: renaming one breaks loading them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = list  # one (k, v) pair per layer; k, v: (B, heads, T, head_dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # training instrumentation: while capture_heads > 0, the forward keeps the attention of
        # heads 0..capture_heads-1 over the `past` keys in `captured` (B, heads, T, P)
        self.capture_heads = 0
        self.captured = None

    def forward(self, x, causal: bool, past=None, key_mask=None):
        """x: (B, T, D). past: (k, v) that every query of x also sees (a KV cache, or a
        shared visual prefix). key_mask (B, P+T), optional: False at keys no query may see
        (the padding of a batch of prompts of different lengths).
        Returns the output and this segment's (k, v)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if past is None and key_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal and T > 1))
        else:
            pk, pv = past if past is not None else (k[:, :, :0], v[:, :, :0])
            P = pk.shape[2]
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device)
            if causal:
                mask[:, P:] = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :]  # (B, 1, T, P+T)
            keys = torch.cat([pk, k], 2)
            out = F.scaled_dot_product_attention(q, keys, torch.cat([pv, v], 2), attn_mask=mask)
            if self.capture_heads:
                h = self.capture_heads
                scores = q[:, :h] @ keys[:, :h].transpose(-1, -2) / q.shape[-1] ** 0.5
                self.captured = scores.masked_fill(~mask, float("-inf")).softmax(-1)[..., :P]
        return self.proj(out.transpose(1, 2).reshape(B, T, D)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x)); the MLP 4× wide."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, causal: bool, past=None, key_mask=None):
        a, kv = self.attn(self.ln1(x), causal, past, key_mask)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv
