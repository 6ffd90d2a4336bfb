"""The bundled model's int8 LiteRT export ships in assets/edge_litert_int8 (what the board copies
and what tests/test_litert_install.py runs without PyTorch). It must stay the export of the
bundled weights: these tests fail when assets/tiny_vlm or assets/mae change without a re-export
(`python -m edge_agent export --runtime litert --int8 --out assets/edge_litert_int8`, with
`pip install -e .[litert]`). No LiteRT needed."""
import json

import pytest

from edge_agent.exported import ExportError, check_files, read_manifest
from edge_agent.litert_runtime import (EXPORT_HINT, FORMAT, MODELS, REQUIRED_FILES,
                                       SHIPPED_INT8_EXPORT)
from progvlm.split import load_split

MB = 1 << 20


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(SHIPPED_INT8_EXPORT, FORMAT, REQUIRED_FILES, EXPORT_HINT)


def test_the_shipped_export_is_the_bundled_models_int8_edge(manifest):
    split = load_split()
    assert manifest["vlm_id"] == split.vlm.model_id, "assets/tiny_vlm changed: re-export"
    assert manifest["mae_fingerprint"] == split.mae.fingerprint().hex(), "assets/mae changed: re-export"
    assert manifest["int8"] is True and manifest["calibration"]["frames"] > 0
    assert (manifest["num_layers"], manifest["num_tokens"], manifest["image_size"]) == (
        split.num_layers, split.vlm.tokens_per_block, split.vlm.input_size)
    check_files(SHIPPED_INT8_EXPORT, manifest["sha256"])  # every file as exported


def test_the_shipped_coding_tables_are_the_bundled_maes(manifest, tmp_path):
    """The tables the board codes with equal those the bundled MAE writes now."""
    from edge_agent.exported import sha256
    load_split().mae.edge_codec().save(tmp_path)
    for name in REQUIRED_FILES:
        if not name.endswith(".tflite"):
            assert sha256(tmp_path / name) == manifest["sha256"][name], name


def test_the_shipped_export_is_small_and_plain():
    files = sorted(p.name for p in SHIPPED_INT8_EXPORT.iterdir())
    assert files == sorted([*REQUIRED_FILES, "manifest.json"])
    assert all(f"{m}.tflite" in files for m in MODELS)
    assert sum(p.stat().st_size for p in SHIPPED_INT8_EXPORT.iterdir()) < 2 * MB


def test_a_stale_export_is_caught(manifest, tmp_path):
    """What the first test relies on: a changed file or a manifest naming another MAE is seen."""
    import shutil
    copy = tmp_path / "export"
    shutil.copytree(SHIPPED_INT8_EXPORT, copy)
    data = bytearray((copy / "vision.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "vision.tflite").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="vision.tflite"):
        check_files(copy, manifest["sha256"])
    # tables of another MAE than the manifest names are refused by every exported runtime
    from edge_agent.exported import ExportedRuntime

    class Tables(ExportedRuntime):  # the manifest and tables checks only, no engine
        language = latent = set_threads = vision = None
    assert Tables(SHIPPED_INT8_EXPORT, manifest).mae_fingerprint == load_split().mae.fingerprint()
    with pytest.raises(ExportError, match="coding tables are for MAE"):
        Tables(copy, dict(manifest, mae_fingerprint="00000000"))
