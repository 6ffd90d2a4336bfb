"""The bundled default VLM: a small model with the structure of a real one.

    image (3×S×S) ─► vision encoder (conv stem + ViT blocks) ─► projector ─► visual tokens N×D
    [visual tokens ; <bos> question <sep>] ─► causal LM ─► answer tokens (greedy)

The language model reads the visual tokens as a prefix of input embeddings, as LLaVA-style
VLMs do, so the split between edge (vision half) and cloud (language half) sits exactly at the
visual tokens. A per-cell auxiliary head on the visual tokens is used only in training: dense
supervision from the scene's ground truth makes the vision half converge in minutes on a CPU.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..questions import BOS, EOS, SEP, VOCAB, WORD_TO_ID
from ..scenes import COLOURS, GRID, SHAPES, SIZES


@dataclass
class TinyVLMConfig:
    image_size: int = 128
    grid: int = GRID  # visual tokens: grid × grid
    vision_width: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    token_dim: int = 128  # D: width of the visual tokens and of the language model
    lm_layers: int = 4
    lm_heads: int = 4
    vocab_size: int = len(VOCAB)
    max_text_len: int = 32  # <bos> question <sep> answer <eos>

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


KVCache = list  # one (k, v) pair per layer; k, v: (B, heads, T, head_dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, causal: bool, past=None):
        """x: (B, T, D). past: (k, v) that every query of x also sees (a KV cache, or a
        shared visual prefix). Returns the output and this segment's (k, v)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if past is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1)
        else:
            pk, pv = past
            P = pk.shape[2]
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device)
            if causal:
                mask[:, P:] = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            out = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2),
                                                 attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, D)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, causal: bool, past=None):
        a, kv = self.attn(self.ln1(x), causal, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class VisionEncoder(nn.Module):
    """Conv stem (4 stride-2 convs: S → S/16) then bidirectional transformer blocks."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        w = cfg.vision_width
        chans = [3, 32, 64, w, w]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GELU()]
        self.stem = nn.Sequential(*layers[:-1])
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_tokens, w))
        self.blocks = nn.ModuleList(Block(w, cfg.vision_heads) for _ in range(cfg.vision_layers))
        self.ln = nn.LayerNorm(w)

    def forward(self, pixels):
        x = self.stem(pixels).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x, _ = blk(x, causal=False)
        return self.ln(x)


class LanguageModel(nn.Module):
    """A causal transformer LM whose input may start with visual-token embeddings."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        D = cfg.token_dim
        self.tok = nn.Embedding(cfg.vocab_size, D)
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_tokens + cfg.max_text_len, D))
        self.blocks = nn.ModuleList(Block(D, cfg.lm_heads) for _ in range(cfg.lm_layers))
        self.ln = nn.LayerNorm(D)

    def forward_embeds(self, x, pos_offset: int, past: KVCache | None = None):
        """Run embeddings x (B, T, D) placed at positions pos_offset.. after `past`.
        Returns final hidden states and the (k, v) of this segment, one pair per layer."""
        x = x + self.pos[:, pos_offset:pos_offset + x.shape[1]]
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, causal=True, past=None if past is None else past[i])
            new.append(kv)
        return self.ln(x), new

    def logits(self, hidden):
        return hidden @ self.tok.weight.T  # tied input/output embeddings


class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.projector = nn.Sequential(nn.Linear(cfg.vision_width, cfg.token_dim), nn.GELU(),
                                       nn.Linear(cfg.token_dim, cfg.token_dim))
        self.lm = LanguageModel(cfg)
        # training-only: per-cell (colour, shape, size) of the object centred there, 0 = none
        self.aux_sizes = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
        self.aux_head = nn.Linear(cfg.token_dim, sum(self.aux_sizes))
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- the edge half -------------------------------------------------------------------
    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S), normalised → visual tokens (B, N, D)."""
        return self.projector(self.vision(pixels))

    # ---- the cloud half ------------------------------------------------------------------
    def prefill_visual(self, tokens: torch.Tensor) -> KVCache:
        _, cache = self.lm.forward_embeds(tokens, 0)
        return cache

    def _extend(self, cache: KVCache, ids: torch.Tensor, pos: int):
        hidden, new = self.lm.forward_embeds(self.lm.tok(ids), pos, cache)
        cache = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(cache, new)]
        return self.lm.logits(hidden[:, -1]), cache

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, question_ids: torch.Tensor, max_new: int = 16):
        """Greedy answers. tokens (B, N, D); question_ids (B, Tq) = <bos> words <sep>, all of one
        length. Returns (B, ≤max_new) answer ids, ending at <eos> (or padded with it)."""
        B, N = tokens.shape[:2]
        cache = self.prefill_visual(tokens)
        logits, cache = self._extend(cache, question_ids, N)
        pos = N + question_ids.shape[1]
        out, done = [], torch.zeros(B, dtype=torch.bool)
        eos = WORD_TO_ID[EOS]
        for _ in range(min(max_new, self.cfg.max_text_len - question_ids.shape[1])):
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            logits, cache = self._extend(cache, nxt[:, None], pos)
            pos += 1
        return torch.stack(out, 1)

    # ---- training -------------------------------------------------------------------------
    def teacher_forced_logits(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B*Q, T-1, V) for Q texts per image after its visual tokens.

        Each image's visual prefix runs through the LM once and is shared by its Q texts
        (the same arithmetic as running each sequence whole, since the LM is causal)."""
        B, Q, T = text.shape
        prefix = self.prefill_visual(tokens)
        prefix = [(k.repeat_interleave(Q, 0), v.repeat_interleave(Q, 0)) for k, v in prefix]
        hidden, _ = self.lm.forward_embeds(self.lm.tok(text.view(B * Q, T)), tokens.shape[1], prefix)
        return self.lm.logits(hidden[:, :-1])

    def training_losses(self, pixels, cells, text, answer_mask):
        """pixels (B,3,S,S); cells (B, N, 3) aux targets; text (B, Q, T) token ids (<bos> q
        <sep> a <eos> <pad>…); answer_mask (B, Q, T) marks the targets to predict."""
        B, Q, T = text.shape
        tokens = self.visual_tokens(pixels)
        aux = self.aux_head(tokens).split(self.aux_sizes, -1)
        aux_loss = sum(F.cross_entropy(a.reshape(-1, a.shape[-1]), cells[..., i].reshape(-1))
                       for i, a in enumerate(aux)) / 3
        logits = self.teacher_forced_logits(tokens, text)
        target = text.view(B * Q, T)[:, 1:]
        mask = answer_mask.view(B * Q, T)[:, 1:]
        lm_loss = F.cross_entropy(logits[mask], target[mask])
        return lm_loss, aux_loss


def question_ids(question_words: list[int]) -> list[int]:
    return [WORD_TO_ID[BOS]] + question_words + [WORD_TO_ID[SEP]]
