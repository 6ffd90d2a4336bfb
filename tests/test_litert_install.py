"""Done-when of issue 19: the example scenes answer correctly through `--runtime litert` in
progressive mode against a running cloud, in a venv without PyTorch. The board's install
(`pip install ".[edge-litert]"`: ai-edge-litert, no PyTorch) goes into a fresh venv, and its
`edge-agent ask` runs the shipped int8 export of the bundled edge half
(assets/edge_litert_int8; tests/test_shipped_export.py keeps it current) against a cloud on
loopback, every question of every example scene checked against its ground truth. Slow: it builds
the package and installs its dependencies into a new venv (from pip's cache where they are)."""
import json
import os
import subprocess

import pytest
from board_venv import board_venv

from edge_agent.litert_runtime import SHIPPED_INT8_EXPORT
from progvlm import ROOT
from progvlm.serve.children import cloud_service
from progvlm.toyworld.examples import load_examples


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A venv with only `.[edge-litert]` installed (no PyTorch): its bin folder."""
    return board_venv(tmp_path_factory.mktemp("board-litert"), "edge-litert")


@pytest.mark.slow
def test_the_edge_litert_extra_installs_no_pytorch(board, tmp_path):
    probe = ("import importlib.util, progvlm, edge_agent; "
             "print(importlib.util.find_spec('torch') is None, "
             "importlib.util.find_spec('ai_edge_litert') is not None, progvlm.__file__)")
    out = subprocess.run([str(board / "python"), "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    no_torch, has_litert, location = out.stdout.split()
    assert no_torch == "True", "the [edge-litert] install pulled PyTorch"
    assert has_litert == "True", "the [edge-litert] install has no LiteRT interpreter"
    assert str(ROOT) not in location, f"imported the checkout, not the install: {location}"


@pytest.mark.slow
def test_the_examples_answer_correctly_through_litert_in_progressive_mode(board, tmp_path):
    examples = load_examples()
    manifest = json.loads((SHIPPED_INT8_EXPORT / "manifest.json").read_text())
    with cloud_service() as cloud:
        for ex in examples:
            questions = [q["question"] for q in ex["questions"]]
            more = [arg for q in questions[1:] for arg in ("--question-more", q)]
            out = subprocess.run(
                [str(board / "edge-agent"), "ask", "--runtime", "litert",
                 "--model-dir", str(SHIPPED_INT8_EXPORT), "--cloud-url", cloud.url,
                 "--image", str(ex["path"]), "--question", questions[0], *more,
                 "--mode", "progressive", "--rtt-ms", "0", "--bandwidth-mbps", "100"],
                cwd=tmp_path, capture_output=True, text=True, timeout=300,
                env={**os.environ, "PROGVLM_CLOUD_TOKEN": cloud.token})
            assert out.returncode == 0, out.stderr[-3000:]
            records = json.loads(out.stdout)
            assert len(records) == len(questions)
            for record, q in zip(records, ex["questions"]):
                assert (record["mode"], record["runtime"], record["delegate"]) == (
                    "progressive", "litert", "xnnpack"), record
                assert record["vlm_id"] == manifest["vlm_id"] and manifest["int8"] is True
                assert record["answer"] == q["answer"], (ex["file"], q, record["answer"])
