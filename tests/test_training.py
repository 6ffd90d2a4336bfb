"""train-vlm: seeded, checkpointed, resumable, writes safetensors + JSON config."""
import json

from safetensors.torch import load_file

from progvlm.models.tiny_vlm import TinyVLMConfig
from progvlm.training.train_vlm import train_vlm

SMALL = TinyVLMConfig(vision_width=32, vision_layers=1, token_dim=32, lm_layers=1)


def test_train_checkpoint_and_resume(tmp_path):
    logs = []
    out, work = tmp_path / "out", tmp_path / "work"
    train_vlm(out, work, steps=2, num_scenes=40, batch=4, eval_every=2, ckpt_every=1, cfg=SMALL,
              log=logs.append)
    first = load_file(str(out / "model.safetensors"))
    meta = json.loads((work / "checkpoint.json").read_text())
    assert meta["step"] == 2
    summary = train_vlm(out, work, steps=4, num_scenes=40, batch=4, eval_every=2, cfg=SMALL,
                        log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs)
    assert [h["step"] for h in summary["training"]["history"]] == [2, 4]
    second = load_file(str(out / "model.safetensors"))
    assert any((first[k] != second[k]).any() for k in first)  # it kept training
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["token_dim"] == 32 and cfg["training"]["steps"] == 4


def test_training_is_seeded(tmp_path):
    a = train_vlm(tmp_path / "a", tmp_path / "wa", steps=2, num_scenes=40, batch=4,
                  eval_every=100, cfg=SMALL, log=lambda m: None)
    b = train_vlm(tmp_path / "b", tmp_path / "wb", steps=2, num_scenes=40, batch=4,
                  eval_every=100, cfg=SMALL, log=lambda m: None)
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)
