"""The benchmark command: runs in CI time with --quick, writes its results, prints its JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from progvlm.bench.experiment import scene_graph_bits
from progvlm.toyworld.data import EVAL_STREAM, scenes

ROOT = Path(__file__).resolve().parents[1]


def test_the_information_floor_counts_the_scene_graph():
    one, *_ = [s for s in scenes(EVAL_STREAM, 0, 50) if len(s.objects) == 1]
    three, *_ = [s for s in scenes(EVAL_STREAM, 0, 50) if len(s.objects) == 3]
    per_object = math.log2(6) + math.log2(4) + 1 + 6
    assert math.isclose(scene_graph_bits(one), 2 + per_object)
    assert math.isclose(scene_graph_bits(three) - scene_graph_bits(one), 2 * per_object)


def test_a_video_row_counts_one_delay_per_detected_event():
    from edge_agent.watch import WatchSettings
    from progvlm.bench.video import _row
    q = "how many objects are there ?"
    events = {0: [q], 4: [q]}  # the start, then one event two frames after the first change
    records = [{"index": i, "kind": "delta", "bytes": 10, "resync": None, "total_ms": 30.0 + i,
                "wall_ms": 40.0, "stage_ms": {"uplink": 10.0, "cloud": 20.0 + i},
                "events": [{"question": e, "answer": str(i), "previous": None} for e in events.get(i, [])]}
               for i in range(6)]
    row = _row("emulated", records, {q: [0, 2, 3]}, WatchSettings(questions=[q], fps=8.0))
    assert (row["events_detected"], row["events_missed"], row["events_false"]) == (1, 1, 0)
    assert row["event_delay_ms_median"] == round(2 / 8.0 * 1e3 + 34.0, 1)  # change 2's, not also 3's
    assert row["method"] == "temporal" and row["frames"] == 6 and row["sustained_fps"] == 25.0
    assert row["bytes_per_frame"] == row["bytes_per_later_frame"] == 10
    assert row["stage_ms_mean"] == {"uplink": 10.0, "cloud": 22.5}


@pytest.mark.slow  # the whole quick benchmark: 80 s on a busy two-core host
def test_bench_quick_writes_results_and_prints_the_headline(tmp_path):
    out = subprocess.run([sys.executable, "-m", "progvlm", "bench", "--quick", "--json", "--seed", "3",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    headline = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1 <= headline["k_star"] <= 4 and headline["k_star_consistency"] >= 0.97
    assert 0 < headline["bytes_vs_raw_fp16"] < headline["bytes_vs_jpeg_q90_model"] < 1
    backends = list(dict.fromkeys(r["backend"] for r in headline["load"]))
    assert len(backends) == 2 and "batched" in backends[1]  # --quick: no Ray
    assert [r["clients"] for r in headline["load"]] == [1, 4, 16] * 2
    assert all(r["failed"] == 0 and r["requests"] > 0 for r in headline["load"])
    versus = headline["progressive_vs"]
    assert sum(name.startswith("full-cloud") for name in versus) == 3 and "full-edge" in versus
    assert all(v["low"] <= v["ratio"] <= v["high"] for v in versus.values())
    floor = headline["edge_floor"]
    assert list(floor) == ["pytorch", "onnxruntime", "litert-float32", "litert-int8"]
    ran = {name: f for name, f in floor.items() if "skipped" not in f}
    assert {"pytorch", "onnxruntime"} <= set(ran)  # LiteRT only where its packages are installed
    assert all(0 < f["mae_share_of_edge_k1"] < 1 for f in ran.values())
    assert all(lo <= f[key] <= hi for f in ran.values() for key, (lo, hi) in f["ranges"].items())
    a = headline["adaptive"]
    assert a["k1_bytes_mean"] <= a["bytes_mean"] <= a["k4_bytes_mean"] and 0 <= a["ece"] <= 1
    talk = {(r["mode"], r["conversation"]): r for r in headline["conversation"]}
    for mode in ("adaptive", "progressive"):  # the frame's bytes go once in a conversation
        assert talk[(mode, True)]["bytes_total"] < talk[(mode, False)]["bytes_total"]
    for name in ("summary.md", "results.json", "rate_accuracy.csv", "latency.csv", "load.csv",
                 "breakdown_1mbps.csv", "conversation.csv", "rate_accuracy.png", "latency_vs_bandwidth.png",
                 "breakdown_1mbps.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    latency = (tmp_path / "latency.csv").read_text()
    assert "imx95-emulated (projected)" in latency and "full-cloud" in latency
    video = {(r["method"], r["link"]): r for r in headline["video"]["rows"]}
    links = {link for _, link in video} - {"none"}
    assert {m for m, _ in video} == {"temporal", "adaptive", "intra", "jpeg", "h264", "full-edge"}
    for link in links:  # temporal sends a fraction of intra's bytes, and far less than video codecs
        assert video[("temporal", link)]["bytes_per_later_frame"] < 0.5 * video[("intra", link)]["bytes_per_later_frame"]
        assert video[("temporal", link)]["bytes_per_frame"] * 100 < video[("h264", link)]["bytes_per_frame"]
        assert video[("temporal", link)]["sustained_fps"] > video[("jpeg", link)]["sustained_fps"]
        assert video[("temporal", link)]["events_missed"] == 0
    assert "## Video" in (tmp_path / "summary.md").read_text() and (tmp_path / "video.csv").exists()


def test_the_edge_profile_gives_medians_with_their_ranges(capsys):
    from edge_agent.__main__ import main
    from progvlm.bench.report import _ranged
    from progvlm.toyworld.examples import load_examples
    paths = [str(ex["path"]) for ex in load_examples()[:3]]
    assert main(["profile", "--images", *paths, "--repeats", "2"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["frames"] == 3 and r["threads"] == 1 and r["runtime"] == "pytorch"
    stages = ("edge_preprocess_ms", "edge_vision_ms", "mae_encode_k1_ms", "mae_encode_k4_ms")
    assert set(r["ranges"]) == set(stages)
    for key in stages:
        lo, hi = r["ranges"][key]
        assert 0 < lo <= r[key] <= hi, key
    assert _ranged(r, "edge_vision_ms") == (f"{r['edge_vision_ms']:.2f} [{r['ranges']['edge_vision_ms'][0]:.2f}"
                                           f"–{r['ranges']['edge_vision_ms'][1]:.2f}]")
    assert _ranged({"x": 1.0}, "x") == "1.00"  # an older profile without ranges
