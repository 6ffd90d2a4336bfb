"""The LiteRT edge (issue 19): the int8 export of the edge half answers the example scenes in
progressive mode against a running cloud, on ai-edge-litert's interpreter and without PyTorch.
With litert-torch (`pip install -e .[litert]`) the export is made afresh, else the shipped one
(assets/edge_litert_int8) is tested; skipped where the interpreter is not installed. The same
answers in a fresh venv without PyTorch: tests/test_litert_install.py (slow, runs in CI)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (the LiteRT interpreter) is not "
                    "installed: pip install -e .[edge-litert]")

from cloud_server import serving  # noqa: E402

from edge_agent.agent import EdgeAgent  # noqa: E402
from edge_agent.litert_export import export_litert, op_coverage  # noqa: E402
from edge_agent.exported import ExportError  # noqa: E402
from edge_agent.litert_runtime import SHIPPED_INT8_EXPORT, XNNPACK, LiteRTRuntime  # noqa: E402
from edge_agent.runtime import PyTorchRuntime  # noqa: E402
from progvlm.images import load_image  # noqa: E402
from progvlm.serve.cloud import create_app  # noqa: E402
from progvlm.toyworld.examples import load_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = load_examples()
TOKEN = "litert-test-token"
# |int8 latent − float32 latent| on the examples: measured ≈0.4 (median of the max over tokens,
# latent values up to ≈10); 1.0 flags a broken quantisation (scales or zero points wrong)
LATENT_TOLERANCE = 1.0


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    if importlib.util.find_spec("litert_torch") is None:  # the exporter is not here
        return SHIPPED_INT8_EXPORT
    out = tmp_path_factory.mktemp("litert")
    export_litert(out, int8=True)
    return out


@pytest.fixture(scope="module")
def runtimes(export_dir):
    return PyTorchRuntime.load(), LiteRTRuntime.load(export_dir, threads=1)


def test_the_int8_export_is_full_integer_and_names_the_same_models(export_dir, runtimes):
    torch_rt, rt = runtimes
    for attr in ("model_id", "mae_fingerprint", "num_layers", "tokens_per_block", "image_size"):
        assert getattr(rt, attr) == getattr(torch_rt, attr), attr
    assert rt.int8 and rt.info()["delegate"] == XNNPACK
    mae = op_coverage(export_dir / "mae_encoder.tflite")
    assert mae["int8_fraction"] == 1.0  # Gemm → GELU → Gemm, all int8
    vision = op_coverage(export_dir / "vision.tflite")
    # measured: 30 % of the ops, 97 % of the MACs (LayerNorm, softmax and the attention
    # matmuls stay float)
    assert vision["int8_fraction"] > 0.2 and vision["int8_mac_fraction"] > 0.9


def test_int8_latents_are_close_to_float32(runtimes):
    torch_rt, rt = runtimes
    mae = torch_rt.split.mae
    for ex in EXAMPLES:
        x = rt.preprocess(load_image(ex["path"]))
        tokens = rt.vision(x)[0]
        assert tokens.shape == (64, 128) and tokens.dtype == np.float32
        reference = mae.encode_latent(torch_rt.vision(x)[0]).detach().numpy()
        assert np.abs(rt.latent(tokens) - reference).max() < LATENT_TOLERANCE


def test_the_examples_answer_correctly_in_progressive_mode_against_a_cloud(runtimes):
    torch_rt, rt = runtimes
    with serving(create_app(torch_rt.split, token=TOKEN), log_level="warning") as url:
        agent = EdgeAgent(rt, url, TOKEN)
        for ex in EXAMPLES:
            for q in ex["questions"]:
                r = agent.ask(ex["path"], q["question"], "progressive", k=rt.num_layers)
                assert r["runtime"] == "litert" and r["delegate"] == XNNPACK
                assert r["answer"] == q["answer"], (ex["file"], q)


def test_full_edge_is_refused_clearly(runtimes):
    _, rt = runtimes
    with pytest.raises(ValueError, match="edge half only"):
        rt.language(np.zeros((64, 128), np.float32), "describe the scene .")


def test_a_delegate_that_cannot_load_fails_at_load(export_dir, monkeypatch):
    monkeypatch.setenv("PROGVLM_LITERT_DELEGATE", str(export_dir / "no_such_delegate.so"))
    with pytest.raises((ValueError, OSError)):
        LiteRTRuntime.load(export_dir)


def test_a_broken_export_folder_is_refused(export_dir, tmp_path):
    with pytest.raises(ExportError, match="no manifest.json"):
        LiteRTRuntime.load(tmp_path)


def test_the_board_runtime_runs_without_torch(export_dir):
    path = EXAMPLES[2]["path"]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edge_agent.litert_runtime import LiteRTRuntime\n"
            "from progvlm.images import load_image\n"
            f"rt = LiteRTRuntime.load({str(export_dir)!r}, threads=1)\n"
            f"t, grid = rt.vision(rt.preprocess(load_image({path!r})))\n"
            "print(len(rt.frame_bytes(rt.mae_encode(t, 2), len(t))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) > 12


def test_eval_mae_measures_the_int8_edge(export_dir, capsys):
    import json

    from progvlm.cli.main import main
    assert main(["eval-mae", "--edge-runtime", "litert", "--model-dir", str(export_dir),
                 "--questions", "14", "--seed", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["edge_runtime"] == "litert" and report["int8"] is True
    assert [r["k"] for r in report["per_k"]] == [1, 2, 3, 4]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["consistency"] <= 1 for r in report["per_k"])
    assert report["op_coverage"]["mae_encoder"]["int8_mac_fraction"] == 1.0
