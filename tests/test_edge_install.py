"""A board's install: `pip install ".[edge]"` in a fresh virtual environment gives the
`edge-agent` command without PyTorch, and it answers a progressive request against a running
cloud with the ONNX export (issue 17). Slow: it builds the package and installs its
dependencies into a new venv (from pip's cache where they are there)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from board_venv import board_venv

from edge_agent.onnx_export import export_onnx
from edge_agent.runtime import PyTorchRuntime
from progvlm.images import load_image
from progvlm.serve.children import cloud_service
from progvlm.toyworld.examples import load_examples

ROOT = Path(__file__).resolve().parents[1]
Q = "describe the scene ."


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A venv with only `.[edge]` installed (no PyTorch): its bin folder."""
    return board_venv(tmp_path_factory.mktemp("board"), "edge")


@pytest.mark.slow
def test_the_edge_extra_installs_no_pytorch(board, tmp_path):
    probe = ("import importlib.util, progvlm, edge_agent; "
             "print(importlib.util.find_spec('torch') is None, progvlm.__file__)")
    out = subprocess.run([str(board / "python"), "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    no_torch, location = out.stdout.split()
    assert no_torch == "True", "the [edge] install pulled PyTorch"
    assert str(ROOT) not in location, f"imported the checkout, not the install: {location}"
    helped = subprocess.run([str(board / "edge-agent"), "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "edge" in helped.stdout, helped.stderr


@pytest.mark.slow
def test_the_installed_edge_agent_answers_a_progressive_request(board, tmp_path):
    exported = tmp_path / "exported"
    export_onnx(exported)  # on the development machine, with PyTorch
    example = load_examples()[1]["path"]
    runtime = PyTorchRuntime.load()
    expected = runtime.split.cloud(runtime.split.edge(load_image(example), 2), Q).text
    with cloud_service() as cloud:
        out = subprocess.run(
            [str(board / "edge-agent"), "ask", "--runtime", "onnx", "--model-dir", str(exported),
             "--cloud-url", cloud.url, "--image", str(example), "--question", Q,
             "--mode", "progressive", "--k", "2", "--rtt-ms", "0", "--bandwidth-mbps", "100"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PROGVLM_CLOUD_TOKEN": cloud.token})
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout)
    assert (record["mode"], record["k"], record["runtime"]) == ("progressive", 2, "onnxruntime"), record
    assert record["answer"] == expected
