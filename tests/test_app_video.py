"""The page's video tab (app_video.py) without a browser: what it shows of a stream's records,
a clip played through a real edge agent and cloud (child processes on loopback) against the
clip's ground truth, the webcam's live stream opened, reopened and closed, and bad input as a
message, never a traceback."""
import sys
from pathlib import Path

import gradio as gr
import pytest

from edge_agent.client import EdgeAgentClient, EdgeAgentError
from progvlm.serve.children import cloud_service, edge_service

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import app_video  # noqa: E402

Q1, Q2 = "how many objects are there ?", "is there a red cube ?"


def _record(i, kind="delta", nbytes=3, events=(), resync=None):
    return {"index": i, "kind": kind, "bytes": nbytes, "resync": resync,
            "events": [{"question": q, "answer": a, "previous": p} for q, a, p in events]}


def test_an_answer_holds_until_an_event_changes_it_and_is_marked_against_the_truth():
    truth = {Q1: ["two", "two", "three", "three"], Q2: ["no", "no", "no", None]}
    view = app_video.Playback([Q1, Q2], "temporal", 5.0, truth)
    view.add(_record(0, "key", 34, [(Q1, "two", None), (Q2, "no", None)]))
    view.add(_record(1))
    view.add(_record(2, resync="the cloud holds no reference"))  # the change seen a frame late
    view.add(_record(3, events=[(Q1, "three", "two")]))
    table, chart = view.table(), view.chart()
    assert list(table[Q1]) == ["two", "two", "two", "three"] and list(table[Q2]) == ["no"] * 4
    assert list(table[f"{Q1} · match"]) == ["✓", "✓", "✗", "✓"]
    assert list(table[f"{Q2} · match"]) == ["✓", "✓", "✓", ""]  # no truth on frame 3: not compared
    assert (view.matched, view.compared) == (6, 7)
    assert "6 of 7" in view.ground_truth()
    assert list(chart["frame"]) == [0, 1, 2, 3] and list(chart["bytes"]) == [34, 3, 3, 3]
    assert list(chart["kind"]) == ["key", "delta", "delta", "delta"]
    lines = view.event_list().splitlines()
    assert len(lines) == 4 and "two → **three**" in lines[-1] and "0.60 s" in lines[-1]
    assert "sent again as a key frame" in lines[2]
    assert app_video.Playback([Q1], "jpeg", 5.0).ground_truth() == ""  # an upload: no truth


def test_the_settings_defaults_and_ranges_are_watch_settings():
    from edge_agent.watch import WATCH_METHODS, WatchSettings
    fields = WatchSettings.model_fields
    assert app_video.FIELDS["method"]["default"] == fields["method"].default
    assert app_video.FIELDS["k"]["default"] == fields["k"].default
    assert app_video.FIELDS["bandwidth_mbps"]["default"] == fields["bandwidth_mbps"].default
    assert app_video.FIELDS["method"]["enum"] == list(WATCH_METHODS)


def test_picking_an_example_clip_fills_the_video_and_its_questions():
    entry = app_video.CLIPS[0]
    path, questions, name, about = app_video.pick_clip(entry["name"])
    assert Path(path).stat().st_size > 1000 and path.endswith(".mp4")
    assert questions.splitlines() == entry["questions"] and name == entry["name"]
    assert "ground truth" in about
    assert app_video.pick_clip(entry["name"])[0] == path  # rendered once
    assert app_video.pick_clip(None)[2] is None


@pytest.fixture(scope="module")
def agent():
    with cloud_service() as cloud, edge_service(cloud.url, cloud_token=cloud.token) as edge:
        client = EdgeAgentClient(edge.url, edge.token)
        app_video.AGENT["client"] = client
        yield client


def test_an_example_clip_plays_through_the_agent_against_its_ground_truth(agent):
    entry = next(e for e in app_video.CLIPS if e["kind"] == "events")
    path, questions, name, _ = app_video.pick_clip(entry["name"])
    updates = list(app_video.play(path, name, questions, "temporal", 1, 1, 20))
    status, chart, table, events = updates[-1]
    assert len(updates) >= 2  # the page is drawn while the clip plays
    assert list(chart["frame"]) == list(range(entry["frames"]))  # one point per frame
    assert len(table) == entry["frames"] and chart["bytes"].iloc[0] > chart["bytes"].iloc[1:].max()
    matches = [m for q in entry["questions"] for m in table[f"{q} · match"] if m]
    assert matches.count("✓") >= 0.9 * len(matches) > 0
    assert events.count("\n- frame") + 1 >= len(entry["questions"])  # the first answers at least
    assert f"**{entry['frames']} frames**" in status and "emulated link: 1 Mbps, RTT 20 ms" in status
    assert "uplink" in status and "(emulated link)" in status and "bytes per frame" in status
    assert "ground truth: **" in status


def test_an_uploaded_gif_plays_without_ground_truth(agent, tmp_path):
    from progvlm.toyworld.clips import make_clip
    frames = list(make_clip(1, 4, "moving").frames(size=128))
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=200)
    *_, (status, chart, table, events) = app_video.play(str(gif), None, Q1, "jpeg", 1, 1, 20)
    assert list(chart["frame"]) == [0, 1, 2, 3] and set(chart["kind"]) == {"jpeg"}
    assert not any("truth" in c for c in table.columns) and "ground truth" not in status
    assert "**4 frames** · jpeg ·" in status and Q1 in events


def test_bad_input_becomes_a_message_not_a_traceback(agent, tmp_path):
    path, questions, name, _ = app_video.pick_clip(app_video.CLIPS[0]["name"])
    with pytest.raises(gr.Error, match="Pick an example clip"):
        list(app_video.play(None, None, Q1, "temporal", 1, 1, 20))
    with pytest.raises(gr.Error, match="at least one standing question"):
        list(app_video.play(path, name, " \n ", "temporal", 1, 1, 20))
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video")
    with pytest.raises(gr.Error, match="could not play this video: .*not a video"):
        list(app_video.play(str(junk), None, Q1, "temporal", 1, 1, 20))
    with pytest.raises(gr.Error, match="422: .*k"):  # the agent's own reason for a bad field
        list(app_video.play(path, name, questions, "temporal", 99, 1, 20))
    with pytest.raises(gr.Error, match="422: .*bandwidth"):
        list(app_video.play(path, name, questions, "temporal", 1, 0, 20))
    with pytest.raises(gr.Error, match="must be numbers"):  # a bandwidth typed in, an RTT cleared
        list(app_video.play(path, name, questions, "temporal", 1, "fast", None))
    live, status, _ = app_video.live_frame(app_video.example_clip(name).frame(0), None, "", "temporal", 1, 1, 20)
    assert live["session"] is None and status.startswith("⚠ Type at least one standing question")
    app_video.AGENT["client"] = EdgeAgentClient("http://127.0.0.1:9", timeout_s=2)  # nothing there
    try:
        with pytest.raises(gr.Error, match="unreachable"):
            list(app_video.play(path, name, questions, "temporal", 1, 1, 20))
        live, status, _ = app_video.live_frame(app_video.example_clip(name).frame(0), None, Q1,
                                               "temporal", 1, 1, 20)
        assert live["session"] is None and "unreachable" in status
    finally:
        app_video.AGENT["client"] = agent


def test_the_webcam_opens_a_live_stream_reopens_it_and_closes_it(agent):
    clip = app_video.example_clip(app_video.CLIPS[1]["name"])
    settings = (Q1, "temporal", 1, 1, 20)
    live, status, events = app_video.live_frame(clip.frame(0), None, *settings)
    first = live["session"]
    assert first and live["frames"] == 1 and "frame 0 · key" in status and Q1 in events
    live, status, events = app_video.live_frame(clip.frame(1), live, *settings)
    assert live["session"] == first and "frame 1 · delta" in status
    assert agent.watch_close(first) and not agent.watch_close(first)  # the agent closed it (idle)
    live, status, events = app_video.live_frame(clip.frame(2), live, *settings)
    assert live["session"] not in (None, first) and "frame 0 · key" in status  # a new stream
    second = live["session"]
    live, status = app_video.close_live(live)
    assert live["session"] is None and status == "stream closed after 1 frames"
    with pytest.raises(EdgeAgentError) as e:
        agent.watch_frame(second, app_video._frame_bytes(clip.frame(3)))
    assert e.value.status == 404


def test_the_tab_names_its_api_endpoints_and_takes_k_up_to_the_agents_L(agent):
    info = agent.info()
    with gr.Blocks() as page:
        app_video.video_tab(agent, info, [0.5, 1, 10])
    names = {fn.api_name for fn in page.fns.values()}
    assert {"pick_clip", "watch", "watch_webcam_frame", "watch_webcam_stop"} <= names
    sliders = [b for b in page.blocks.values() if isinstance(b, gr.Slider)]
    assert [(s.minimum, s.maximum) for s in sliders] == [(1, info["num_layers"])]
