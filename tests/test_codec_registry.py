"""A new baseline codec is one entry of progvlm.eval.codecs.REGISTRY: registered from this file
alone, it is a row of eval-mae (generated scenes and --images) and of the bench's rate–accuracy."""
import json
import shutil

import pytest
import torch

from progvlm import ASSETS
from progvlm.cli.main import main
from progvlm.eval import codecs


class Int8Tokens(codecs.Codec):
    """The visual tokens quantised to int8 with one fp32 scale per frame."""
    name = family = "int8_tokens"

    def encode(self, unit, ctx):
        scale = unit.tokens.abs().max() / 127
        q = torch.round(unit.tokens / scale).clamp(-127, 127)
        return codecs.Coded(q.numel() + 4, q * scale)


@pytest.fixture
def int8_registered(monkeypatch):
    monkeypatch.setattr(codecs, "REGISTRY", dict(codecs.REGISTRY))  # undone after the test
    codecs.register("int8_tokens", lambda plan: [Int8Tokens()])


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_registered_codec_is_a_row_of_eval_mae(int8_registered, capsys):
    assert main(["eval-mae", "--questions", "14", "--seed", "5", "--json"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    row = rep["baselines"]["int8_tokens"]
    assert row["bytes_mean"] == row["bytes_max"] == 64 * 128 + 4
    assert 0.0 <= row["accuracy"] <= 1.0 and row["consistency"] > 0.9  # int8 barely changes tokens
    assert list(rep["baselines"])[-1] == "int8_tokens"  # after the built-in entries
    assert any(line.split()[:1] == ["int8_tokens"] for line in out.splitlines())  # in the table


def test_a_registered_codec_is_a_row_of_eval_mae_on_images(int8_registered, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("scene_00.png", "scene_01.png"):
        shutil.copy(ASSETS / "examples" / name, images / name)
    questions = tmp_path / "questions.txt"
    questions.write_text("how many objects are there ?\n")
    assert main(["eval-mae", "--images", str(images), "--questions", str(questions),
                 "--max-new-tokens", "8", "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["images"] == 2 and rep["skipped"] == []
    assert set(rep["baselines"]) == {"raw_fp16", "jpeg_q90", "jpeg_camera_q90", "int8_tokens"}
    assert rep["baselines"]["int8_tokens"]["bytes_mean"] == 64 * 128 + 4
    assert 0.0 <= rep["baselines"]["int8_tokens"]["agreement"] <= 1.0


def test_a_registered_codec_is_a_row_of_the_bench(int8_registered):
    from progvlm.bench.experiment import rate_accuracy
    from progvlm.split import load_split
    rows, rep = rate_accuracy(load_split("bundled"), seed=2, questions=7, quick=True, log=lambda m: None)
    mine = [r for r in rows if r["method"] == "int8_tokens"]
    assert len(mine) == 1 and mine[0]["family"] == "int8_tokens"
    assert mine[0]["bytes"] == rep["baselines"]["int8_tokens"]["bytes_mean"] == 64 * 128 + 4
    families = {r["family"] for r in rows}
    assert {"progressive", "jpeg_model", "jpeg_camera", "raw_fp16", "pooling"} <= families


def test_without_the_entry_the_row_is_gone(capsys):
    assert "int8_tokens" not in codecs.REGISTRY
    plan = codecs.Plan(4, (10,), (), pooling=True)
    names = [c.name for c in codecs.codecs_for(plan)]
    assert names == ["k=1", "k=2", "k=3", "k=4", "raw_fp16", "jpeg_q10",
                     "pool_k1", "pool_k2", "pool_k3", "pool_k4"]
    assert [c.name for c in codecs.codecs_for(plan, entries=("mae",))] == ["k=1", "k=2", "k=3", "k=4"]
