"""The agent's video routes (edge_agent/watch_service.py): a clip file played as NDJSON records,
live sessions for a webcam, and their bad input: a corrupt or oversized clip, fields out of
range, an unknown or idle session, too many sessions."""
import io
import json

import pytest
from PIL import Image

from cloud_server import serving
from edge_agent import watch_service
from edge_agent.agent import EdgeAgent
from edge_agent.runtime import PyTorchRuntime
from edge_agent.service import create_app as create_edge_app
from local_client import LocalClient
from progvlm.serve.cloud import create_app
from progvlm.split import load_split
from progvlm.toyworld.clips import changes, make_clip

COUNT = "how many objects are there ?"


@pytest.fixture(scope="module")
def agent_client():
    split = load_split()
    with serving(create_app(split), log_level="warning") as url:
        agent = EdgeAgent(PyTorchRuntime(split), url)
        with LocalClient(create_edge_app(agent)) as client:
            yield client


@pytest.fixture(scope="module")
def clip():
    return make_clip(0, 16, "events")


def gif(images, duration_ms=200) -> bytes:
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_a_clip_plays_frame_by_frame_and_its_events_follow_the_truth(agent_client, clip):
    frames = [clip.frame(t) for t in range(len(clip.scenes))]
    response = agent_client.post("/v1/watch", files={"video": ("clip.gif", gif(frames), "image/gif")},
                                 data={"questions": [COUNT], "rtt_ms": "0", "bandwidth_mbps": "100"})
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[0]["type"] == "video" and lines[0]["frames"] == len(frames)
    records = [line["record"] for line in lines if line["type"] == "frame"]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["frames"] == len(frames) == len(records)
    assert records[0]["kind"] == "key" and {r["kind"] for r in records[1:]} == {"delta"}
    assert summary["bytes_per_frame_by_kind"]["delta"] < summary["bytes_per_frame_by_kind"]["key"] / 4
    event_frames = [e["index"] for e in summary["events"] if e["index"] > 0]
    # GIF's palette is lossy, yet every true change of the count is an event (within a frame)
    for c in changes(clip, COUNT):
        assert any(c <= t <= c + 1 for t in event_frames), (c, event_frames)


@pytest.mark.parametrize("fields, words", [
    ({"questions": [COUNT], "k": "9"}, "k"),
    ({"questions": [COUNT], "method": "mpeg2"}, "method"),
    ({"questions": [COUNT], "bandwidth_mbps": "nan"}, "bandwidth"),
    ({"questions": [COUNT] * 9}, "1..8 standing questions"),
    ({}, "questions"),
])
def test_bad_fields_are_422_naming_the_field(agent_client, clip, fields, words):
    response = agent_client.post("/v1/watch", data=fields,
                                 files={"video": ("c.gif", gif([clip.frame(0)] * 2), "image/gif")})
    assert response.status_code == 422 and words in response.json()["detail"], response.text


def test_a_corrupt_or_oversized_clip_is_refused_before_anything_plays(agent_client, clip, monkeypatch):
    good = gif([clip.frame(t) for t in range(3)])
    response = agent_client.post("/v1/watch", data={"questions": [COUNT]},
                                 files={"video": ("c.gif", b"GIF89a" + b"\x00" * 50, "image/gif")})
    assert response.status_code == 400 and "bad video" in response.json()["detail"]
    response = agent_client.post("/v1/watch", data={"questions": [COUNT]},
                                 files={"video": ("c.txt", b"not a video at all", "text/plain")})
    assert response.status_code == 400
    from progvlm.video import reader
    monkeypatch.setattr(reader, "MAX_FRAMES", 2)
    monkeypatch.setattr(reader.read_video, "__defaults__", (2,) + reader.read_video.__defaults__[1:])
    response = agent_client.post("/v1/watch", data={"questions": [COUNT]},
                                 files={"video": ("c.gif", good, "image/gif")})
    assert response.status_code == 413 and "too long" in response.json()["detail"]


def test_a_live_session_takes_frames_and_closes(agent_client, clip):
    opened = agent_client.post("/v1/watch/sessions", data={"questions": [COUNT], "rtt_ms": "0"})
    assert opened.status_code == 200, opened.text
    sid = opened.json()["session"]
    first = agent_client.post(f"/v1/watch/sessions/{sid}/frame",
                              files={"image": ("f.png", png(clip.frame(0)), "image/png")}).json()
    second = agent_client.post(f"/v1/watch/sessions/{sid}/frame",
                               files={"image": ("f.png", png(clip.frame(1)), "image/png")}).json()
    assert first["kind"] == "key" and first["events"][0]["question"] == COUNT
    assert second["kind"] == "delta" and second["index"] == 1
    bad = agent_client.post(f"/v1/watch/sessions/{sid}/frame", files={"image": ("f.png", b"nope", "image/png")})
    assert bad.status_code == 400
    assert agent_client.delete(f"/v1/watch/sessions/{sid}").status_code == 200
    gone = agent_client.post(f"/v1/watch/sessions/{sid}/frame",
                             files={"image": ("f.png", png(clip.frame(2)), "image/png")})
    assert gone.status_code == 404 and agent_client.delete(f"/v1/watch/sessions/{sid}").status_code == 404


def test_sessions_are_bounded_and_an_idle_one_closes_itself(agent_client, monkeypatch):
    sids = [agent_client.post("/v1/watch/sessions", data={"questions": [COUNT]}).json()["session"]
            for _ in range(watch_service.MAX_SESSIONS)]
    over = agent_client.post("/v1/watch/sessions", data={"questions": [COUNT]})
    assert over.status_code == 429
    monkeypatch.setattr(watch_service, "SESSION_IDLE_S", 0.0)  # every session is now stale
    again = agent_client.post("/v1/watch/sessions", data={"questions": [COUNT]})
    assert again.status_code == 200  # the idle ones were closed to make room
    for sid in sids:
        assert agent_client.delete(f"/v1/watch/sessions/{sid}").status_code == 404
    agent_client.delete(f"/v1/watch/sessions/{again.json()['session']}")
