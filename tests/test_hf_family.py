"""Where a change lands: a new `transformers` family is one class plus its FAMILIES entry.

The stand-in below is defined here, in the test file: a model type transformers has never
heard of (registered with its Auto classes, as a new architecture would be), whose family is a
subclass of the LLaVA family. Registered under its model_type, it is loaded by
`progvlm.backends.load_vlm` from a folder, split exactly, and answers through a Split, with no
edit to hf.py, backends/__init__.py or anything else.
"""
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration,
)

from progvlm.backends import load_vlm  # noqa: E402
from progvlm.backends.hf_families import FAMILIES, LlavaFamily, family_class  # noqa: E402
from progvlm.backends.random_hf import write_random_vlm  # noqa: E402
from progvlm.models.mae import MAE, MAEConfig  # noqa: E402
from progvlm.split import Split  # noqa: E402

MODEL_TYPE = "progvlm-standin-llava"


class StandinConfig(LlavaConfig):
    model_type = MODEL_TYPE


class StandinModel(LlavaForConditionalGeneration):
    config_class = StandinConfig


AutoConfig.register(MODEL_TYPE, StandinConfig, exist_ok=True)
AutoModelForImageTextToText.register(StandinConfig, StandinModel, exist_ok=True)


class StandinFamily(LlavaFamily):
    """The LLaVA layout under another name, counting what the backend asks of it."""

    name, label = "standin", "Stand-in"

    def __init__(self, model, processor, image_splitting):
        super().__init__(model, processor, image_splitting)
        self.asked = {"image_features": 0, "expansion": 0}

    def image_features(self, inputs):
        self.asked["image_features"] += 1
        return super().image_features(inputs)

    def expansion(self, n_tokens, grid):
        self.asked["expansion"] += 1
        return super().expansion(n_tokens, grid)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A tiny random LLaVA saved under the stand-in's model_type, the family registered."""
    out = write_random_vlm(tmp_path / "standin", "tiny-llava")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type=MODEL_TYPE, architectures=[StandinModel.__name__])
    (out / "config.json").write_text(json.dumps(config))
    monkeypatch.setitem(FAMILIES, MODEL_TYPE, StandinFamily)
    return out


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB")


def test_unregistered_the_model_type_is_refused_by_name(tmp_path):
    out = write_random_vlm(tmp_path / "standin", "tiny-llava")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type=MODEL_TYPE, architectures=[StandinModel.__name__])
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"model_type='{MODEL_TYPE}'"):
        load_vlm(str(out))


def test_a_registered_family_loads_splits_and_answers_through_it(folder):
    backend = load_vlm(str(folder))
    assert type(backend.model).__name__ == "StandinModel"
    family = backend.model_family
    assert isinstance(family, StandinFamily) and backend.family == "standin"
    assert backend.describe()["family"] == "standin"
    assert family_class(backend.model.config) is StandinFamily
    assert backend.tokens_per_block == 16 and backend.input_size == 32
    question = "what color is the cube?"
    tokens, grid = backend.edge_half_with_grid(noise(0))
    assert grid is None and family.asked["image_features"] == 1
    whole = backend.answer(noise(0), question, max_new_tokens=4)
    split = backend.cloud_half(tokens, question, max_new_tokens=4)
    assert split.token_ids == whole.token_ids and whole.token_ids
    assert family.asked["expansion"] >= 1  # the cloud built its prompt through the family
    with pytest.raises(ValueError, match="takes 16 visual tokens"):
        backend.check_layout(32, None)

    mae = MAE(MAEConfig.for_tokens(16, backend.token_dim, vlm_id=backend.model_id,
                                   num_layers=2, rate_lambda=[0.1, 0.1])).eval()
    pair = Split(backend, mae)
    frame = pair.unpack(pair.pack(pair.edge(noise(1))))
    answer = pair.cloud(frame, question, max_new_tokens=4)
    assert isinstance(answer.text, str) and answer.token_ids
