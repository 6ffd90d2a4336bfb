"""A camera that watches, end to end: the edge's Watcher and the cloud's /v1/watch stream
(standing questions, events, key/delta frames), and every fault the issue lists: a delta the
cloud cannot decode, a corrupt frame, a bad start, an oversized frame, a stream idle past its
timeout, too many streams per client, and a cloud restart mid-stream."""
import json

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cloud_server import serving
from edge_agent.runtime import PyTorchRuntime
from edge_agent.watch import WatchSettings, Watcher
from progvlm.codec import temporal
from progvlm.net.exchange import CloudError
from progvlm.net.link import LinkProfile
from progvlm.serve.children import free_port
from progvlm.serve.cloud import create_app
from progvlm.split import load_split
from progvlm.toyworld.scenes import generate_scene, render_scene

COUNT = "how many objects are there ?"
DESCRIBE = "describe the scene ."
FAST = LinkProfile.checked(1000.0, 0.0)


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def runtime(split):
    return PyTorchRuntime(split)


@pytest.fixture(scope="module")
def cloud(split):
    with serving(create_app(split), log_level="warning") as url:
        yield url


def frame(scene, t, sigma=5.0):
    """The scene's frame t: its pixels with fresh sensor noise."""
    pixels = np.asarray(render_scene(scene), np.float32)
    pixels += sigma * np.random.default_rng(1000 + t).standard_normal(pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def ws_url(cloud):
    return cloud.replace("http", "ws", 1) + "/v1/watch"


def test_a_static_scene_sends_one_key_then_one_byte_frames_and_answers_only_on_a_change(runtime, cloud):
    scene = generate_scene(5)
    assert len(scene.objects) >= 2
    watcher = Watcher(runtime, cloud, WatchSettings(questions=[COUNT, DESCRIBE]), link=FAST)
    try:
        records = [watcher.frame(frame(scene, t)) for t in range(4)]
        scene.objects = scene.objects[:1]  # objects leave
        records += [watcher.frame(frame(scene, t)) for t in range(4, 6)]
    finally:
        watcher.close()
    assert [r["kind"] for r in records[:4]] == ["key", "delta", "delta", "delta"]
    assert all(r["bytes"] == 1 for r in records[1:4])  # noise only: every token unchanged
    assert records[0]["bytes"] > 20
    first = {e["question"]: e for e in records[0]["events"]}
    assert set(first) == {COUNT, DESCRIBE} and first[COUNT]["previous"] is None
    assert all(r["events"] == [] for r in records[1:4])  # nothing changed: nothing sent back
    # the cloud saw the same tokens again: the language half did not run
    assert all("language_ms" not in r["stage_ms"] and "answers_reused_ms" in r["stage_ms"]
               for r in records[1:4])
    assert "language_ms" in records[0]["stage_ms"] and "language_ms" in records[4]["stage_ms"]
    change = {e["question"]: e for e in records[4]["events"]}
    assert change[COUNT]["answer"] == "one" and change[COUNT]["previous"] == first[COUNT]["answer"]
    assert records[4]["kind"] == "delta" and records[4]["bytes"] < records[0]["bytes"]
    assert [r["cloud_index"] for r in records] == list(range(6))
    for r in records:  # every millisecond in a named stage
        assert abs(sum(r["stage_ms"].values()) - r["total_ms"]) < 0.01
        assert r["stage_ms"]["agent"] >= 0


def test_adaptive_refines_an_unsure_frame_with_more_layers_of_the_same_frame(runtime, cloud):
    scene = generate_scene(11)
    watcher = Watcher(runtime, cloud, WatchSettings(questions=[COUNT, DESCRIBE], method="adaptive"),
                      link=FAST)
    watcher.stream.adaptive_threshold = 1.01  # never sure: every layer of the first frame goes
    try:
        first = watcher.frame(frame(scene, 0))
        assert first["sends"] == watcher.runtime.num_layers and first["layers"] == first["sends"]
        assert first["kind"] == "key" and first["cloud_index"] == first["sends"] - 1
        # the first answers, once each, however many refinements there were
        assert sorted(e["question"] for e in first["events"]) == sorted([COUNT, DESCRIBE])
        watcher.stream.adaptive_threshold = 0.0  # always sure: one send, one layer fewer next
        second = watcher.frame(frame(scene, 1))
        assert second["sends"] == 1 and second["layers"] == watcher.runtime.num_layers
        assert second["kind"] == "delta" and second["events"] == []
        assert watcher.frame(frame(scene, 2))["layers"] == watcher.runtime.num_layers - 1
    finally:
        watcher.close()


def test_an_adaptive_watcher_has_its_layer_1_probed_and_a_temporal_one_does_not(runtime, cloud):
    probed = {}
    for method in ("temporal", "adaptive"):
        watcher = Watcher(runtime, cloud, WatchSettings(questions=[COUNT, DESCRIBE], method=method, k=1),
                          link=FAST)
        try:
            records = [watcher.frame(frame(generate_scene(seed), 0)) for seed in range(20, 26)]
        finally:
            watcher.close()
        probed[method] = sum("probe_ms" in r["stage_ms"] for r in records)
    assert probed["temporal"] == 0 and probed["adaptive"] >= 2


@pytest.mark.parametrize("method", ["intra", "jpeg"])
def test_the_other_methods_answer_the_same(runtime, cloud, method):
    scene = generate_scene(5)
    watcher = Watcher(runtime, cloud, WatchSettings(questions=[COUNT], method=method), link=FAST)
    try:
        records = [watcher.frame(frame(scene, t)) for t in range(2)]
    finally:
        watcher.close()
    assert records[0]["kind"] == ("key" if method == "intra" else "jpeg")
    assert records[1]["kind"] == records[0]["kind"]  # every frame from scratch
    assert records[0]["events"][0]["answer"] == str(["zero", "one", "two", "three", "four"][len(scene.objects)])


def _open(cloud, start: dict):
    ws = connect(ws_url(cloud), compression=None).__enter__()
    try:
        ws.send(json.dumps(start))
    except ConnectionClosed:
        pass  # refused at once: the reason is the message already in
    return ws, json.loads(ws.recv(timeout=10))


def test_a_delta_without_a_reference_is_a_resync_and_the_stream_goes_on(cloud, split):
    tables = split.mae.edge_codec()
    ws, hello = _open(cloud, {"questions": [COUNT]})
    assert hello["type"] == "watching" and hello["questions"] == 1 and 0 < hello["adaptive_threshold"] <= 1
    ws.send(bytes([temporal.DELTA | temporal.SAME | 1]))
    reply = json.loads(ws.recv(timeout=10))
    assert reply["type"] == "resync" and "key frame" in reply["detail"] and reply["index"] == 0
    tokens, _ = split.vlm.vision(split.vlm.preprocess(frame(generate_scene(1), 0)))
    key = temporal.TemporalCoder(tables).key(split.mae._latent(tokens), 1)
    ws.send(key.data)
    ack = json.loads(ws.recv(timeout=10))
    assert ack["type"] == "frame" and ack["kind"] == "key" and ack["index"] == 0
    ws.close()


def test_a_stream_that_refines_has_its_layer_1_answers_probed_and_others_do_not(cloud, split):
    """WatchStart.refines (adaptive's edge may send layer 2): the cloud probes the answers from
    layer 1 that are sure without it (probe_ms, a confidence that can only fall, to 0 where a
    refinement changes the answer), the same for the same codes; a stream that does not refine
    (temporal, intra at k = 1) is never probed: nothing waits on its confidence."""
    tables = split.mae.edge_codec()
    rule = split.adaptive_rule()[0]
    assert rule.probe is not None  # the bundled calibration ships one
    questions = [COUNT, DESCRIBE, "is there a red square ?"]
    probed = gated = 0
    for seed in range(20, 28):
        tokens, _ = split.vlm.vision(split.vlm.preprocess(frame(generate_scene(seed), 0)))
        key = temporal.TemporalCoder(tables).key(split.mae._latent(tokens), 1).data
        acks = {}
        for refines in (False, True, True):
            ws, _ = _open(cloud, {"questions": questions, "refines": refines})
            ws.send(key)
            acks.setdefault(refines, []).append(json.loads(ws.recv(timeout=10)))
            ws.close()
        plain, (once, again) = acks[False][0], acks[True]
        assert plain["type"] == once["type"] == "frame" and once["layers"] == 1
        assert "probe_ms" not in plain["stage_ms"]
        assert once["confidence_min"] == again["confidence_min"]  # drawn from the codes
        assert once["confidence_min"] <= plain["confidence_min"]
        if plain["confidence_min"] >= rule.threshold:  # sure without it: probed
            assert "probe_ms" in once["stage_ms"]
            probed += 1
            gated += once["confidence_min"] == 0.0
    assert probed >= 4 and gated >= 1


def test_the_cloud_parses_a_key_frames_header_once(cloud, split, monkeypatch):
    from progvlm.codec import bitstream
    from progvlm.serve import watch
    parse_header, calls = bitstream.parse_header, []

    def counted(data, *args, **kwargs):
        calls.append(len(data))
        return parse_header(data, *args, **kwargs)

    monkeypatch.setattr(bitstream, "parse_header", counted)  # as temporal.apply reaches it
    monkeypatch.setattr(watch, "parse_header", counted)  # as the watch handler imported it
    ws, _ = _open(cloud, {"questions": [COUNT]})
    tokens, _ = split.vlm.vision(split.vlm.preprocess(frame(generate_scene(1), 0)))
    ws.send(temporal.TemporalCoder(split.mae.edge_codec()).key(split.mae._latent(tokens), 1).data)
    ack = json.loads(ws.recv(timeout=10))
    ws.close()
    assert ack["type"] == "frame" and ack["kind"] == "key"
    assert len(calls) == 1  # checked against the models, then decoded, from one parse


@pytest.mark.parametrize("data, status, words", [
    (b"PV\x07garbage-garbage", 400, "bad key frame"),
    (bytes([temporal.DELTA | 1, 5, 1, 2, 3]), 400, "bad frame"),
    (b"", 400, "empty frame"),
])
def test_bad_frames_close_the_stream_with_the_reason(cloud, split, data, status, words):
    ws, _ = _open(cloud, {"questions": [COUNT]})
    if data[:1] and data[0] & temporal.DELTA:  # a delta needs a reference first
        tokens, _ = split.vlm.vision(split.vlm.preprocess(frame(generate_scene(1), 0)))
        ws.send(temporal.TemporalCoder(split.mae.edge_codec()).key(split.mae._latent(tokens), 1).data)
        assert json.loads(ws.recv(timeout=10))["type"] == "frame"
    ws.send(data)
    reply = json.loads(ws.recv(timeout=10))
    assert reply["type"] == "error" and reply["status"] == status and words in reply["detail"]
    with pytest.raises(Exception):
        ws.recv(timeout=5)
    assert ws.close_code == 4000 + status


@pytest.mark.parametrize("start, words", [
    ({"questions": []}, "1..8 standing questions"),
    ({"questions": ["q ?"] * 9}, "1..8 standing questions"),
    ({"questions": ["x" * 600]}, "question too long"),
    ({"questions": [COUNT], "codec": "mpeg2"}, "codec"),
    ({"question": COUNT}, "questions"),
])
def test_a_bad_start_is_refused_with_422(cloud, start, words):
    ws, reply = _open(cloud, start)
    assert reply["type"] == "error" and reply["status"] == 422 and words in reply["detail"]
    ws.close()


def test_an_idle_stream_is_closed_and_streams_per_client_are_bounded(split):
    with serving(create_app(split, watch_idle_s=0.5), log_level="warning") as url:
        ws, _ = _open(url, {"questions": [COUNT]})
        reply = json.loads(ws.recv(timeout=5))  # no frame for 0.5 s
        assert reply["status"] == 408 and "no frame" in reply["detail"]
    with serving(create_app(split), log_level="warning") as url:
        held = [_open(url, {"questions": [COUNT]}) for _ in range(4)]
        assert all(hello["type"] == "watching" for _, hello in held)
        ws, reply = _open(url, {"questions": [COUNT]})
        assert reply["status"] == 429 and "at most 4" in reply["detail"]
        for w, _ in held:
            w.close()


def test_a_cloud_restart_mid_stream_resyncs_with_a_key_frame(split, runtime):
    port = free_port()
    scene = generate_scene(5)
    with serving(create_app(split), port=port, log_level="warning") as url:
        watcher = Watcher(runtime, url, WatchSettings(questions=[COUNT]), link=FAST)
        first = [watcher.frame(frame(scene, t)) for t in range(2)]
    assert [r["kind"] for r in first] == ["key", "delta"]
    with serving(create_app(split), port=port, log_level="warning"):  # a new cloud: holds nothing
        after = watcher.frame(frame(scene, 2))
        assert after["kind"] == "key" and after["resync"] and "reopened" in after["resync"]
        # the new cloud answers from scratch, but the answer is the one the edge had: no event
        assert after["cloud_index"] == 0 and after["events"] == []
        assert watcher.frame(frame(scene, 3))["kind"] == "delta"
        watcher.close()
    with pytest.raises(CloudError):  # and a cloud that is down is an error, not a hang
        watcher.frame(frame(scene, 4))
