"""Random-weight `transformers` VLM folders that stand in for real checkpoints, built offline.

Why this exists: nothing can be downloaded from the Hugging Face Hub here (and often not in CI
either), yet `HFVLMBackend` should be exercised end to end, and the README should show
`--vlm FOLDER` with a folder anyone can make.  `write_random_vlm(out, preset)` writes a folder
that `HFVLMBackend.load(out)` / `load_vlm(out)` read exactly like a downloaded checkpoint:
config.json + model.safetensors + generation_config.json (`save_pretrained`), and the processor
(tokenizer, image processor, processor config, chat template).

Random weights mean the answers are gibberish: such a folder measures timing, bytes on the
wire and the exactness of the edge/cloud split, never accuracy.  Every folder says so in
`progvlm_random.json`.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on a few sentences
(any text still encodes, byte by byte), the image processors are built from their classes, the
models from configs with `torch.manual_seed(seed)`, so a preset and a seed always give the same
weights.  Presets (see `PRESETS`):

* `tiny-idefics3`, `tiny-smolvlm`, `tiny-llava`: a few hundred kB, load in well under a second;
  for tests and quick demos.
* `tiny-idefics3-split`: Idefics3 with image splitting saved on; every image less elongated
  than 2:1 becomes 2x2 tiles + the global image (`progvlm.backends.load_vlm` keeps the
  processor's own tiling setting).
* `smolvlm-256m-shape`: the shape of HuggingFaceTB/SmolVLM-256M-Instruct (SigLIP-B/16 at
  512 px, pixel shuffle x4 -> 64 visual tokens of 576 = the SmolLM2-135M width), image
  splitting off; about 0.5 GB (bf16, like the real checkpoint).  Its edge/cloud timings are
  those of the real model run with splitting off; only the tokenizer is tiny (the config keeps the real 49280-token
  vocabulary, so generated ids beyond the tiny tokenizer decode to nothing).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

#: name -> what it is (the CLI and the error for an unknown name list these)
PRESETS: dict[str, str] = {
    "tiny-idefics3": "tiny Idefics3 (SigLIP 32 px -> 4 visual tokens of 64), image splitting off",
    "tiny-idefics3-split": "tiny Idefics3 with image splitting on: 2x2 tiles + global image "
                           "-> 20 visual tokens of 64 (load with image_splitting=None)",
    "tiny-smolvlm": "tiny SmolVLM model class with the Idefics3 processor, 4 visual tokens of 64",
    "tiny-llava": "tiny LLaVA (CLIP 32 px, patch 8 -> 16 visual tokens of 64)",
    "smolvlm-256m-shape": "random weights shaped like HuggingFaceTB/SmolVLM-256M-Instruct: "
                          "SigLIP-B/16 at 512 px + SmolLM2-135M, 64 visual tokens of 576, ~0.5 GB",
}

#: written into every folder; its "note" is what a reader of the folder must know
NOTE_FILE = "progvlm_random.json"
NOTE = "random weights: timing and bytes only, no accuracy"

_IDEFICS_SPECIALS = (["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                     + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
# The SmolVLM chat template, cut down to what the backend sends (one image, then the question).
_IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# The llava-1.5 prompt shape: "USER: <image>\n<question> ASSISTANT:".
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for line in message['content'] %}{% if line['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif line['type'] == 'text' %}{{ line['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{ line['text'] }}{% endif %}{% endfor %}{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
_TOKENIZER_CORPUS = [
    "User: Assistant: USER: ASSISTANT: what color is the cube? how many spheres are there?",
    "is there a red object left of the cylinder? describe the scene. red green blue yellow "
    "gray purple one two three four large small metal rubber",
] * 4
_TINY_VOCAB = 384
# ids 1, 2, 3 are <s>, </s>, <pad> in every tokenizer made here
_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
_TINY_TEXT = dict(model_type="llama", vocab_size=_TINY_VOCAB, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, **_SPECIAL_IDS)
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=32, patch_size=8)


@dataclass(frozen=True)
class _Recipe:
    family: str                  # "idefics3" (Idefics3 + SmolVLM model classes) or "llava"
    model_type: str              # "idefics3", "smolvlm" or "llava"
    vision: dict
    text: dict
    scale_factor: int = 2        # idefics3 pixel shuffle: tokens per image = patches / scale**2
    resize_longest_edge: int = 64  # idefics3 processor `size`; tiles are vision.image_size
    do_image_splitting: bool = False
    tie_word_embeddings: bool = False
    save_dtype: torch.dtype = torch.float32


_RECIPES: dict[str, _Recipe] = {
    "tiny-idefics3": _Recipe("idefics3", "idefics3", _TINY_VISION, _TINY_TEXT),
    # 64 px longest edge, 32 px tiles: an image less elongated than 2:1 gives 2x2 tiles.
    "tiny-idefics3-split": _Recipe("idefics3", "idefics3", _TINY_VISION, _TINY_TEXT,
                                   do_image_splitting=True),
    "tiny-smolvlm": _Recipe("idefics3", "smolvlm", _TINY_VISION, _TINY_TEXT),
    "tiny-llava": _Recipe("llava", "llava", _TINY_VISION, _TINY_TEXT),
    # HuggingFaceTB/SmolVLM-256M-Instruct: siglip-base-patch16-512 + SmolLM2-135M.  The real
    # processor resizes to 2048 px then (splitting off) to 512 px; kept, so edge timing matches.
    "smolvlm-256m-shape": _Recipe(
        "idefics3", "idefics3",
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=512, patch_size=16),
        text=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                  **_SPECIAL_IDS),
        # untied LM head, as in the real checkpoint: 256,484,928 parameters in all
        scale_factor=4, resize_longest_edge=2048, tie_word_embeddings=False,
        save_dtype=torch.bfloat16),
}
assert set(_RECIPES) == set(PRESETS)


def _recipe(preset: str) -> _Recipe:
    if preset not in _RECIPES:
        raise ValueError(f"unknown random VLM preset {preset!r}; presets: {', '.join(PRESETS)}")
    return _RECIPES[preset]


def preset_token_shape(preset: str) -> tuple[int, int]:
    """(N, D) of the visual tokens, from the preset's sizes alone (no weights are built).

    For `tiny-idefics3-split` N is that of the usual 2x2 grid (any image less elongated than
    2:1); a more elongated one gets fewer tiles.
    """
    r = _recipe(preset)
    patches = (r.vision["image_size"] // r.vision["patch_size"]) ** 2
    if r.family == "llava":  # "default" feature strategy: CLS dropped, one token per patch
        return patches, r.text["hidden_size"]
    per_image = _tokens_per_image(r)
    tiles = (r.resize_longest_edge // r.vision["image_size"]) ** 2 if r.do_image_splitting else 0
    return per_image * (tiles + 1), r.text["hidden_size"]


def _tokens_per_image(r: _Recipe) -> int:
    """Idefics3: patches of one tile (or the global image) after the x scale_factor shuffle."""
    return (r.vision["image_size"] // r.vision["patch_size"]) ** 2 // r.scale_factor ** 2


def _tokenizer(extra_specials: list[str]):
    """A byte-level BPE trained in memory: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_TINY_VOCAB - 16, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    assert len(fast) <= _TINY_VOCAB
    assert [fast.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>")] == [1, 2, 3]
    return fast


def _idefics3_parts(r: _Recipe):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)

    tok = _tokenizer(_IDEFICS_SPECIALS)
    config_cls, model_cls = ((SmolVLMConfig, SmolVLMForConditionalGeneration)
                             if r.model_type == "smolvlm"
                             else (Idefics3Config, Idefics3ForConditionalGeneration))
    config = config_cls(vision_config=dict(r.vision), text_config=dict(r.text),
                        scale_factor=r.scale_factor, tie_word_embeddings=r.tie_word_embeddings,
                        image_token_id=tok.convert_tokens_to_ids("<image>"), **_SPECIAL_IDS)
    tile = r.vision["image_size"]
    improc = Idefics3ImageProcessorPil(size={"longest_edge": r.resize_longest_edge},
                                       max_image_size={"longest_edge": tile},
                                       do_image_splitting=r.do_image_splitting)
    # SmolVLMProcessor needs num2words and a video processor; its image prompt layout is the
    # Idefics3 one, so the Idefics3 processor serves the SmolVLM model class too.
    processor = Idefics3Processor(improc, tok, image_seq_len=_tokens_per_image(r),
                                  chat_template=_IDEFICS_TEMPLATE)
    return config, model_cls, processor


def _llava_parts(r: _Recipe):
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _tokenizer(["<image>"])
    text = {k: v for k, v in r.text.items() if k != "model_type"}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**r.vision, projection_dim=r.vision["hidden_size"]),
        text_config=LlamaConfig(**text), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=r.tie_word_embeddings)
    side = r.vision["image_size"]
    improc = CLIPImageProcessorPil(size={"shortest_edge": side},
                                   crop_size={"height": side, "width": side})
    processor = LlavaProcessor(improc, tok, patch_size=r.vision["patch_size"],
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    return config, LlavaForConditionalGeneration, processor


#: _Recipe.family → the builder of its (config, model class, processor)
_PARTS = {"idefics3": _idefics3_parts, "llava": _llava_parts}


def build_config_and_processor(preset: str):
    """(model config, processor) of a preset, without building any weights (cheap)."""
    r = _recipe(preset)
    config, _model_cls, processor = _PARTS[r.family](r)
    return config, processor


def build_random_vlm(preset: str, seed: int = 0):
    """(model, processor) in memory, random weights from `seed`; the caller's RNG is untouched."""
    r = _recipe(preset)
    config, model_cls, processor = _PARTS[r.family](r)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.generation_config.update(**_SPECIAL_IDS)
    return model.to(r.save_dtype), processor


def write_random_vlm(out: str | Path, preset: str, seed: int = 0) -> Path:
    """Write a random-weight VLM folder for `preset` to `out` (created); returns `out`.

    The folder loads with `progvlm.backends.load_vlm(out)` (`--vlm out`), offline.  The same
    preset and seed always give the same weights.  Unknown preset -> ValueError listing them.
    """
    r = _recipe(preset)  # fail before touching the disk
    out = Path(out)
    model, processor = build_random_vlm(preset, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)
    n_tokens, token_dim = preset_token_shape(preset)
    note = {"note": NOTE, "preset": preset, "description": PRESETS[preset], "seed": seed,
            "visual_tokens": n_tokens, "token_dim": token_dim,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(r.save_dtype).removeprefix("torch.")}
    (out / NOTE_FILE).write_text(json.dumps(note, indent=2) + "\n")
    return out


__all__ = ["PRESETS", "NOTE", "NOTE_FILE", "build_config_and_processor",
           "build_random_vlm", "preset_token_shape", "write_random_vlm"]
