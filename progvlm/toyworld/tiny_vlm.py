"""The bundled default VLM: a small model with the structure of a real one.

    image (3×S×S) ─► vision encoder (conv stem + ViT blocks) ─► projector ─► visual tokens N×D
    [visual tokens ; <bos> question <sep>] ─► causal LM ─► answer tokens (greedy)

The language model reads the visual tokens as a prefix of input embeddings, as LLaVA-style
VLMs do, so the split between edge (vision half) and cloud (language half) sits exactly at the
visual tokens. Training-only parts (unused at inference, listed so nobody mistakes them for the
model's interface): the per-cell alignment of visual tokens with the LM's attribute words, a
column/row head, the attention capture of two LM heads taught where to look, and a relation
probe on the LM's state. Together they
make the model trainable in half an hour on a CPU (see README, "what was tried").
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import Block, KVCache
from .questions import EOS, PAD, VOCAB, WORD_TO_ID
from .scenes import COLOURS, GRID, SHAPES, SIZES


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
    # training-only: which LM layer has a head taught to look at the objects a question is
    # about (attention supervision from the scene's ground truth)
    focus_layer: int = 2

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


FOCUS_HEADS = 2  # heads of cfg.focus_layer taught where to look (see training_losses)
RELATION_WORDS = ("left", "right", "above", "below")  # the words that name a spatial relation


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (grid*grid, dim): x and y are linear-readable
    from the start, which "left of" and left-to-right descriptions need."""
    q = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(q) / q))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for c in (xs.reshape(-1), ys.reshape(-1)):
        ang = c[:, None] * freqs[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, 1) * 0.5


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
        self.pos = nn.Parameter(sincos_2d(cfg.grid, w)[None].clone())
        self.blocks = nn.ModuleList(Block(w, cfg.vision_heads) for _ in range(cfg.vision_layers))
        self.ln = nn.LayerNorm(w)

    def forward(self, pixels):
        x = self.stem(pixels).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x, _ = blk(x, causal=False)
        return self.ln(x)


class LanguageModel(nn.Module):
    """A causal transformer LM over text embeddings with a block of visual-token embeddings.

    Text tokens and visual tokens have position tables of their own, so a visual token's
    position (its grid cell) means the same wherever the block sits in the sequence."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        D = cfg.token_dim
        self.tok = nn.Embedding(cfg.vocab_size, D)
        self.pos_text = nn.Parameter(torch.zeros(cfg.max_text_len, D))
        self.pos_visual = nn.Parameter(sincos_2d(cfg.grid, D).clone())
        self.blocks = nn.ModuleList(Block(D, cfg.lm_heads) for _ in range(cfg.lm_layers))
        self.ln = nn.LayerNorm(D)

    def forward_embeds(self, x, past: KVCache | None = None, key_mask=None):
        """Run embeddings x (B, T, D), positions already added, after `past`; key_mask
        (B, P+T), optional, hides padding (see progvlm.models.layers.Attention).
        Returns final hidden states and the (k, v) of this segment, one pair per layer."""
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, causal=True, past=None if past is None else past[i], key_mask=key_mask)
            new.append(kv)
        return self.ln(x), new

    def embed_text(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.tok(ids) + self.pos_text[start:start + ids.shape[1]]

    def embed_text_at(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (B, T) at text positions (B, T): each row of a batch where it stands."""
        return self.tok(ids) + self.pos_text[positions]

    def embed_visual(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.pos_visual

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
        # Training-only alignment of visual tokens with words: each cell's token is scored
        # against the LM's own embeddings of the attribute words (colour, shape, size) of the
        # object centred there, or a learned "none". Tokens then carry "red"+"circle"+"large"
        # in the very space the question's words live in, so the LM's attention can match a
        # question to an object almost from the start (as LLaVA's projector pre-alignment).
        self.aux_word_ids = [[WORD_TO_ID[w] for w in words] for words in (COLOURS, SHAPES, SIZES)]
        self.aux_none = nn.Parameter(torch.zeros(3, cfg.token_dim))
        self.aux_scale = nn.Parameter(torch.tensor(5.0))
        # training-only: an object's token also states its grid column and row, so attention
        # that retrieves an object retrieves where it is ("left of", left-to-right order)
        self.aux_position = nn.Linear(cfg.token_dim, 2 * cfg.grid)
        # training-only: where an answer word is about two objects (A and B of "is A left of B"),
        # the LM's state after the focus layer states whether A is left of B and whether A is
        # above B. Without it, "left of" and "right of" pull any position feature in opposite
        # directions (averaged over relations, the yes/no answer correlates with no single
        # feature: an XOR), and spatial questions sit at chance however long training runs.
        # It also names the relation the question asks about, so that the last layer finds
        # both halves of the answer already in place and only has to combine them.
        self.aux_relation = nn.Sequential(nn.LayerNorm(cfg.token_dim),
                                          nn.Linear(cfg.token_dim, 2 + len(RELATION_WORDS)))
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
    def _prompt(self, tokens: torch.Tensor, prompt_ids: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """The LM input for visual tokens (B, N, D) and prompts <bos> question <sep> (B, Tq):
        the visual tokens first, then the text (LLaVA's layout). positions (B, Tq): each text
        token's position, where the prompts are left-padded (default 0..Tq-1)."""
        text = (self.lm.embed_text(prompt_ids) if positions is None
                else self.lm.embed_text_at(prompt_ids, positions))
        return torch.cat([self.lm.embed_visual(tokens), text], 1)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, question_ids, max_new: int = 16,
                 timings: dict | None = None, probs: dict | None = None):
        """Greedy answers. tokens (B, N, D); question_ids: (B, Tq) = <bos> words <sep>, or a
        list of B such id lists of any lengths. Returns (B, ≤max_new) answer ids, ending at
        <eos> (or padded with it).

        Prompts of different lengths are left-padded between the visual tokens and the text
        and the padding is masked out of every attention, with each row's text at its own
        positions: every row gets the tokens it gets alone (tests/test_batching.py). Each row
        stops where it would alone (<eos>, max_new or the model's max_text_len) and leaves the
        batch then, so a long answer does not keep finished rows computing.
        With `timings` given, adds prefill_ms (the prompt pass, first answer token included) and
        generation_ms (every further token). With `probs` given, adds "chosen" and "runner_up"
        (B, steps): the softmax probability of each generated token and of the best other
        token at that step (NaN after a row stopped): what the answer's confidence is made of
        (progvlm.adaptive), at the cost of one softmax per step."""
        rows = question_ids.tolist() if isinstance(question_ids, torch.Tensor) else question_ids
        B, L = tokens.shape[0], self.cfg.max_text_len
        if len(rows) != B:
            raise ValueError(f"{B} sets of visual tokens but {len(rows)} questions")
        lengths = torch.tensor([len(r) for r in rows])
        longest = int(lengths.max())
        if longest >= L:
            raise ValueError(f"question too long: {longest - 2} words, this model "
                             f"reads at most {L - 3}")
        eos, pad = WORD_TO_ID[EOS], WORD_TO_ID[PAD]
        # left padding: the last prompt token of every row sits in the last column
        ids = torch.tensor([[pad] * (longest - len(r)) + list(r) for r in rows])
        padded = bool((lengths < longest).any())
        key_mask = positions = None
        if padded:  # equal lengths keep the unmasked path: the very ops of a single request
            column = torch.arange(longest)[None]
            first = (longest - lengths)[:, None]
            positions = (column - first).clamp_min(0)
            key_mask = torch.cat([torch.ones(B, tokens.shape[1], dtype=torch.bool),
                                  column >= first], 1)
        t0 = time.perf_counter()
        hidden, cache = self.lm.forward_embeds(self._prompt(tokens, ids, positions),
                                               key_mask=key_mask)
        logits = self.lm.logits(hidden[:, -1])
        t1 = time.perf_counter()
        limits = (L - lengths).clamp_max(max_new)  # answer tokens each row may have
        pos = lengths.clone()  # the next token's text position, per row
        out = torch.full((B, int(limits.max())), eos)
        top2 = torch.full((2, B, out.shape[1]), float("nan")) if probs is not None else None
        active = torch.arange(B)  # rows still generating; finished ones leave the batch
        steps = 0
        for step in range(out.shape[1]):
            nxt = logits.argmax(-1)
            out[active, step] = nxt
            if top2 is not None:
                top2[:, active, step] = logits.float().softmax(-1).topk(2, -1).values.T
            steps = step + 1
            going = (nxt != eos) & (limits[active] > steps)  # as the row would alone
            if not bool(going.all()):
                if not bool(going.any()):
                    break
                keep = going.nonzero()[:, 0]
                active, nxt, pos = active[keep], nxt[keep], pos[keep]
                cache = [(k[keep], v[keep]) for k, v in cache]
                key_mask = None if key_mask is None else key_mask[keep]
            if key_mask is not None:
                key_mask = torch.cat([key_mask, torch.ones(len(active), 1, dtype=torch.bool)], 1)
            x = (self.lm.embed_text(nxt[:, None], int(pos[0])) if not padded
                 else self.lm.embed_text_at(nxt[:, None], pos[:, None]))
            hidden, new = self.lm.forward_embeds(x, cache, key_mask=key_mask)
            cache = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                     for (pk, pv), (k, v) in zip(cache, new)]
            logits = self.lm.logits(hidden[:, -1])
            pos += 1
        if timings is not None:
            timings["prefill_ms"] = (t1 - t0) * 1e3
            timings["generation_ms"] = (time.perf_counter() - t1) * 1e3
        if top2 is not None:
            probs["chosen"], probs["runner_up"] = top2[0, :, :steps], top2[1, :, :steps]
        return out[:, :steps]

    # ---- training -------------------------------------------------------------------------
    def teacher_forced_logits(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B*Q, T-1, V) for Q texts per image (<bos> q <sep> a <eos> <pad>…)
        after that image's visual tokens (B, N, D).

        Each image's visual prefix runs through the LM once and is shared by its Q texts
        (the same arithmetic as running each sequence whole, since the LM is causal)."""
        B, Q, T = text.shape
        _, prefix = self.lm.forward_embeds(self.lm.embed_visual(tokens))
        prefix = [(k.repeat_interleave(Q, 0), v.repeat_interleave(Q, 0)) for k, v in prefix]
        hidden, _ = self.lm.forward_embeds(self.lm.embed_text(text.reshape(B * Q, T)), prefix)
        return self.lm.logits(hidden[:, :-1])

    def aux_logits(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-token logits over (none, attribute words…) for colour, shape and size."""
        unit = F.normalize(tokens, dim=-1)
        out = []
        for i, ids in enumerate(self.aux_word_ids):
            cand = torch.cat([self.aux_none[i:i + 1], self.lm.tok.weight[ids]])
            out.append(self.aux_scale * unit @ F.normalize(cand, dim=-1).T)
        return out

    def training_losses(self, pixels, cells, text, answer_mask, focus=None):
        """pixels (B,3,S,S); cells (B, N, 3) per-cell targets; text (B, Q, T) token ids (<bos> q
        <sep> a <eos> <pad>…); answer_mask (B, Q, T) marks the targets to predict; focus
        (B, Q, T, N), optional: the cells each answer token is about.
        Returns (answer loss, token-word alignment loss, focus loss)."""
        B, Q, T = text.shape
        tokens = self.visual_tokens(pixels)
        # Object cells are ~5% of all cells: averaged together, "none" everywhere would look
        # solved while colours were never learned. Object and empty cells count half each.
        aux_loss = 0
        obj = cells[..., 0] > 0
        for i, a in enumerate(self.aux_logits(tokens)):
            ce = F.cross_entropy(a.reshape(-1, a.shape[-1]), cells[..., i].reshape(-1),
                                 reduction="none").view_as(obj)
            aux_loss = aux_loss + (ce[obj].mean() + ce[~obj].mean()) / 6
        if bool(obj.any()):
            G = self.cfg.grid
            col_row = torch.stack([torch.arange(G * G) % G, torch.arange(G * G) // G], -1)
            pos_logits = self.aux_position(tokens[obj]).view(-1, 2, G)
            target = col_row.expand(B, -1, -1)[obj]
            aux_loss = aux_loss + F.cross_entropy(pos_logits.reshape(-1, G), target.reshape(-1)) / 2
        focus_block = self.lm.blocks[min(self.cfg.focus_layer, self.cfg.lm_layers - 1)]
        probe = focus_block.attn
        probe.capture_heads = FOCUS_HEADS if focus is not None else 0
        after_focus = []
        hook = focus_block.register_forward_hook(lambda m, i, o: after_focus.append(o[0]))
        try:
            logits = self.teacher_forced_logits(tokens, text)
        finally:
            probe.capture_heads = 0
            hook.remove()
        target = text.view(B * Q, T)[:, 1:]
        mask = answer_mask.view(B * Q, T)[:, 1:]
        # every question weighs the same, whatever its answer's length: averaged per token, a
        # 12-word description outweighs a yes/no relation twelve times and "left of" stalls
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * mask
        per_question = ce.sum(1) / mask.sum(1).clamp_min(1)
        lm_loss = per_question[mask.any(1)].mean()
        focus_loss = torch.zeros(())
        if focus is not None:
            # hidden state t predicts token t+1: head h should look at token t+1's objects
            want = focus.view(B * Q, T, FOCUS_HEADS, -1)[:, 1:].transpose(1, 2)
            attn = probe.captured[:, :, :-1]
            rows = want.any(-1)
            focus_loss = -torch.log((attn[rows] * want[rows]).sum(-1) + 1e-6).mean()
            probe.captured = None
            focus_loss = focus_loss + self._relation_loss(after_focus[-1][:, :-1], want, text.view(B * Q, T))
        return lm_loss, aux_loss, focus_loss

    def _relation_loss(self, hidden, want, text):
        """hidden (B*Q, T-1, D) after the focus layer; want (B*Q, 2, T-1, N) the cells each
        taught head should see; text (B*Q, T). Where each head sees exactly one object (A, B),
        the state should tell A's column < B's column and A's row < B's row, and which
        relation word (if any) the question holds."""
        single = want.sum(-1) == 1  # (B*Q, 2, T-1)
        rows = single[:, 0] & single[:, 1]
        if not bool(rows.any()):
            return torch.zeros(())
        G = self.cfg.grid
        cell_a = want[:, 0].float().argmax(-1)[rows]
        cell_b = want[:, 1].float().argmax(-1)[rows]
        target = torch.stack([cell_a % G < cell_b % G, cell_a // G < cell_b // G], -1).float()
        out = self.aux_relation(hidden[rows])
        loss = F.binary_cross_entropy_with_logits(out[:, :2], target)
        word_ids = torch.tensor([WORD_TO_ID[w] for w in RELATION_WORDS])
        has_word = (text[:, :, None] == word_ids).any(1)  # (B*Q, relations)
        which = has_word.float().argmax(-1)[:, None].expand(-1, rows.shape[1])[rows]
        asks = has_word.any(-1)[:, None].expand(-1, rows.shape[1])[rows]
        if bool(asks.any()):
            loss = loss + F.cross_entropy(out[asks, 2:], which[asks])
        return loss


