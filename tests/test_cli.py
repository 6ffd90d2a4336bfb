"""`python -m progvlm`: every command documented; evaluation ends with one JSON line."""
import json
import subprocess
import sys

from progvlm.cli.main import build_parser, main

COMMANDS = ["train-vlm", "eval-vlm", "train-mae", "eval-mae", "ask", "make-examples"]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "progvlm", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for c in COMMANDS:
        assert c in out


def test_evaluation_commands_take_seed_and_json():
    parser = build_parser()
    for c in ("eval-vlm", "eval-mae"):
        a = parser.parse_args([c, "--seed", "3", "--json"])
        assert a.seed == 3 and a.json


def test_eval_vlm_json_is_the_last_line(capsys):
    assert main(["eval-vlm", "--questions", "40", "--seed", "11", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["questions"] == 40 and rep["seed"] == 11
    assert set(rep["per_type"]) <= {"colour", "shape", "count", "exist", "spatial", "size", "describe"}
    assert rep["timing"]["edge_half_ms"] > 0


def test_bad_arguments_are_refused_with_a_message(capsys):
    assert main(["eval-vlm", "--questions", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["ask", "--image", "/nonexistent.png", "--question", "hi"]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_eval_mae_json_has_every_k_and_the_baselines(capsys):
    assert main(["eval-mae", "--questions", "14", "--seed", "12", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["k"] for r in rep["per_k"]] == [1, 2, 3, 4]
    for r in rep["per_k"]:
        assert r["bytes_max"] >= r["bytes_mean"] > 0 and 0 <= r["consistency"] <= 1
    assert rep["per_k"][0]["bytes_mean"] < rep["per_k"][-1]["bytes_mean"]
    assert {"raw_fp16", "jpeg_q10", "jpeg_q50", "jpeg_q90", "pool_k1"} <= set(rep["baselines"])
    assert rep["baselines"]["raw_fp16"]["bytes_mean"] == 64 * 128 * 2
    assert rep["baselines"]["raw_fp16"]["consistency"] > 0.99  # fp16 barely changes answers
