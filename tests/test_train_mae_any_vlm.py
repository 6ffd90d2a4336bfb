"""train-mae for any VLM: distillation through the frozen LM, from a folder of images.

Tiny random transformers VLMs (Idefics3 with tiling on, LLaVA) stand in for real ones: their
answers are gibberish, but the teacher is the VLM's own greedy answer, so distillation is as
real as on a large model. Every run is a few steps on 6 small images and 2 prompts.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from progvlm.backends import load_vlm  # noqa: E402
from progvlm.backends.random_hf import write_random_vlm  # noqa: E402
from progvlm.cli.main import main  # noqa: E402
from progvlm.models.mae import load_mae  # noqa: E402
from progvlm.training.train_mae import (  # noqa: E402
    TrainMAEError, build_teacher_cache, list_images, train_mae_on_images,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["tiny-idefics3-split", "tiny-llava"]
FAST = ["--teacher-tokens", "4", "--batch", "3"]  # with --questions: 2 prompts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Random VLM folders, 6 images (one too elongated for 2x2 tiles), a questions file."""
    root = tmp_path_factory.mktemp("any-vlm")
    vlms = {p: str(write_random_vlm(root / p, p)) for p in PRESETS}
    images = root / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(40, 56), (48, 48), (56, 40), (44, 60), (36, 50), (24, 96)]):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i}.png")
    questions = root / "questions.txt"
    questions.write_text("# the teacher's prompts\nDescribe the image.\n\nHow many objects are there?\n")
    return {"root": root, "vlms": vlms, "images": images, "questions": questions}


@pytest.fixture(scope="module")
def trained(world):
    """One library run per VLM (2 steps) under <root>/runs, as the CLI's defaults lay it out."""
    runs = {}
    for preset, folder in world["vlms"].items():
        backend = load_vlm(folder)
        before = {k: v.clone() for k, v in backend.model.state_dict().items()}
        summary = train_mae_on_images(
            backend, world["images"], prompts=["Describe the image.", "How many objects are there?"],
            teacher_tokens=4, steps=2, batch=3, work_root=world["root"] / "runs/train-mae",
            out_root=world["root"] / "runs/mae", log=lambda m: None)
        runs[preset] = (backend, before, summary)
    return runs


def cli(*args) -> int:
    return main(["train-mae", *map(str, args)])


@pytest.mark.parametrize("preset", PRESETS)
def test_answer_logits_argmax_is_the_greedy_answer(world, preset):
    backend = load_vlm(world["vlms"][preset])
    image = Image.open(world["images"] / "im0.png")
    tokens, grid = backend.edge_half_with_grid(image)
    assert (grid == (2, 2)) == (preset == "tiny-idefics3-split")  # tiles: 4 + the global image
    for q in ("Describe the image.", "How many objects are there?"):
        answer = backend.cloud_half(tokens, q, max_new_tokens=12, grid=grid)
        assert len(answer.token_ids) > 0
        t = tokens.clone().requires_grad_(True)
        logits = backend.answer_logits(t, q, answer.token_ids, grid=grid)
        assert logits.shape[0] == len(answer.token_ids)
        assert logits.argmax(-1).tolist() == answer.token_ids
        logits.logsumexp(-1).sum().backward()  # differentiable in the visual tokens
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_answer_logits_of_the_bundled_vlm(bundled_backend):
    image = Image.open(ROOT / "assets/examples/scene_02.png")
    tokens = bundled_backend.edge_half(image)
    for q in ("describe the scene .", "how many objects are there ?"):
        answer = bundled_backend.cloud_half(tokens, q)
        logits = bundled_backend.answer_logits(tokens, q, answer.token_ids)
        assert logits.argmax(-1).tolist() == answer.token_ids


@pytest.mark.parametrize("preset", PRESETS)
def test_training_distils_through_the_frozen_vlm(trained, preset):
    backend, before, summary = trained[preset]
    after = backend.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)  # bit for bit
    history = summary["training"]["history"]
    assert [h["step"] for h in history] == [1, 2]
    assert all(0 < h["kl"] < float("inf") for h in history)
    assert summary["training"]["prompts"] == 2 and summary["training"]["images"] == 6
    mae = load_mae(summary["out"])
    assert mae.cfg.vlm_id == backend.model_id
    assert mae.cfg.num_tokens == backend.tokens_per_block
    assert mae.fingerprint().hex() == summary["fingerprint"]
    index = json.loads((Path(summary["training"]["cache"]) / "index.json").read_text())
    grids = {tuple(im["grid"]) if im["grid"] else None for s in index["shards"] for im in s["images"]}
    if preset == "tiny-idefics3-split":  # tiles per image differ within one batch
        assert (2, 2) in grids and len(grids) > 1
    assert all((Path(summary["training"]["cache"]) / s["file"]).is_file() for s in index["shards"])


def test_a_half_built_teacher_cache_is_continued(world, tmp_path):
    backend = load_vlm(world["vlms"]["tiny-llava"])
    paths, calls, crash = list_images(world["images"]), [], [4]
    edge = backend.edge_half_with_grid

    class Crash(Exception):
        pass

    def counted(image):  # the first build dies on its 4th image
        calls.append(image)
        if len(calls) == crash[0]:
            raise Crash
        return edge(image)

    backend.edge_half_with_grid = counted
    kw = dict(prompts=["Describe the image."], teacher_tokens=3, shard_images=2, show=False)
    with pytest.raises(Crash):
        build_teacher_cache(backend, world["images"], paths, tmp_path, **kw)
    done = json.loads((tmp_path / "index.json").read_text())
    assert [len(s["images"]) for s in done["shards"]] == [2]  # the full shard survived
    calls.clear()
    crash[0] = None
    index = build_teacher_cache(backend, world["images"], paths, tmp_path, **kw)
    assert len(calls) == 4  # only what was missing
    names = [im["name"] for s in index["shards"] for im in s["images"]]
    assert sorted(names) == [p.name for p in paths] and len(index["shards"]) == 3


def test_cli_defaults_resume_the_run_and_are_keyed_by_vlm(world, trained, monkeypatch, capsys):
    monkeypatch.chdir(world["root"])  # the library runs used <root>/runs: the CLI's defaults
    workdirs = []
    for preset in PRESETS:
        assert cli("--vlm", world["vlms"][preset], "--images", world["images"], "--questions",
                   world["questions"], *FAST, "--steps", 3, "--json") == 0
        out, err = capsys.readouterr()
        summary = json.loads(out.strip().splitlines()[-1])
        assert "resumed" in err and "at step 2" in err  # the library run's checkpoint
        assert [h["step"] for h in summary["training"]["history"]] == [1, 2, 3]
        assert summary["out"] == str(Path("runs/mae") / Path(summary["workdir"]).name)
        assert "written to runs/mae/" in out
        assert summary["out"] == trained[preset][2]["out"].removeprefix(f"{world['root']}/")
        workdirs.append(Path(summary["workdir"]))
    # one --workdir parent, a folder per VLM
    assert workdirs[0] != workdirs[1] and workdirs[0].parent == workdirs[1].parent == Path("runs/train-mae")


def test_a_run_never_takes_another_runs_folder_or_checkpoint(world, trained, tmp_path, capsys):
    (idefics, _, s_idefics), (llava, _, _) = trained["tiny-idefics3-split"], trained["tiny-llava"]
    with pytest.raises(TrainMAEError, match="tiny-idefics3-split.*tiny-llava"):
        train_mae_on_images(llava, world["images"], tmp_path / "m", Path(s_idefics["workdir"]),
                            prompts=["Describe the image."], teacher_tokens=4, steps=1,
                            log=lambda m: None)
    # a checkpoint whose stored key is not the run's is refused, naming both
    copy = tmp_path / "work" / Path(s_idefics["workdir"]).name
    shutil.copytree(s_idefics["workdir"], copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta.update(run="someone-else-0123456789", vlm_id="hf:someone/else")
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    assert cli("--vlm", world["vlms"]["tiny-idefics3-split"], "--images", world["images"],
               "--questions", world["questions"], *FAST, "--steps", 3,
               "--workdir", tmp_path / "work") == 2
    err = capsys.readouterr().err
    assert "someone-else-0123456789" in err and copy.name in err and "hf:someone/else" in err


def test_bundled_scenes_default_output_is_under_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROGVLM_VLM", raising=False)
    assert cli("--scenes", 6, "--steps", 1, "--batch", 2, "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"].startswith("runs/mae/progvlm-tiny-")
    assert load_mae(tmp_path / summary["out"]).cfg.vlm_id == summary["mae"]["vlm_id"]
    assert not (tmp_path / "assets").exists()


def test_bad_options_are_refused_with_a_message(world, tmp_path, capsys):
    llava, images, q = world["vlms"]["tiny-llava"], world["images"], world["questions"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "comments.txt").write_text("# nothing but a comment\n\n")
    cases = [
        (["--vlm", llava], "no generated scenes"),
        (["--vlm", llava, "--scenes", 10], "--scenes"),
        (["--vlm", llava, "--images", images, "--scenes", 10], "--scenes"),
        (["--questions", q], "--questions applies to training on --images"),
        (["--vlm", llava, "--images", tmp_path / "missing"], "no such folder"),
        (["--vlm", llava, "--images", tmp_path / "empty"], "holds no images"),
        (["--vlm", llava, "--images", images, "--questions", tmp_path / "nope.txt"], "cannot read"),
        (["--vlm", llava, "--images", images, "--questions", tmp_path / "comments.txt"],
         "holds no questions"),
        (["--vlm", llava, "--images", images, "--distill", -0.5], "--distill"),
        (["--vlm", llava, "--images", images, "--steps", 0], "--steps must be at least 1"),
        (["--vlm", llava, "--images", images, "--teacher-tokens", 0], "--teacher-tokens"),
        (["--vlm", llava, "--images", images, "--rate-lambda", "0.1,0.2"], "4 numbers, got 2"),
        (["--vlm", llava, "--images", images, "--mixed-precision", "fp8"], "--mixed-precision"),
        (["--vlm", llava, "--images", images, "--mixed-precision", "fp16"], "needs a GPU"),
    ]
    for args, message in cases:
        assert cli("--steps", 1, *args, "--workdir", tmp_path / "w") == 2, args
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (args, err)
    assert not (tmp_path / "w").exists()  # nothing was started


@pytest.mark.slow  # ~15-25 s: a second Python starts, imports transformers, builds a cache
def test_accelerate_launch_runs_train_mae(world, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "progvlm", "train-mae", "--vlm", world["vlms"]["tiny-llava"],
           "--images", str(world["images"]), "--questions", str(world["questions"]), *FAST,
           "--steps", "3", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "mae"), "--json"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["training"]["steps"] == 3 and summary["out"] == str(tmp_path / "mae")
    assert load_mae(tmp_path / "mae").cfg.vlm_id == summary["mae"]["vlm_id"]


def test_reconstruction_only_training_generates_no_teacher_answers(tmp_path):
    """--distill 0 needs no teacher: the VLM's language half is never run for the cache."""
    from progvlm.backends import load_vlm
    from progvlm.backends.random_hf import write_random_vlm
    from progvlm.training.train_mae import train_mae_on_images
    backend = load_vlm(str(write_random_vlm(tmp_path / "vlm", "tiny-llava")))

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although --distill is 0")
    backend.cloud_half = no_teacher
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    summary = train_mae_on_images(backend, folder, tmp_path / "mae", tmp_path / "work", steps=2,
                                  batch=2, distill=0.0, log=lambda m: None)
    assert summary["training"]["distill"] == 0.0
