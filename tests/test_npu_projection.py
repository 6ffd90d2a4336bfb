"""imx95-npu-projected from the measured int8 coverage (issue 19): the vision half's int8 MACs on
the NPU (projected from MACs), its float fallback on the Cortex-A55s (host-measured × its MAC
share × the imx95 factor); the coverage read from the measurement files in docs/bench, with a
stated fallback; the shipped cost profile's projections (the README's crossover table) current."""
import json
import shutil
from pathlib import Path

import pytest

from edge_agent.profiles import (COVERAGE_ENV, COVERAGE_MEASUREMENTS, MEASUREMENTS, NPU_PROFILE,
                                 DeviceProfile, NPUAssumption, NPUCoverage, npu_profile,
                                 vision_coverage)

ROOT = Path(__file__).resolve().parents[1]
STANDIN_PROFILE = ROOT / "docs" / "bench" / "smolvlm-256m-shape"
ENV = (COVERAGE_ENV, "PROGVLM_NPU_TOPS", "PROGVLM_NPU_UTILISATION", "PROGVLM_IMX95_FACTOR")


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def profile(fraction: float, factor: float = 7.0, tops: float = 2.0, utilisation: float = 0.25):
    return DeviceProfile(NPU_PROFILE, factor, 1, "test", NPUAssumption(tops, utilisation),
                         NPUCoverage(fraction, "test", True))


def test_the_int8_macs_go_to_the_npu_and_the_float_rest_to_the_a55s():
    p = profile(0.75)
    # NPU: 2 × 0.75 GMAC / (2 TOPS × 0.25) = 3 ms; A55: 100 ms × 0.25 × 7 = 175 ms
    split = p.vision_split_ms(100.0, 1e9)
    assert split["npu"] == pytest.approx(3.0) and split["a55_fallback"] == pytest.approx(175.0)
    assert p.stage_ms("edge_vision", 100.0, vision_macs=1e9) == pytest.approx(178.0)
    # the other stages: host × factor, whatever the coverage
    assert p.stage_ms("edge_preprocess", 10.0, vision_macs=1e9) == pytest.approx(70.0)
    details = p.details(100.0, 1e9)
    assert details["edge_vision_npu_ms"] == pytest.approx(3.0)
    assert details["edge_vision_a55_fallback_ms"] == pytest.approx(175.0)
    assert details["int8_mac_fraction"] == 0.75


def test_the_ends_of_the_coverage_are_the_old_and_the_a55_profiles():
    assert profile(1.0).stage_ms("edge_vision", 500.0, 3e9) == pytest.approx(12.0)  # NPU only
    assert profile(0.0, factor=5.0).stage_ms("edge_vision", 40.0, 3e9) == pytest.approx(200.0)
    # more int8 is never slower while the NPU beats the A55s on a MAC
    times = [profile(f).stage_ms("edge_vision", 2786.0, 107.4e9) for f in (0.5, 0.8, 0.95)]
    assert times == sorted(times, reverse=True)


def test_an_npu_profile_without_coverage_is_refused():
    with pytest.raises(ValueError, match="coverage"):
        DeviceProfile(NPU_PROFILE, 7.0, 1, "test", NPUAssumption())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NPUCoverage(1.2, "test", True)
    with pytest.raises(ValueError, match="MACs"):
        profile(0.5).stage_ms("edge_vision", 1.0)


def write_measurements(folder: Path, fractions: dict[str, float]):
    for family, fraction in fractions.items():
        name, keys = COVERAGE_MEASUREMENTS[family]
        entry = {"int8_mac_fraction": fraction, "ops": 10}
        for key in reversed(keys):
            entry = {key: entry}
        (folder / name).write_text(json.dumps(entry))


def test_coverage_is_read_per_family_with_a_stated_fallback(tmp_path, monkeypatch):
    write_measurements(tmp_path, {"bundled": 0.9, "idefics3": 0.6})
    bundled = vision_coverage("bundled", tmp_path)
    assert bundled.int8_mac_fraction == 0.9 and bundled.measured
    unknown = vision_coverage("llava", tmp_path)  # no measurement: the lowest measured
    assert unknown.int8_mac_fraction == 0.6 and not unknown.measured
    assert "fallback" in unknown.source and "idefics3" in unknown.source
    monkeypatch.setenv(COVERAGE_ENV, "0.35")
    forced = vision_coverage("bundled", tmp_path)
    assert forced.int8_mac_fraction == 0.35 and COVERAGE_ENV in forced.source
    for bad in ("lots", "1.5"):
        monkeypatch.setenv(COVERAGE_ENV, bad)
        with pytest.raises(ValueError, match=COVERAGE_ENV if bad == "lots" else r"\[0, 1\]"):
            vision_coverage("bundled", tmp_path)
    monkeypatch.delenv(COVERAGE_ENV)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=COVERAGE_ENV):
        vision_coverage("bundled", empty)


def test_the_shipped_measurements_are_the_ones_the_profile_uses():
    standin = json.loads((MEASUREMENTS / "litert_standin.json").read_text())["int8"]
    bundled = json.loads((MEASUREMENTS / "litert_int8_eval_mae.json").read_text())
    p = npu_profile("idefics3")
    assert p.coverage.measured and p.coverage.int8_mac_fraction == standin["int8_mac_fraction"]
    assert f"{100 * standin['int8_mac_fraction']:.1f} %" in p.source and "projected" in p.source
    assert (vision_coverage("bundled").int8_mac_fraction
            == bundled["op_coverage"]["vision"]["int8_mac_fraction"])
    # the fraction's MACs are the same model's: the export's count matches the bench's
    results = json.loads((STANDIN_PROFILE / "results.json").read_text())
    assert standin["macs"] == pytest.approx(results["vision_macs"], rel=0.01)


def test_the_shipped_cost_profile_is_projected_with_the_measured_coverage(tmp_path):
    """The README's crossover table comes from docs/bench/smolvlm-256m-shape: reprojecting it
    (`python -m progvlm bench --reproject docs/bench/smolvlm-256m-shape`) changes nothing."""
    from progvlm.cli.main import main
    copy = tmp_path / "profile"
    shutil.copytree(STANDIN_PROFILE, copy)
    assert main(["bench", "--reproject", str(copy), "--json"]) == 0
    fresh = json.loads((copy / "results.json").read_text())
    shipped = json.loads((STANDIN_PROFILE / "results.json").read_text())
    for key in ("profiles", "crossover", "crossover_ideal_cloud", "end_to_end_1mbps_ms"):
        assert fresh[key] == shipped[key], key  # the same arithmetic on the same medians
    assert (copy / "summary.md").read_text() == (STANDIN_PROFILE / "summary.md").read_text()
    npu = shipped["profiles"][NPU_PROFILE]
    m = shipped["measured_medians"]
    f, p = npu["int8_mac_fraction"], npu_profile("idefics3")
    ops_per_s = p.npu.peak_tops_int8 * 1e12 * p.npu.utilisation
    assert npu["edge_vision_ms"] == pytest.approx(
        2 * m["vision_macs"] * f / ops_per_s * 1e3 + m["edge_vision_ms"] * (1 - f) * p.compute_factor)
    assert npu["edge_vision_a55_fallback_ms"] > npu["edge_vision_npu_ms"] > 0
    assert npu["coverage_measured"] and f < 1
