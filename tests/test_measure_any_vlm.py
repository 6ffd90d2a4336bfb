"""Measuring any VLM: eval-mae --images and bench --images on tiny random transformers VLMs with
an untrained MAE (random weights: the figures are bytes and timing, answers are gibberish), and
the projected NPU device profile."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progvlm.backends import load_vlm
from progvlm.backends.random_hf import write_random_vlm
from progvlm.cli.main import main
from progvlm.images import load_image
from progvlm.models.mae import MAE, MAEConfig
from progvlm.training.train_mae import save_mae


def untrained_mae(vlm_folder: Path, images: list[Path], out: Path) -> Path:
    """An MAE whose codebooks are initialised from the VLM's tokens, nothing trained."""
    vlm = load_vlm(vlm_folder)
    N = vlm.tokens_per_block
    blocks = torch.cat([vlm.edge_half(load_image(p)).float().view(-1, N, vlm.token_dim)
                        for p in images])
    mae = MAE(MAEConfig(vlm_id=vlm.model_id, num_tokens=N, token_dim=vlm.token_dim))
    mae.token_mean.copy_(blocks.mean((0, 1)))
    mae.token_std.copy_(blocks.std((0, 1)).clamp_min(1e-4))
    mae.train()
    with torch.no_grad():
        for k in range(1, mae.cfg.num_layers + 1):
            mae(blocks, torch.full((len(blocks),), k))
    mae.eval()
    mae.invalidate_caches()
    save_mae(mae, out, {"note": "untrained, for tests"})
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 80), (72, 56)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image: skipped and reported")
    return folder


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-idefics3-split"])
def pair(request, tmp_path_factory, images) -> tuple[Path, Path]:
    """(VLM folder, MAE folder) of a random-weight preset."""
    root = tmp_path_factory.mktemp(request.param)
    vlm = write_random_vlm(root / "vlm", request.param)
    return vlm, untrained_mae(vlm, sorted(images.glob("*.png")), root / "mae")


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory, images) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench-llava")
    vlm = write_random_vlm(root / "vlm", "tiny-llava")
    return vlm, untrained_mae(vlm, sorted(images.glob("*.png")), root / "mae")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_mae_on_images_reports_every_k_and_the_baselines(pair, images, tmp_path, capsys):
    vlm, mae = pair
    questions = tmp_path / "questions.txt"
    questions.write_text("# one per line\n\nDescribe the image.\n")
    assert main(["eval-mae", "--vlm", str(vlm), "--mae", str(mae), "--images", str(images),
                 "--questions", str(questions), "--max-new-tokens", "2", "--json"]) == 0
    rep = _last_json(capsys)
    assert rep["images"] == 2 and rep["questions"] == ["Describe the image."]
    assert len(rep["skipped"]) == 1 and "notes.txt" in rep["skipped"][0]
    ks = rep["per_k"]
    assert [r["k"] for r in ks] == [1, 2, 3, 4]
    assert all(a["bytes_mean"] < b["bytes_mean"] for a, b in zip(ks, ks[1:]))
    for r in ks + list(rep["baselines"].values()):
        assert 0.0 <= r["agreement"] <= 1.0 and -1.0 <= r["consistency"] <= 1.0
    base = rep["baselines"]
    assert set(base) == {"raw_fp16", "jpeg_camera_q90", "jpeg_q90"}  # one name per codec (eval.codecs)
    assert base["raw_fp16"]["agreement"] == 1.0  # fp16 rounding does not change these answers
    assert ks[-1]["bytes_mean"] < base["raw_fp16"]["bytes_mean"]


def test_eval_mae_without_images_on_a_non_bundled_vlm_says_to_pass_images(pair, capsys):
    vlm, mae = pair
    assert main(["eval-mae", "--vlm", str(vlm), "--mae", str(mae)]) == 2
    err = capsys.readouterr().err
    assert "only for the bundled model" in err and "--images" in err


def test_bench_cost_profile_writes_results(llava_pair, images, tmp_path, capsys):
    vlm, mae = llava_pair
    out = tmp_path / "bench"
    assert main(["bench", "--vlm", str(vlm), "--mae", str(mae), "--images", str(images),
                 "--out", str(out), "--max-new-tokens", "4", "--cloud-device", "cpu", "--json"]) == 0
    headline = _last_json(capsys)
    r = json.loads((out / "results.json").read_text())
    assert r["images"] == 2 and len(r["skipped"]) == 1 and "notes.txt" in r["skipped"][0]
    assert "random weights" in r["note"] and (out / "summary.md").stat().st_size > 500
    for key in ("edge_vision_ms", "lm_ms_per_token", "mae_encode_share_of_edge", "vision_macs",
                "bytes_per_k", "jpeg_bytes", "end_to_end_1mbps_ms", "crossover", "profiles"):
        assert key in r and key in headline or key == "profiles", key
    assert r["edge_vision_ms"] > 0 and r["vision_macs"] > 0
    video = r["video"]  # a pan-and-zoom clip over the 2 readable images, coded both ways
    assert video["frames"] == 2 * video["frames_per_image"] and video["images"] == 2
    for k in ("k1", f"k{len(r['bytes_per_k'])}"):
        assert 0 < video[k]["bytes_per_frame_temporal"] <= video[k]["bytes_per_frame_intra"]
    assert "## Video" in (out / "summary.md").read_text()
    assert 0 < r["mae_encode_share_of_edge"] < 1
    bytes_per_k = list(r["bytes_per_k"].values())
    assert bytes_per_k == sorted(bytes_per_k) and r["jpeg_bytes"]["camera"] > 0
    assert set(r["end_to_end_1mbps_ms"]) == {"host", "imx95-emulated", "imx95-npu-projected"}
    for device, modes in r["end_to_end_1mbps_ms"].items():
        assert {"full-edge", "full-cloud", "progressive-k1", "progressive-k4"} <= set(modes)
        intervals = r["crossover"][device]["k=4"]
        assert intervals[0]["from_mbps"] == 0.01 and intervals[-1]["to_mbps"] == 10_000
    assert r["profiles"]["imx95-npu-projected"]["projected"]
    assert not r["profiles"]["host"]["projected"]


def test_the_paper_style_bench_refuses_a_non_bundled_vlm_without_images(pair, capsys):
    vlm, mae = pair
    assert main(["bench", "--vlm", str(vlm), "--mae", str(mae)]) == 2
    assert "--images" in capsys.readouterr().err


def test_the_npu_profile_is_projected_and_stated(monkeypatch):
    from edge_agent.profiles import NPU_PROFILE, get_profile, npu_profile
    monkeypatch.setenv("PROGVLM_NPU_INT8_MAC_FRACTION", "1")  # every MAC int8 (the split: test_npu_projection.py)
    p = npu_profile()
    assert p.name == NPU_PROFILE == "imx95-npu-projected" and p.projected
    assert p.source.startswith("projected") and "2 TOPS" in p.source and "25 %" in p.source
    # 1 GMAC = 2 Gops at 2 TOPS × 25 % = 0.5 Tops/s → 4 ms; other stages × the A55 factor
    assert p.stage_ms("edge_vision", 123.0, vision_macs=1e9) == pytest.approx(4.0)
    assert p.stage_ms("mae_encode", 2.0) == pytest.approx(2.0 * p.compute_factor)
    with pytest.raises(ValueError, match="MACs"):
        p.stage_ms("edge_vision", 1.0)
    with pytest.raises(ValueError, match="cost projection"):  # the agent cannot run it (yet)
        get_profile(NPU_PROFILE)
    assert not get_profile("host").projected
