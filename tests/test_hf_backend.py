"""HFVLMBackend on tiny, randomly initialised transformers VLMs, built offline.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on a few
sentences, the image processors are built from their classes with small sizes, the models
from tiny configs.  The random weights mean the answers are gibberish, which is fine: the
point is that the split (edge -> visual tokens -> cloud) reproduces the whole model's tokens.
"""
import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessorPil, CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlamaForCausalLM, LlavaConfig,
    LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast, SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from progvlm.backends.hf import HFVLMBackend  # noqa: E402

# the SmolVLM chat template and special tokens: the same as the random-weight stand-ins
from progvlm.backends.random_hf import _IDEFICS_SPECIALS as IDEFICS_SPECIALS  # noqa: E402
from progvlm.backends.random_hf import _IDEFICS_TEMPLATE as IDEFICS_TEMPLATE  # noqa: E402

QUESTIONS = ["what color is the cube?", "how many spheres are there?"]
VOCAB = 384
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tiny_tokenizer(extra_specials=()) -> PreTrainedTokenizerFast:
    """A byte-level BPE over a few sentences: any text encodes, nothing is downloaded."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["User: Assistant: what color is the cube? how many spheres are there?",
                             "USER: ASSISTANT: red green blue yellow one two three"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    assert len(fast) <= VOCAB and fast.convert_tokens_to_ids("</s>") == 2
    return fast


def image(seed: int, size=(40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")


def idefics_parts(cls_config=Idefics3Config, cls_model=Idefics3ForConditionalGeneration):
    """Vision 32x32 px, patch 8 -> 16 patches, pixel-shuffle x2 -> 4 visual tokens per image."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(IDEFICS_SPECIALS)
    cfg = cls_config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **TEXT), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    model = cls_model(cfg).eval()
    improc = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(improc, tok, image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return model, proc


def llava_parts():
    """CLIP 32x32 px, patch 8 -> 16 patch tokens (CLS dropped, 'default' strategy)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(["<image>"])
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8,
                                       projection_dim=32),
        text_config=LlamaConfig(**TEXT), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    improc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # No chat template: the backend falls back to the "USER: <image>\n... ASSISTANT:" prompt.
    proc = LlavaProcessor(improc, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    return model, proc


def forward_image_states(backend: HFVLMBackend, im: Image.Image) -> torch.Tensor:
    """What the unsplit model's forward scatters into the <image> positions, as (N, D)."""
    with torch.no_grad():
        states = backend.model(**backend._processor_inputs(im, QUESTIONS[0])).image_hidden_states
    states = getattr(states, "pooler_output", states)  # SmolVLM returns the encoder output
    if isinstance(states, (list, tuple)):
        states = torch.cat(list(states))
    return states.reshape(-1, states.shape[-1])


def check_split(backend: HFVLMBackend, n_expected: int, max_new_tokens: int = 12):
    answers = []
    for seed, q in enumerate(QUESTIONS):
        im = image(seed)
        tokens = backend.edge_half(im)
        assert tokens.ndim == 2 and tokens.is_floating_point()
        assert tokens.shape == (n_expected, backend.token_dim)
        # The edge half is exactly the model's own visual input to the LM, bit for bit.
        assert torch.equal(tokens, forward_image_states(backend, im))
        whole = backend.answer(im, q, max_new_tokens=max_new_tokens)
        split = backend.cloud_half(tokens, q, max_new_tokens=max_new_tokens)
        assert split.token_ids == whole.token_ids
        assert split.text == whole.text
        assert len(whole.token_ids) > 0  # random weights: something other than EOS comes out
        answers.append((tokens, whole))
    # The visual tokens matter: the first image's tokens with the second question answer
    # differently from the second image (otherwise the equality above would prove little).
    assert backend.cloud_half(answers[0][0], QUESTIONS[1], max_new_tokens).token_ids != \
        answers[1][1].token_ids


def test_idefics3_split_is_exact_after_save_and_load(tmp_path):
    model, proc = idefics_parts()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    backend = HFVLMBackend.load(tmp_path, local_files_only=True)
    assert backend.family == "idefics3"
    assert backend.model_id == f"hf:{tmp_path}"
    assert backend.token_dim == TEXT["hidden_size"]
    check_split(backend, n_expected=4)
    # The prompt ids the cloud builds are the ones the processor builds for the whole model.
    inputs = backend._processor_inputs(image(0), QUESTIONS[0])
    assert torch.equal(backend._prompt_ids(QUESTIONS[0], 4)["input_ids"], inputs["input_ids"])


def test_smolvlm_model_class_split_is_exact():
    # SmolVLMProcessor needs num2words + a video processor; its image prompt layout is the
    # Idefics3 one, so the Idefics3 processor drives the SmolVLM model class here.
    model, proc = idefics_parts(SmolVLMConfig, SmolVLMForConditionalGeneration)
    backend = HFVLMBackend(model, proc, model_id="hf:tiny-smolvlm")
    assert backend.family == "idefics3" and backend.model_id == "hf:tiny-smolvlm"
    check_split(backend, n_expected=4)


def test_idefics3_image_splitting_needs_the_grid():
    model, proc = idefics_parts()
    backend = HFVLMBackend(model, proc, image_splitting=True)
    im = image(3, size=(40, 56))  # -> 46x64 -> 2x2 tiles of 32 + the global image
    tokens, grid = backend.edge_half_with_grid(im)
    assert grid == (2, 2) and tokens.shape == (4 * 5, backend.token_dim)
    whole = backend.answer(im, QUESTIONS[0], max_new_tokens=8)
    assert backend.cloud_half(tokens, QUESTIONS[0], max_new_tokens=8, grid=grid).token_ids == \
        whole.token_ids
    with pytest.raises(ValueError, match="grid"):
        backend.cloud_half(tokens, QUESTIONS[0], max_new_tokens=8)


def test_llava_split_is_exact_after_save_and_load(tmp_path):
    model, proc = llava_parts()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    backend = HFVLMBackend.load(tmp_path)
    assert backend.family == "llava" and backend.token_dim == TEXT["hidden_size"]
    check_split(backend, n_expected=16)
    with pytest.raises(ValueError, match="visual tokens"):
        backend.cloud_half(torch.zeros(15, backend.token_dim), QUESTIONS[0])


def test_bfloat16_model_with_float32_tokens_in_transit():
    # bf16 -> fp32 -> bf16 is lossless, so the split stays exact when tokens travel as fp32.
    model, proc = llava_parts()
    backend = HFVLMBackend(model.to(torch.bfloat16), proc)
    im, q = image(1), QUESTIONS[1]
    tokens = backend.edge_half(im)
    assert tokens.dtype == torch.bfloat16
    assert backend.cloud_half(tokens.float(), q, max_new_tokens=8).token_ids == \
        backend.answer(im, q, max_new_tokens=8).token_ids


def test_unsupported_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**TEXT))
    with pytest.raises(ValueError, match="Idefics3/SmolVLM and LLaVA"):
        HFVLMBackend(lm, processor=None)
    lm.config.save_pretrained(tmp_path)  # fails on the config, before any weights are read
    with pytest.raises(ValueError, match="model_type='llama'"):
        HFVLMBackend.load(tmp_path)
