"""train-vlm: seeded, checkpointed, resumable, writes safetensors + JSON config."""
import json
import shutil

import pytest
from safetensors.torch import load_file

from progvlm.eval.evaluate import evaluate_backend
from progvlm.toyworld.tiny_vlm import TinyVLMConfig
from progvlm.training import train_vlm as train_vlm_module
from progvlm.training.train_vlm import train_vlm

SMALL = TinyVLMConfig(vision_width=32, vision_layers=1, token_dim=32, lm_layers=1)
SCENES = 16
EVAL_QUESTIONS = 14  # the validation set train-vlm reports (700 in a real run: 7 s of a 9-s test)


@pytest.fixture(autouse=True)
def small_validation(monkeypatch):
    """The same evaluation, on fewer questions: what it counts is not what these tests check."""
    monkeypatch.setattr(train_vlm_module, "evaluate_backend",
                        lambda backend, seed, count: evaluate_backend(backend, seed, EVAL_QUESTIONS))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The training frames, rendered once (train-vlm caches them in its work folder)."""
    work = tmp_path_factory.mktemp("render")
    train_vlm(work / "out", work, steps=0, num_scenes=SCENES, batch=4, cfg=SMALL, log=lambda m: None)
    cache, = work.glob("frames-*.npz")
    return cache


def _workdir(path, rendered):
    path.mkdir()
    shutil.copy(rendered, path / rendered.name)
    return path


def test_train_checkpoint_and_resume(tmp_path, rendered):
    logs = []
    out, work = tmp_path / "out", _workdir(tmp_path / "work", rendered)
    train_vlm(out, work, steps=2, num_scenes=SCENES, batch=4, eval_every=2, ckpt_every=1, cfg=SMALL,
              log=logs.append)
    first = load_file(str(out / "model.safetensors"))
    meta = json.loads((work / "checkpoint.json").read_text())
    assert meta["step"] == 2
    summary = train_vlm(out, work, steps=4, num_scenes=SCENES, batch=4, eval_every=2, cfg=SMALL,
                        log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs)
    assert [h["step"] for h in summary["training"]["history"]] == [2, 4]
    assert summary["training"]["history"][-1]["val"]["questions"] == EVAL_QUESTIONS
    second = load_file(str(out / "model.safetensors"))
    assert any((first[k] != second[k]).any() for k in first)  # it kept training
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["token_dim"] == 32 and cfg["training"]["steps"] == 4


def test_training_is_seeded(tmp_path, rendered):
    a = train_vlm(tmp_path / "a", _workdir(tmp_path / "wa", rendered), steps=2, num_scenes=SCENES,
                  batch=4, eval_every=100, cfg=SMALL, log=lambda m: None)
    b = train_vlm(tmp_path / "b", _workdir(tmp_path / "wb", rendered), steps=2, num_scenes=SCENES,
                  batch=4, eval_every=100, cfg=SMALL, log=lambda m: None)
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
