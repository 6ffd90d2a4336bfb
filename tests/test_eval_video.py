"""eval-video (issue 18): intra vs temporal progressive on clips, H.264, standing-question events.

Small runs (one clip of a few frames per kind) of progvlm.eval.video.evaluate_video and of the
CLI, checking the report's fields and the relations between them that a bug would break."""
import json

import numpy as np
import pytest

from progvlm.codec.temporal import KEY_EVERY, REUSE_BIAS
from progvlm.eval import video
from progvlm.toyworld import clips as toyclips

EVENT_FRAMES = 13  # an events clip has its first event by frame 12 (clips.EVENT_GAP)


@pytest.fixture(scope="module")
def split():
    from progvlm.split import load_split
    return load_split()


@pytest.fixture(scope="module")
def report(split):
    return video.evaluate_video(split, clips=1, frames=EVENT_FRAMES, seed=1, ks=[1, 2], h264=False)


def test_static_clip_costs_far_less_than_intra(report):
    for k in ("1", "2"):
        r = report["static"]["per_k"][k]
        assert r["non_key_frames"] == EVENT_FRAMES - 1  # only the first frame is a key frame
        assert r["bytes_per_frame_temporal"] < r["bytes_per_frame_intra"]
        assert r["bytes_ratio"] <= 0.1, r  # noise only: a flag byte against a whole layer
        assert r["reference_mismatches"] == 0  # the cloud's decoded reference is the edge's


def test_reported_ratios_and_headline_agree(report):
    for kind in video.KINDS:
        entry = report[kind]
        assert set(entry["per_k"]) == {"1", "2"}
        for r in entry["per_k"].values():
            assert r["bytes_ratio"] == pytest.approx(r["bytes_per_frame_temporal"]
                                                     / r["bytes_per_frame_intra"], abs=1e-5)
            assert r["accuracy_gap"] == pytest.approx(r["accuracy_temporal"] - r["accuracy_intra"],
                                                      abs=1e-5)
            assert 0 <= r["accuracy_temporal"] <= 1 and 0 <= r["accuracy_intra"] <= 1
            # key frames included, the first frame's whole stream is amortised in
            assert r["bytes_per_frame_temporal_with_keys"] >= r["bytes_per_frame_temporal"]
        head = entry["per_k"]["1"]
        assert entry["k"] == 1
        for f in ("bytes_per_frame_intra", "bytes_per_frame_temporal", "bytes_ratio",
                  "accuracy_intra", "accuracy_temporal"):
            assert entry[f] == head[f]
    # k = 2 sends a second layer: more intra bytes than k = 1
    assert (report["moving"]["per_k"]["2"]["bytes_per_frame_intra"]
            > report["moving"]["per_k"]["1"]["bytes_per_frame_intra"])
    # a moving object changes tokens: deltas cost more than a static scene's
    assert report["moving"]["bytes_per_frame_temporal"] > report["static"]["bytes_per_frame_temporal"]
    assert report["settings"] == {**report["settings"], "clips": 1, "frames": EVENT_FRAMES,
                                  "seed": 1, "k": [1, 2], "key_every": KEY_EVERY, "reuse_bias": REUSE_BIAS}
    assert report["elapsed_s"] > 0


def test_event_counts_add_up_to_the_ground_truth_changes(report):
    ev = report["events"]
    clip = toyclips.make_clip(video.clip_seed(1, "events", 0), EVENT_FRAMES, "events")
    questions = video.standing_questions(clip, 1, "events", 0)
    truth_changes = sum(len(toyclips.changes(clip, q)) for q in questions)
    assert clip.events and truth_changes > 0  # the clip holds at least one event that shows
    assert ev["changes"] == truth_changes and ev["questions"] == len(questions)
    for e in (ev, *ev["per_k"].values(), ev["intra"], ev["uncompressed"]):
        assert e["detected"] + e["missed"] == truth_changes
        assert e["false_rate"] == pytest.approx(e["false"] / ((EVENT_FRAMES - 1) * len(questions)),
                                                abs=1e-6)
        if e["detected"]:
            assert 0 <= e["delay_frames_median"] <= video.EVENT_WINDOW
        a = e["answerable"]
        assert a["detected"] + a["missed"] == a["changes"] <= truth_changes
        assert a["detected"] <= e["detected"]


def test_match_events_pairs_each_change_with_one_event_in_its_window():
    assert video.match_events([3, 8], [3, 5, 9, 12]) == ([0, 1], 0, 2)
    assert video.match_events([3], [6]) == ([], 1, 1)  # 3 frames late: missed, and a false event
    assert video.match_events([3, 4], [4]) == ([1], 1, 0)  # one event answers one change
    assert video.event_pairs([8, 3], [3, 5, 9, 12]) == ([(3, 3), (8, 9)], 0, 2)  # which answered which
    assert video.answer_events([["a", "x"], ["a", "y"], ["b", "y"]]) == [[2], [1]]


def test_run_clip_is_deterministic_and_starts_with_the_intra_stream(split):
    clip = toyclips.make_clip(video.clip_seed(5, "moving", 0), 3, "moving")
    qs = video.standing_questions(clip, 5, "moving", 0)
    assert qs == video.standing_questions(toyclips.make_clip(video.clip_seed(5, "moving", 0), 3,
                                                             "moving"), 5, "moving", 0)
    a, b = (video.run_clip(split, clip, qs, [1]) for _ in range(2))
    assert a == b
    row = a["per_k"][1]
    assert row["kind"][0] == "key" and row["temporal_bytes"][0] == row["intra_bytes"][0]
    assert row["intra"][0] == row["temporal"][0]  # same codes, same answers
    assert all(kind == "delta" for kind in row["kind"][1:])
    assert len(a["truth"]) == 3 and all(len(t) == len(qs) for t in a["truth"])


def test_key_every_forces_key_frames_that_do_not_count_as_coded(split):
    rep = video.evaluate_video(split, clips=1, frames=4, seed=2, ks=[1], key_every=2, h264=False,
                               events=False)
    r = rep["static"]["per_k"]["1"]
    assert r["key_frames"] == {"first": 1, "period": 1} and r["non_key_frames"] == 2


def test_bad_k_is_refused(split):
    with pytest.raises(ValueError, match="k must be in"):
        video.evaluate_video(split, clips=1, frames=2, ks=[split.num_layers + 1], h264=False)


def test_cli_prints_one_json_object(capsys):
    from progvlm.cli.main import main
    assert main(["eval-video", "--clips", "1", "--frames", "3", "--seed", "3", "--k", "1",
                 "--no-h264", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out
    rep = json.loads(out)
    assert {"static", "moving", "events", "settings", "elapsed_s"} <= set(rep)
    assert rep["settings"]["seed"] == 3 and rep["settings"]["k"] == [1]
    assert main(["eval-video", "--clips", "0"]) == 2


def test_h264_comparison_at_matched_and_1mbps(split):
    pytest.importorskip("progvlm.video.h264")
    rep = video.evaluate_video(split, clips=1, frames=3, seed=1, ks=[1], events=False,
                               h264_sweep=())
    for kind in video.KINDS:
        h = rep["h264"][kind]
        matched, full = h["at_matched_bitrate"], h["at_1mbps"]
        assert full["bitrate_bps"] == 1_000_000
        target = rep[kind]["bytes_per_frame_temporal_with_keys"] * 8 * rep["h264"]["fps"]
        assert h["matched_target_bps"] == pytest.approx(target, abs=0.1)
        assert matched["bitrate_bps"] == max(video.H264_MIN_BPS, round(target))
        assert h["matched_floored"] == (target < video.H264_MIN_BPS)
        assert 0 <= matched["accuracy"] <= 1 and 0 <= full["accuracy"] <= 1
        assert full["bytes_per_frame"] > rep[kind]["bytes_per_frame_temporal_with_keys"]
        eq = h["vs_temporal"]["bytes_at_equal_accuracy"]
        if eq is not None:
            assert eq["temporal_fraction"] == pytest.approx(
                rep[kind]["bytes_per_frame_temporal_with_keys"] / eq["h264_bytes_per_frame"], abs=1e-5)
    assert np.isfinite(rep["elapsed_s"])
