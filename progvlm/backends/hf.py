"""Hugging Face `transformers` VLMs as a backend, split at the visual tokens.

Supported families (transformers 5.23), one class each in hf_families.py, mapped from the
config's `model_type` (hf_families.FAMILIES); this backend delegates what differs to them:

* Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`):
  SigLIP-style vision encoder -> pixel-shuffle connector -> `<image>` positions of the LM.
* LLaVA (`LlavaForConditionalGeneration`): CLIP-style vision tower (hidden state of
  `vision_feature_layer`, CLS dropped under the "default" strategy) -> multi-modal projector ->
  `<image>` positions of the LM.

The split point is the tensor the model itself scatters into the image-token positions of
`inputs_embeds` (`model.get_image_features(...).pooler_output`, i.e. after the connector /
projector).  The edge half computes it with the model's own method; the cloud half rebuilds
the expanded prompt, embeds it with the LM's input embeddings, writes the received tokens into
the image-token positions with `masked_scatter` (as the model's forward does) and decodes
greedily.  Every op on both sides is the one the unsplit model runs, so
`cloud_half(edge_half(im), q)` generates exactly the tokens of `answer(im, q)`.

How the cloud knows the prompt layout: the processor expands each `<image>` placeholder into
a family-specific run of tokens whose length must equal N.  The cloud builds that expansion
with the processor's own `replace_image_token` hook, so it is the very string the processor
would build, then tokenizes the expanded prompt with the processor's tokenizer (the processor
passes no extra text kwargs for these families; the tests check the ids match).

* LLaVA: N is fixed by the image processor's crop size; the expansion is computed once from
  a blank dummy image.
* Idefics3 / SmolVLM without image splitting (this backend's default): N = image_seq_len,
  expansion `<fake><global-img><image>*N<fake>`.
* Idefics3 / SmolVLM *with* image splitting: N = image_seq_len * (rows*cols + 1), and the
  prompt also carries `<row_r_col_c>` tags, so the cloud needs the tile grid, which cannot be
  recovered from N alone (2x3 vs 3x2).  Use `edge_half_with_grid` on the edge and pass
  `grid=` to `cloud_half`.  That is why splitting is off by default here: with it off the
  plain `edge_half` / `cloud_half` interface is self-describing.  (Real SmolVLM checkpoints
  enable splitting by default; turning it off costs some detail on large images.)
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .base import Answer, VLMBackend, top2_probs, with_confidence
from .hf_families import HFFamily, family_class


class HFVLMBackend(VLMBackend):
    """A `transformers` image-text-to-text model split at the visual tokens.

    Build it from a loaded model + processor (tests) or with `HFVLMBackend.load(...)`.
    `image_splitting` (Idefics3/SmolVLM only): False (default) forces one global image per
    picture, True forces the processor's tiling, None keeps the processor's own setting.
    Whatever it is, it is passed identically to every processor call (edge and whole model).
    """

    def __init__(self, model, processor, model_id: str | None = None,
                 image_splitting: bool | None = False):
        family = family_class(model.config)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        cfg = model.config
        self.model_id = model_id or f"hf:{getattr(cfg, '_name_or_path', '') or type(model).__name__}"
        self.token_dim = cfg.text_config.hidden_size
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:  # older LLaVA configs
            self.image_token_id = cfg.image_token_index
        self.image_token = processor.image_token
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise ValueError(
                f"{family.name}: processor's image token {self.image_token!r} has id "
                f"{self.tokenizer.convert_tokens_to_ids(self.image_token)}, the model expects "
                f"{self.image_token_id}")
        #: the family's prompt layout, image features and tile layouts (hf_families.py)
        self.model_family: HFFamily = family(self.model, processor, image_splitting)

    @property
    def family(self) -> str:
        """The family's name (records, the page): "idefics3" or "llava" here."""
        return self.model_family.name

    @property
    def tokens_per_block(self) -> int:
        """Visual tokens of one image (LLaVA) or one tile (Idefics3/SmolVLM)."""
        return self.model_family.tokens_per_block

    @property
    def input_size(self) -> int:
        """The longest side of the frame the processor works from (the family's)."""
        return self.model_family.input_size

    def check_layout(self, num_tokens: int, grid) -> None:
        """The family's layouts (hf_families.py): LLaVA a fixed one, Idefics3 tile grids."""
        self.model_family.check_layout(self.model_id, num_tokens, grid)

    @classmethod
    def load(cls, model_id_or_folder: str | Path, local_files_only: bool = True,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             **kwargs) -> "HFVLMBackend":
        """Model + processor from a Hub id or a local folder (offline unless told otherwise).

        The config is read first so an unsupported architecture fails before any weights load.
        Extra kwargs (e.g. image_splitting) go to the constructor.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        src = str(model_id_or_folder)
        config = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
        family_class(config)
        model = AutoModelForImageTextToText.from_pretrained(
            src, dtype=dtype, local_files_only=local_files_only).to(device)
        try:
            processor = AutoProcessor.from_pretrained(src, local_files_only=local_files_only)
        except ImportError as e:
            if "torchvision" not in str(e).lower():
                raise
            # SmolVLM2 checkpoints ship a video processor that transformers builds on torchvision
            raise ValueError(
                f"{src}: its processor needs torchvision (SmolVLM2 checkpoints, model_type "
                f"{config.model_type}, carry a video processor). progvlm pins torch==2.13.0 (CPU), "
                "for which PyPI has no matching torchvision; install a matching pair (e.g. "
                "torch==2.9.1 torchvision==0.24.1) in a separate environment to use this model, "
                "or use a SmolVLM (v1) / Idefics3 / LLaVA checkpoint") from None
        commit = getattr(config, "_commit_hash", None)  # set for Hub snapshots only
        model_id = f"hf:{src}" + (f"@{commit[:12]}" if commit else "")
        return cls(model, processor, model_id=model_id, **kwargs)

    # ---- prompts ---------------------------------------------------------------------------

    def prompt(self, question: str) -> str:
        """The un-expanded text prompt: one image placeholder, then the question."""
        if self.image_token in question:
            raise ValueError(f"question must not contain the image token {self.image_token!r}")
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
            if isinstance(text, list):
                text = text[0]
        else:
            text = self.model_family.fallback_prompt.format(question=question)
        if text.count(self.image_token) != 1:
            raise ValueError(f"{self.family}: the prompt must hold exactly one "
                             f"{self.image_token!r}, got {text!r}")
        return text

    def _prompt_ids(self, question: str, n_tokens: int, grid=None) -> dict:
        text = self.prompt(question)
        text = text.replace(self.image_token, self.model_family.expansion(n_tokens, grid), 1)
        enc = self.tokenizer([text], return_tensors="pt")
        n_slots = int((enc["input_ids"] == self.image_token_id).sum())
        if n_slots != n_tokens:
            raise ValueError(f"{self.family}: got {n_tokens} visual tokens but the prompt has "
                             f"{n_slots} image positions")
        return {k: enc[k].to(self.model.device) for k in ("input_ids", "attention_mask")}

    # ---- the halves ------------------------------------------------------------------------

    def _processor_inputs(self, image: Image.Image, question: str):
        inputs = self.processor(images=[image.convert("RGB")], text=[self.prompt(question)],
                                return_tensors="pt", **self.model_family.images_kwargs)
        # BatchFeature.to casts floating tensors only (pixel_values), not ids/masks.
        return inputs.to(self.model.device, dtype=self.model.dtype)

    def preprocess(self, image: Image.Image):
        """The processor's pixels for one image. The prompt does not change pixel_values; it
        goes through the processor so that the image kwargs are merged exactly as in answer()."""
        return self._processor_inputs(image, "")

    @torch.no_grad()
    def vision(self, model_input) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Visual tokens plus the Idefics3 tile grid (None for LLaVA) needed by cloud_half."""
        return self.model_family.image_features(model_input), self.model_family.grid(model_input)

    @torch.no_grad()
    def cloud_half(self, tokens: torch.Tensor, question: str, max_new_tokens: int = 32,
                   grid: tuple[int, int] | None = None) -> Answer:
        ids, embeds = self._prompt_embeds(tokens, question, grid)
        # input_ids travel along so logits processors (repetition penalty, ...) see the same
        # history as in answer(); inputs_embeds replaces them in the first forward only.
        probs = _Top2Recorder()
        out = self.model.generate(input_ids=ids[None], inputs_embeds=embeds[None],
                                  attention_mask=torch.ones_like(ids)[None],
                                  **self._gen(max_new_tokens, probs))
        return self._decode(out[0, len(ids):], probs.row(0))

    def _prompt_embeds(self, tokens: torch.Tensor, question: str,
                       grid) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (T,), embeds (T, H)) of the prompt cloud_half builds around `tokens` (N, D):
        the LM's input embeddings with the tokens written into the image positions by
        masked_scatter, as the model's forward does."""
        if tokens.ndim != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"expected visual tokens (N, {self.token_dim}), got {tuple(tokens.shape)}")
        ids = self._prompt_ids(question, tokens.shape[0], grid)["input_ids"][0]
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        return ids, embeds.masked_scatter(slots, tokens.to(embeds.device, embeds.dtype))

    #: cloud_half_batch runs one left-padded batch through generate (not a loop)
    batches_language = True

    @torch.no_grad()
    def cloud_half_batch(self, tokens: list[torch.Tensor], questions: list[str],
                         max_new_tokens: int = 32, grids=None) -> list[Answer]:
        """cloud_half for many requests in one generate call: each prompt built exactly as
        cloud_half builds it, left-padded with the pad token and masked out (positions come
        from the attention mask, so every row's positions are its own).

        Padding changes the shapes the kernels see, so logits can differ from the unbatched
        ones in the last bits; the greedy answers of the tiny random models are equal
        (tests/test_batching.py), a real model's could differ where two tokens nearly tie,
        as with any batched serving (vLLM included)."""
        grids = grids if grids is not None else [None] * len(tokens)
        rows = [self._prompt_embeds(t, q, g) for t, q, g in zip(tokens, questions, grids)]
        if not rows:
            return []
        probs = _Top2Recorder()
        gen = self._gen(max_new_tokens, probs)
        pad = gen.get("pad_token_id", self.model.generation_config.pad_token_id)
        longest = max(len(ids) for ids, _ in rows)
        embed_pad = self.model.get_input_embeddings()(torch.tensor([pad], device=self.model.device))
        batch_ids = torch.full((len(rows), longest), pad, dtype=rows[0][0].dtype,
                               device=self.model.device)
        mask = torch.zeros_like(batch_ids)
        batch_embeds = embed_pad.expand(len(rows), longest, -1).clone()
        for i, (ids, embeds) in enumerate(rows):
            batch_ids[i, longest - len(ids):] = ids
            mask[i, longest - len(ids):] = 1
            batch_embeds[i, longest - len(ids):] = embeds
        out = self.model.generate(input_ids=batch_ids, inputs_embeds=batch_embeds,
                                  attention_mask=mask, **gen)
        return [self._decode(row[longest:], probs.row(i)) for i, row in enumerate(out)]

    @torch.no_grad()
    def answer(self, image: Image.Image, question: str, max_new_tokens: int = 32) -> Answer:
        inputs = self._processor_inputs(image, question)
        probs = _Top2Recorder()
        out = self.model.generate(**inputs, **self._gen(max_new_tokens, probs))
        return self._decode(out[0, inputs["input_ids"].shape[1]:], probs.row(0))

    @torch.no_grad()
    def gives_answers(self, tokens: list[torch.Tensor], questions: list[str], answers: list[Answer],
                      max_new_tokens: int = 32, grids=None) -> list[bool]:
        """The refinement probe's check without generating, where generate() picks the plain
        argmax (no score-changing processor in the generation config, else the default): one
        left-padded teacher-forced pass of every prompt and answer says whether each answer
        token, then a stop, is the argmax after the ones before. A request it does not confirm
        (a different answer, or one whose special tokens _decode dropped) is answered and
        compared as the default does, so the result is the default's."""
        if not self._argmax_is_plain() or not tokens:
            return super().gives_answers(tokens, questions, answers, max_new_tokens, grids)
        grids = grids if grids is not None else [None] * len(tokens)
        stop = self._stop_ids()
        embed = self.model.get_input_embeddings()
        rows = []
        for t, q, g, a in zip(tokens, questions, grids, answers):
            said = torch.as_tensor(a.token_ids, dtype=torch.long, device=self.model.device)
            rows.append(torch.cat([self._prompt_embeds(t, q, g)[1], embed(said)]))
        longest, keep = max(len(r) for r in rows), max(len(a.token_ids) for a in answers) + 1
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=self.model.device)
        batch = embed.weight.new_zeros(len(rows), longest, rows[0].shape[-1])
        for i, r in enumerate(rows):  # left-padded: every row's answer ends in the last column
            batch[i, longest - len(r):], mask[i, longest - len(r):] = r, 1
        out = self.model(inputs_embeds=batch, attention_mask=mask, use_cache=False,
                         position_ids=(mask.cumsum(-1) - 1).clamp_min(0), logits_to_keep=keep)
        best = out.logits.argmax(-1).tolist()  # (B, keep): the last keep positions' choices
        confirmed = []
        for i, a in enumerate(answers):
            n = len(a.token_ids)
            got = best[i][keep - n - 1:]  # each answer token's prediction, then the next one's
            confirmed.append(n <= max_new_tokens and got[:n] == list(a.token_ids)
                             and (n == max_new_tokens or got[n] in stop))
        rest = [i for i, ok in enumerate(confirmed) if not ok]
        if rest:
            again = super().gives_answers([tokens[i] for i in rest], [questions[i] for i in rest],
                                          [answers[i] for i in rest], max_new_tokens,
                                          [grids[i] for i in rest])
            for i, same in zip(rest, again):
                confirmed[i] = same
        return confirmed

    #: generation-config fields that, set, add a logits processor changing generate()'s choice
    _SCORE_CHANGING = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                       "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length",
                       "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
                       "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                       "exponential_decay_length_penalty", "renormalize_logits")

    def _argmax_is_plain(self) -> bool:
        """Greedy generate() picks the argmax of the model's own logits (the config sets none of
        _SCORE_CHANGING away from transformers' defaults)."""
        from transformers import GenerationConfig
        default, config = GenerationConfig(), self.model.generation_config
        return all(getattr(config, f, None) == getattr(default, f, None) for f in self._SCORE_CHANGING)

    # ---- generation helpers ----------------------------------------------------------------

    def _gen(self, max_new_tokens: int, probs: "_Top2Recorder | None" = None) -> dict:
        """generate()'s greedy settings; with `probs`, it records each step's top-2
        probabilities (what the answer's confidence is made of)."""
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        if probs is not None:
            from transformers import LogitsProcessorList
            kw["logits_processor"] = LogitsProcessorList([probs])
        if getattr(self.model.generation_config, "pad_token_id", None) is None:
            pad = self.tokenizer.pad_token_id
            kw["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        return kw

    def _stop_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        return stop

    def _decode(self, new_ids: torch.Tensor, top2: torch.Tensor | None = None) -> Answer:
        """Cut at the first end-of-sequence token, then drop special tokens (pad, ...). With
        `top2` (steps, 2) from _Top2Recorder, the confidence over the generated tokens up to
        the stop token, included (the decision to stop is part of the answer)."""
        ids = new_ids.tolist()
        stop = self._stop_ids()
        generated = len(ids)
        for i, t in enumerate(ids):
            if t in stop:
                ids, generated = ids[:i], i + 1
                break
        special = set(self.tokenizer.all_special_ids)
        ids = [t for t in ids if t not in special]
        answer = Answer(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids)
        if top2 is None or not generated:
            return answer
        return with_confidence(answer, top2[:generated, 0], top2[:generated, 1])

    # ---- distillation (MAE training) -------------------------------------------------------

    def answer_logits(self, tokens: torch.Tensor, question: str, answer_ids,
                      grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The LM's logits (len(answer_ids), V) for each answer token, teacher-forced after
        exactly the prompt cloud_half builds around `tokens`: row j predicts answer_ids[j].

        Differentiable with respect to `tokens` (the MAE distils through it); the model's
        weights are used as they are, never updated here."""
        prompt, prompt_embeds = self._prompt_embeds(tokens, question, grid)
        answer = torch.as_tensor(answer_ids, dtype=prompt.dtype).to(prompt.device).view(-1)
        n_answer = len(answer)
        if n_answer == 0:
            return tokens.new_zeros(0, self.model.config.text_config.vocab_size)
        # image positions of the prompt only: an answer id equal to the image token stays text
        embeds = torch.cat([prompt_embeds, self.model.get_input_embeddings()(answer)])[None]
        # the last n_answer + 1 positions hold prompt_len-1 .. prompt_len+n_answer-1; the very
        # last predicts past the answer, so it is dropped (and the prompt's logits never built)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=n_answer + 1,
                         use_cache=False)
        return out.logits[0, :-1]


class _Top2Recorder:
    """A logits processor, last in generate()'s list, that changes nothing and keeps each
    step's top-2 probabilities of the scores greedy decoding picks from: (B, 2) per step,
    two floats a row instead of the vocabulary that output_scores would keep."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(top2_probs(scores).cpu())
        return scores

    def row(self, i: int) -> torch.Tensor | None:
        """(steps, 2) of batch row i; None if generate ran no step."""
        return torch.stack([step[i] for step in self.steps]) if self.steps else None
