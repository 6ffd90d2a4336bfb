"""The ONNX Runtime edge: the same tokens, streams and answers as PyTorch, with no PyTorch."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.onnx_export import export_onnx
from edge_agent.onnx_runtime import ExportError, OnnxRuntime
from edge_agent.runtime import PyTorchRuntime
from progvlm.examples import load_examples
from progvlm.images import load_image

ROOT = Path(__file__).resolve().parents[1]
TOKEN_TOLERANCE = 1e-3  # max |ONNX − PyTorch| over the visual tokens (measured ≈ 1e-5; |T| ≈ 1–10)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(out)
    return out


@pytest.fixture(scope="module")
def runtimes(export_dir):
    return PyTorchRuntime.bundled(), OnnxRuntime.load(export_dir)


def test_the_export_matches_pytorch_on_every_example(runtimes):
    torch_rt, onnx_rt = runtimes
    assert onnx_rt.model_id == torch_rt.model_id and onnx_rt.mae_fingerprint == torch_rt.mae_fingerprint
    identical = 0
    for ex in load_examples():
        pixels = onnx_rt.preprocess(load_image(ex["path"]))
        a, b = torch_rt.vision(pixels), onnx_rt.vision(pixels)
        assert np.abs(a - b).max() <= TOKEN_TOLERANCE
        stream = onnx_rt.mae_encode(b, 4)
        tokens, bs = torch_rt.mae.decompress(stream)  # the PyTorch cloud decodes it
        assert len(bs.layers) == 4 and tokens.shape == (64, 128)
        identical += stream == torch_rt.mae_encode(a, 4)
        for q in ex["questions"]:
            assert onnx_rt.language(b, q["question"]) == torch_rt.language(a, q["question"])
    # near-ties in the code assignment may flip under 1e-5 differences; most streams are equal
    assert identical >= len(load_examples()) - 1


def test_the_codec_gives_the_bytes_of_the_pytorch_mae_for_the_same_latent(runtimes):
    torch_rt, onnx_rt = runtimes
    tokens = torch_rt.vision(torch_rt.preprocess(load_image(load_examples()[1]["path"])))
    latent = torch_rt.mae.encode_latent(torch.from_numpy(tokens)).detach().numpy()
    for k in (1, 4):
        assert onnx_rt.codec.compress(latent, k) == torch_rt.mae.compress(torch.from_numpy(tokens), k)


def test_the_board_runtime_runs_without_torch(export_dir):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edge_agent.onnx_runtime import OnnxRuntime\n"
            "from progvlm.images import load_image\n"
            f"rt = OnnxRuntime.load({str(export_dir)!r})\n"
            f"t = rt.vision(rt.preprocess(load_image({load_examples()[2]['path']!r})))\n"
            "print(len(rt.mae_encode(t, 2)), rt.language(t, 'describe the scene .'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    nbytes, answer = out.stdout.split(" ", 1)
    assert int(nbytes) > 12 and answer.strip()


def test_a_broken_export_folder_is_refused_clearly(export_dir, tmp_path):
    with pytest.raises(ExportError, match="no manifest.json"):
        OnnxRuntime.load(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "language.onnx").unlink()
    with pytest.raises(ExportError, match="language.onnx is missing"):
        OnnxRuntime.load(broken)
    shutil.copy(export_dir / "language.onnx", broken / "language.onnx")
    with open(broken / "vision.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ExportError, match="vision.onnx does not match"):
        OnnxRuntime.load(broken)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert set(manifest["sha256"]) >= {"vision.onnx", "mae_encoder.onnx", "language.onnx"}


def test_the_agent_runs_on_the_onnx_runtime(runtimes):
    from edge_agent.agent import EdgeAgent
    from edge_agent.profiles import get_profile
    torch_rt, onnx_rt = runtimes
    path = load_examples()[3]["path"]
    record = EdgeAgent(onnx_rt, profile=get_profile("imx95-emulated")).ask(path, "describe the scene .", "full-edge")
    assert record["runtime"] == "onnxruntime" and record["projected_stages"]
    assert record["answer"] == torch_rt.language(torch_rt.vision(torch_rt.preprocess(load_image(path))),
                                                 "describe the scene .")
