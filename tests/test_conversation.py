"""A conversation about one frame (issue 13): the cloud keeps the layers it received under the
frame id the edge chose, in a bounded cache; a follow-up question sends no image bytes; a
cloud that lost the frame (expired, evicted, restarted) says so and the frame is sent again:
the same answer, more bytes."""
import json

import pytest
from local_client import LocalClient
from PIL import Image
from websockets.sync.client import connect

from cloud_server import serving
from edge_agent.agent import AskError, EdgeAgent
from edge_agent.runtime import PyTorchRuntime
from edge_agent.service import create_app as create_edge_app
from progvlm.codec.bitstream import parse
from progvlm.serve.cloud import create_app
from progvlm.toyworld.examples import load_examples
from progvlm.net.frame_cache import ENTRY_OVERHEAD_BYTES, CachedFrame, FrameCache
from progvlm.serve.children import free_port
from test_adaptive_mode import StubConfidence, assert_stages_sum, fixed_threshold

Q1, Q2, Q3 = "describe the scene .", "what color is the square ?", "what shape is purple ?"


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def runtime(split):
    runtime = PyTorchRuntime(split)
    yield runtime
    runtime.set_threads(runtime.default_threads)


@pytest.fixture(scope="module")
def image():
    return load_examples()[1]["path"]


@pytest.fixture(scope="module")
def stream(split, image):
    return parse(split.pack(split.edge(Image.open(image))))


def answer_from(split, image, question, k):
    return split.cloud(split.edge(Image.open(image)).prefix(k), question).text


@pytest.fixture
def cloud(split):
    """A cloud of its own per test (a fresh cache, a clock the test moves, chosen confidences)."""
    clock, table = FakeClock(), {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    cache = FrameCache(ttl_s=60, clock=clock)
    with serving(create_app(fixed_threshold(split), model=StubConfidence(split, table), frame_cache=cache),
                 log_level="warning") as url:
        yield url, cache, clock, table


# ---- the agent ----------------------------------------------------------------------------------
def test_a_follow_up_sends_no_image_bytes_and_answers_from_the_held_layers(runtime, split, image, stream, cloud):
    url, cache, _, _ = cloud
    agent = EdgeAgent(runtime, url)
    first = agent.ask(image, Q1, "progressive", k=2, conversation=True)
    assert first["resumed"] is False and first["bytes_sent_this_turn"] == stream.layer_ends()[1]
    assert len(cache) == 1
    for question in (Q2, Q3):
        r = agent.ask(image, question, "progressive", k=2, conversation=True)
        assert r["resumed"] is True and r["frame_id"] == first["frame_id"]
        assert r["bytes_sent_this_turn"] == 0 and r["payload_bytes"] == 0
        assert r["layers_used"] == 2 and r["answer"] == answer_from(split, image, question, 2)
        # the device's work on the frame is not redone: its stream is remembered
        assert r["edge_stream_reused"] and "edge_vision" not in r["stage_ms"]
        assert_stages_sum(r)


def test_a_follow_up_needing_more_layers_sends_only_those(runtime, split, image, stream, cloud):
    url, _, _, table = cloud
    agent = EdgeAgent(runtime, url)
    first = agent.ask(image, Q1, "adaptive", conversation=True)  # sure at once: layer 1 only
    assert first["layers_used"] == 1 and first["bytes_sent_this_turn"] == stream.layer_ends()[0]
    table.update({1: 0.1, 2: 0.2, 3: 0.99})
    r = agent.ask(image, Q2, "adaptive", conversation=True, budget_ms=60_000)
    ends = stream.layer_ends()
    assert r["resumed"] and r["layers_held_before"] == 1 and r["layers_used"] == 3
    assert r["bytes_sent_this_turn"] == ends[2] - ends[0]  # layers 2 and 3, no header again
    assert [c["confidence"] for c in r["confidences"]][-3:] == [0.1, 0.2, 0.99]
    assert r["answer"] == answer_from(split, image, Q2, 3)


def test_independent_requests_stay_independent(runtime, image, stream, cloud):
    url, cache, _, _ = cloud
    agent = EdgeAgent(runtime, url)
    for question in (Q1, Q2):
        r = agent.ask(image, question, "progressive", k=2)
        assert r["payload_bytes"] > 0 and "frame_id" not in r
    assert len(cache) == 0


def test_after_expiry_the_frame_is_simply_sent_again(runtime, split, image, stream, cloud):
    url, cache, clock, _ = cloud
    agent = EdgeAgent(runtime, url)
    agent.ask(image, Q1, "progressive", k=2, conversation=True)
    clock.t += 61  # past the cloud's TTL (the agent still believes it holds the frame)
    r = agent.ask(image, Q2, "progressive", k=2, conversation=True)
    assert r["resumed"] is False and r["bytes_sent_this_turn"] == stream.layer_ends()[1]
    assert "sent again" in r["note"] and cache.evictions == 1
    assert r["answer"] == answer_from(split, image, Q2, 2)
    again = agent.ask(image, Q3, "progressive", k=2, conversation=True)  # and held once more
    assert again["resumed"] and again["bytes_sent_this_turn"] == 0


def test_after_a_cloud_restart_the_frame_is_simply_sent_again(runtime, split, image, stream):
    port = free_port()
    with serving(create_app(split), port=port, log_level="warning") as url:
        agent = EdgeAgent(runtime, url)
        agent.ask(image, Q1, "progressive", k=2, conversation=True)
    with serving(create_app(split), port=port, log_level="warning"):  # a new process: empty cache
        r = agent.ask(image, Q2, "progressive", k=2, conversation=True)
    assert r["resumed"] is False and r["bytes_sent_this_turn"] == stream.layer_ends()[1]
    assert r["answer"] == answer_from(split, image, Q2, 2)


def test_conversation_is_refused_where_it_means_nothing(runtime, image, cloud):
    agent = EdgeAgent(runtime, cloud[0])
    for mode in ("full-cloud", "full-edge"):
        with pytest.raises(AskError, match="conversation applies to"):
            agent.check(image, Q1, mode, conversation=True)
    with pytest.raises(AskError, match="cut_after_layer"):
        agent.check(image, Q1, "progressive", k=2, conversation=True, cut_after_layer=1)


def test_the_edge_api_carries_conversation(runtime, image, stream, cloud):
    agent = EdgeAgent(runtime, cloud[0])
    client = LocalClient(create_edge_app(agent))
    data = open(image, "rb").read()
    form = {"question": Q1, "mode": "progressive", "k": "2", "conversation": "true"}
    first = client.post("/v1/ask", files={"image": ("i.png", data)}, data=form).json()
    second = client.post("/v1/ask", files={"image": ("i.png", data)}, data=form | {"question": Q2}).json()
    assert first["bytes_sent_this_turn"] == stream.layer_ends()[1]
    assert second["bytes_sent_this_turn"] == 0 and second["resumed"] is True
    r = client.post("/v1/ask", files={"image": ("i.png", data)},
                    data={"question": Q1, "mode": "full-cloud", "conversation": "true"})
    assert r.status_code == 422 and "conversation" in r.json()["detail"]
    r = client.post("/v1/ask", files={"image": ("i.png", data)},
                    data={"question": Q1, "mode": "adaptive", "adaptive_threshold": "2"})
    assert r.status_code == 422 and "0..1" in r.json()["detail"]


# ---- the protocol -------------------------------------------------------------------------------
def ws_url(url):
    return url.replace("http://", "ws://") + "/v1/progressive/stream"


def test_resuming_an_unknown_frame_says_missing_and_takes_the_frame(split, stream, cloud):
    data = split.pack(split.edge(Image.open(load_examples()[1]["path"])))
    with connect(ws_url(cloud[0])) as ws:
        ws.send(json.dumps({"question": Q1, "frame_id": "abc", "resume": True, "refine": False}))
        assert json.loads(ws.recv())["type"] == "missing"
        ws.send(data)
        ws.send(json.dumps({"end": True}))
        assert json.loads(ws.recv())["type"] == "refinement"  # (refine off: answered once)
        final = json.loads(ws.recv())
        assert final["type"] == "final" and final["layers"] == stream.k and final["resumed"] is False
    with connect(ws_url(cloud[0])) as ws:  # now it is held: answered at once, no bytes
        ws.send(json.dumps({"question": Q1, "frame_id": "abc", "resume": True, "refine": False}))
        resumed = json.loads(ws.recv())
        assert resumed == {"type": "resumed", "frame_id": "abc", "layers": stream.k,
                           "received_bytes": len(data)}
        assert json.loads(ws.recv())["type"] == "refinement"
        ws.send(json.dumps({"end": True}))
        assert json.loads(ws.recv())["resumed"] is True


@pytest.mark.parametrize("start, reason", [
    ({"question": Q1, "resume": True}, "resume needs the frame_id"),
    ({"question": Q1, "frame_id": "../etc", "resume": True}, "frame_id must be"),
    ({"question": Q1, "frame_id": "x" * 129}, "frame_id must be"),
    ({"question": Q1, "frame_id": "abc", "resume": "yes"}, "resume must be true or false"),
])
def test_bad_conversation_fields_get_422_with_the_reason(cloud, start, reason):
    with connect(ws_url(cloud[0])) as ws:
        ws.send(json.dumps(start))
        error = json.loads(ws.recv())
    assert error["type"] == "error" and error["status"] == 422 and reason in error["detail"]


def test_a_full_frame_can_be_resumed_too(split, cloud):
    jpeg = open(load_examples()[0]["path"], "rb").read()
    with connect(ws_url(cloud[0])) as ws:
        ws.send(json.dumps({"question": Q1, "kind": "full", "frame_id": "img", "keep_open": True}))
        ws.send(jpeg)
        ws.send(json.dumps({"end": True}))
        first = json.loads(ws.recv())
        ws.send(json.dumps({"question": Q1, "kind": "full", "frame_id": "img", "resume": True}))
        assert json.loads(ws.recv())["type"] == "resumed"
        again = json.loads(ws.recv())
    assert again["type"] == "final" and again["resumed"] and again["answer"] == first["answer"]


# ---- the cache's bounds ---------------------------------------------------------------------------
def entry(n=100):
    return CachedFrame("progressive", bytes(n), layers=1)


def test_per_client_limit_evicts_that_clients_least_recently_used_frame():
    cache = FrameCache(max_frames_per_client=3)
    for i in range(3):
        cache.put("a", f"f{i}", entry())
    cache.put("b", "other", entry())
    cache.get("a", "f0")  # used: f1 is now a's least recently used
    cache.put("a", "f3", entry())
    assert cache.get("a", "f1") is None
    assert all(cache.get("a", f) for f in ("f0", "f2", "f3")) and cache.get("b", "other")
    assert cache.stats()["frames"] == 4


def test_frames_are_the_clients_own():
    cache = FrameCache()
    cache.put("a", "same-hash", entry())
    assert cache.get("b", "same-hash") is None


def test_memory_stays_bounded_whatever_is_put():
    limit = 10 * (1000 + ENTRY_OVERHEAD_BYTES)
    cache = FrameCache(max_frames_per_client=1000, max_total_bytes=limit)
    for i in range(500):
        cache.put(f"client{i % 7}", f"f{i}", entry(1000))
        assert cache.total_bytes <= limit
    assert len(cache) == 10 and cache.evictions == 490
    assert cache.get("client2", "f499" if 499 % 7 == 2 else "f492") is not None  # the newest stay
    assert not cache.put("a", "huge", entry(limit))  # alone over the bound: not kept
    assert cache.total_bytes <= limit


def test_entries_expire_after_their_ttl():
    clock = FakeClock()
    cache = FrameCache(ttl_s=10, clock=clock)
    cache.put("a", "f", entry())
    clock.t += 9
    assert cache.get("a", "f") is not None  # a use renews it
    clock.t += 9
    assert cache.get("a", "f") is not None
    clock.t += 11
    assert cache.get("a", "f") is None and cache.total_bytes == 0


def test_a_new_conversation_sends_the_frame_afresh(runtime, split, image, stream, cloud):
    """new_conversation: the first question of a conversation sends the frame from its start,
    whatever the cloud still holds of it; its follow-ups resume as usual."""
    url, *_ = cloud
    agent = EdgeAgent(runtime, url)
    first = agent.ask(image, Q1, "progressive", conversation=True)
    again = agent.ask(image, Q2, "progressive", conversation=True, new_conversation=True)
    follow = agent.ask(image, Q3, "progressive", conversation=True)
    assert first["bytes_sent_this_turn"] == again["bytes_sent_this_turn"] == stream.layer_ends()[-1]
    assert not again["resumed"] and follow["resumed"] and follow["bytes_sent_this_turn"] == 0
    with pytest.raises(AskError, match="needs conversation=true"):
        agent.ask(image, Q1, "progressive", new_conversation=True)
