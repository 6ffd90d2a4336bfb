"""Random-weight VLM folders (progvlm.backends.random_hf): written offline, loaded like checkpoints.

Each tiny preset is written to disk, loaded with `HFVLMBackend.load` (AutoConfig/AutoModel/
AutoProcessor from the folder, local files only) and must split exactly: the cloud half on the
edge half's tokens generates the whole model's tokens.  The SmolVLM-256M-shaped preset is
checked by its config here; building it (~0.5 GB, seconds of CPU) is the `slow` test.
"""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from transformers import Idefics3ForConditionalGeneration  # noqa: E402

from progvlm.backends import load_vlm  # noqa: E402
from progvlm.backends.hf import HFVLMBackend  # noqa: E402
from progvlm.backends.random_hf import (  # noqa: E402
    NOTE, NOTE_FILE, PRESETS, build_config_and_processor, preset_token_shape,
    write_random_vlm,
)
from progvlm.cli.main import main  # noqa: E402

TINY_PRESETS = [p for p in PRESETS if p.startswith("tiny-")]
QUESTIONS = ["what color is the cube?", "how many spheres are there?"]


def noise_image(seed: int, size=(48, 64)) -> Image.Image:
    """Height x width of random pixels; 48x64 (< 2:1) gives the split preset 2x2 tiles."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every tiny preset written once (seed 0) for the whole module."""
    root = tmp_path_factory.mktemp("random_vlms")
    return {p: write_random_vlm(root / p, p) for p in TINY_PRESETS}


def assert_split_is_exact(backend: HFVLMBackend, n_tokens: int, max_new_tokens: int = 4):
    """cloud_half(edge_half(im), q) generates answer(im, q)'s tokens; returns the last grid."""
    grid = None
    for seed, question in enumerate(QUESTIONS):
        im = noise_image(seed)
        tokens, grid = backend.edge_half_with_grid(im)
        assert tokens.shape == (n_tokens, backend.token_dim)
        whole = backend.answer(im, question, max_new_tokens=max_new_tokens)
        split = backend.cloud_half(tokens, question, max_new_tokens=max_new_tokens, grid=grid)
        assert split.token_ids == whole.token_ids and split.text == whole.text
        assert whole.token_ids  # random weights, but not an immediate end of sequence
    return grid


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_preset_loads_from_disk_and_splits_exactly(folders, preset):
    folder = folders[preset]
    assert (folder / "model.safetensors").is_file()
    note = json.loads((folder / NOTE_FILE).read_text())
    assert note["note"] == NOTE and note["preset"] == preset and note["seed"] == 0
    assert sum(f.stat().st_size for f in folder.iterdir()) < 5e6  # tiny: a few MB at most

    backend = load_vlm(str(folder))  # the one registry
    n_tokens, token_dim = preset_token_shape(preset)
    assert (note["visual_tokens"], note["token_dim"]) == (n_tokens, token_dim)
    assert backend.token_dim == token_dim
    # The saved processor kept its chat template, so prompts are the templated ones.
    assert backend.processor.chat_template
    assert backend.prompt("hi").count(backend.image_token) == 1
    grid = assert_split_is_exact(backend, n_tokens)
    if preset == "tiny-llava":
        assert backend.family == "llava" and grid is None
    else:
        assert backend.family == "idefics3"
        # The prompt the cloud rebuilds is token for token the one the processor builds.
        im, question = noise_image(0), QUESTIONS[0]
        _, grid = backend.edge_half_with_grid(im)
        cloud_ids = backend._prompt_ids(question, n_tokens, grid)["input_ids"]
        assert torch.equal(cloud_ids, backend._processor_inputs(im, question)["input_ids"])


def test_split_preset_keeps_splitting_on_and_needs_the_grid(folders):
    folder = folders["tiny-idefics3-split"]
    backend = load_vlm(str(folder))
    processor = backend.processor
    assert processor.image_processor.do_image_splitting is True  # survived save + load
    tokens, grid = backend.edge_half_with_grid(noise_image(5, size=(64, 64)))
    assert grid is not None and grid == (2, 2)
    rows, cols = grid
    assert tokens.shape[0] == processor.image_seq_len * (rows * cols + 1) == 20
    with pytest.raises(ValueError, match="grid"):
        backend.cloud_half(tokens, QUESTIONS[0], max_new_tokens=2)
    # HFVLMBackend's default (image_splitting=False) turns the saved setting off again.
    unsplit = HFVLMBackend.load(folder)
    assert unsplit.edge_half(noise_image(5, size=(64, 64))).shape[0] == processor.image_seq_len


def test_unsplit_presets_save_splitting_off(folders):
    for preset in ("tiny-idefics3", "tiny-smolvlm"):
        backend = HFVLMBackend.load(folders[preset], image_splitting=None)  # the saved setting
        assert backend.processor.image_processor.do_image_splitting is False
        assert backend.edge_half(noise_image(1, size=(96, 96))).shape[0] == 4


def test_the_smolvlm_folder_uses_the_smolvlm_model_class(folders):
    backend = HFVLMBackend.load(folders["tiny-smolvlm"])
    assert type(backend.model).__name__ == "SmolVLMForConditionalGeneration"
    assert type(backend.processor).__name__ == "Idefics3Processor"


def test_same_seed_same_weights_other_seed_other_weights(folders, tmp_path):
    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    rng_before = torch.random.get_rng_state()
    again = write_random_vlm(tmp_path / "again", "tiny-idefics3", seed=0)
    other = write_random_vlm(tmp_path / "other", "tiny-idefics3", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert digest(again) == digest(folders["tiny-idefics3"])
    assert digest(other) != digest(again)
    for name in ("tokenizer.json", "processor_config.json", "config.json"):
        assert (again / name).read_bytes() == (folders["tiny-idefics3"] / name).read_bytes()


def test_load_vlm_takes_the_folder_as_a_vlm_spec(folders):
    backend = load_vlm(str(folders["tiny-llava"]))
    assert isinstance(backend, HFVLMBackend) and backend.family == "llava"


def test_unknown_preset_is_refused_with_the_list(tmp_path):
    with pytest.raises(ValueError, match="unknown random VLM preset 'tiny-gpt'.*tiny-idefics3"):
        write_random_vlm(tmp_path / "x", "tiny-gpt")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="smolvlm-256m-shape"):
        preset_token_shape("SmolVLM-256M")


def test_cli_make_random_vlm(tmp_path, capsys):
    out = tmp_path / "llava"
    assert main(["make-random-vlm", "--preset", "tiny-llava", "--out", str(out),
                 "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "16 x 64" in printed
    assert json.loads((out / NOTE_FILE).read_text())["seed"] == 3
    assert HFVLMBackend.load(out).edge_half(noise_image(0)).shape == (16, 64)


def test_cli_refuses_an_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["make-random-vlm", "--preset", "tiny-gpt", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'tiny-gpt'" in capsys.readouterr().err


def test_smolvlm_256m_shape_by_config():
    """N = 64, D = 576 from the config and processor alone (no weights are built)."""
    config, processor = build_config_and_processor("smolvlm-256m-shape")
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.intermediate_size, vision.patch_size, vision.image_size) == \
        (768, 12, 12, 3072, 16, 512)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size, text.vocab_size) == \
        (576, 30, 9, 3, 1536, 49280)
    assert config.scale_factor == 4
    n_tokens = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2
    assert n_tokens == processor.image_seq_len == 64
    assert preset_token_shape("smolvlm-256m-shape") == (64, text.hidden_size) == (64, 576)
    assert processor.image_processor.do_image_splitting is False
    assert len(processor.tokenizer) <= text.vocab_size  # small tokenizer, real-size embedding
    # Built on the meta device (no memory, no init): exactly the real checkpoint's size.
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 256_484_928


@pytest.mark.slow
def test_smolvlm_256m_shape_builds_loads_and_splits_exactly(tmp_path):
    """~0.5 GB written; the edge half runs SigLIP-B/16 at 512 px (seconds on CPU)."""
    folder = write_random_vlm(tmp_path / "smolvlm-256m-shape", "smolvlm-256m-shape")
    backend = HFVLMBackend.load(folder)
    assert backend.token_dim == 576
    im, question = noise_image(0, size=(480, 640)), QUESTIONS[0]
    tokens = backend.edge_half(im)
    assert tokens.shape == (64, 576)
    whole = backend.answer(im, question, max_new_tokens=4)
    assert backend.cloud_half(tokens, question, max_new_tokens=4).token_ids == whole.token_ids


def test_each_family_states_the_layouts_its_language_half_takes(folders):
    """check_layout (what the cloud asks of a stream's header before decoding, issue 21) agrees
    with what the edge makes, and refuses what the prompt could not hold."""
    split = load_vlm(str(folders["tiny-idefics3-split"]))
    tokens, grid = split.edge_half_with_grid(noise_image(5, size=(64, 64)))
    split.check_layout(tokens.shape[0], grid)
    per = split.tokens_per_block
    for n, bad in ((per * 5, (2, 3)), (per * 50, (7, 7)), (per * 3, (2, 0)), (per * 2, None)):
        with pytest.raises(ValueError):
            split.check_layout(n, bad)
    unsplit = HFVLMBackend.load(folders["tiny-idefics3"])
    tokens, grid = unsplit.edge_half_with_grid(noise_image(1, size=(96, 96)))
    unsplit.check_layout(tokens.shape[0], grid)
    with pytest.raises(ValueError, match="at most 0 × 0"):
        unsplit.check_layout(per * 5, (2, 2))  # splitting is off: no tiles
    llava = load_vlm(str(folders["tiny-llava"]))
    llava.check_layout(llava.edge_half(noise_image(1, size=(64, 64))).shape[0], None)
    with pytest.raises(ValueError):
        llava.check_layout(llava.tokens_per_block * 2, None)
