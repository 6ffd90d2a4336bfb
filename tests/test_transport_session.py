"""The edge's session with the cloud (issue 11): one kept-open WebSocket carries every request,
progressive and full, so only the first pays for a handshake; a dropped socket is replaced
once, transparently; a cut link never poisons the pool; every ms of a request's wall time
belongs to a named stage."""
import threading
import time

import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosedError
from websockets.protocol import State

from cloud_server import serving
from progvlm.serve.cloud import create_app
from progvlm.toyworld.examples import load_examples
from progvlm.net.link import LinkProfile
from progvlm.serve.children import free_port
from progvlm.split import load_split
from progvlm.net.transport import HANDSHAKE_RTTS, CloudError, CloudLink

Q = "describe the scene ."
LINK = LinkProfile(10.0, 20.0)


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def streams(split):
    """4-layer streams of two bundled examples."""
    return [split.pack(split.edge(Image.open(e["path"]))) for e in load_examples()[:2]]


@pytest.fixture(scope="module")
def jpeg():
    return open(load_examples()[0]["path"], "rb").read()


def expected(split, data, k):
    return split.cloud(split.unpack(data).prefix(k), Q).text


def timed(call):
    t0 = time.perf_counter()
    ex = call()
    return ex, (time.perf_counter() - t0) * 1e3


def assert_stages_make_the_wall(ex, outside_ms):
    cloud = sum(ex.reply["stage_ms"].values())
    unaccounted = ex.wall_ms - ex.connect_ms - ex.uplink_ms - ex.downlink_ms - cloud
    assert unaccounted >= -1, ex  # no two stages overlap (overhead is not clamped)
    stages = ex.link_stages_ms(cloud)
    assert abs(sum(stages.values()) + cloud - ex.wall_ms) <= 1, (stages, cloud, ex.wall_ms)
    assert ex.wall_ms <= outside_ms + 0.01 and outside_ms - ex.wall_ms < 20, (ex.wall_ms, outside_ms)


def test_requests_after_the_first_pay_no_handshake(split, streams, jpeg):
    app = create_app(split)
    with serving(app) as url:
        link = CloudLink(url)
        try:
            first, outside = timed(lambda: link.progressive(streams[0], Q, LINK, refine=False))
            assert first.connect_ms >= HANDSHAKE_RTTS["ws"] * LINK.rtt_ms  # the emulated round trips
            assert_stages_make_the_wall(first, outside)
            later = []
            for data in streams:
                ex, outside = timed(lambda: link.progressive(data, Q, LINK, refine=False))
                assert ex.reply["answer"] == expected(split, data, 4)
                later.append((ex, outside))
            ex, outside = timed(lambda: link.full(jpeg, Q, LINK))
            later.append((ex, outside))
            http = link._http.post("/v1/full", params={"question": Q}, content=jpeg).json()
            assert ex.reply["answer"] == http["answer"]
            seen = []
            ex, outside = timed(lambda: link.progressive(streams[1], Q, LINK, on_refinement=seen.append))
            assert [m["layers"] for m in seen] == [1, 2, 3, 4]
            later.append((ex, outside))
        finally:
            link.close()
        for ex, outside in later:
            assert ex.connect_ms == 0
            assert_stages_make_the_wall(ex, outside)
        assert app.state.stream_connections == 1 and link.sockets_opened == 1


def test_a_socket_the_cloud_dropped_while_idle_is_replaced(split, streams):
    app = create_app(split, session_idle_s=0.3)
    with serving(app) as url:
        link = CloudLink(url)
        link.progressive(streams[0], Q, LINK, refine=False)
        time.sleep(1.0)  # the cloud closes the idle socket
        ex = link.progressive(streams[0], Q, LINK, refine=False)
        link.close()
    assert ex.reply["answer"] == expected(split, streams[0], 4)
    assert ex.connect_ms >= HANDSHAKE_RTTS["ws"] * LINK.rtt_ms
    assert app.state.stream_connections == 2


class DroppedSocket:
    """A pooled socket that looks open but whose cloud is gone (a close still in flight)."""
    protocol = type("P", (), {"state": State.OPEN})()
    closed = False

    def send(self, message):
        raise ConnectionClosedError(None, None)

    def recv(self, *a, **kw):
        raise ConnectionClosedError(None, None)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("kind", ["progressive", "full"])
def test_a_reused_socket_found_closed_is_replaced_once_transparently(split, streams, jpeg, kind):
    with serving(create_app(split)) as url:
        link = CloudLink(url)
        dropped = DroppedSocket()
        link._idle.append(dropped)
        if kind == "full":
            ex = link.full(jpeg, Q, LINK)
        else:
            ex = link.progressive(streams[0], Q, LINK, refine=False)
            assert ex.reply["answer"] == expected(split, streams[0], 4)
        link.close()
    assert dropped.closed and link.sockets_opened == 1 and ex.connect_ms > 0


def test_a_restarted_cloud_is_reconnected_to(split, streams):
    port = free_port()
    link = CloudLink(f"http://127.0.0.1:{port}")
    with serving(create_app(split), port=port):
        link.progressive(streams[0], Q, LINK, refine=False)
    with serving(create_app(split), port=port):
        ex = link.progressive(streams[1], Q, LINK, refine=False)
    link.close()
    assert ex.reply["answer"] == expected(split, streams[1], 4) and ex.connect_ms > 0


def test_a_cut_request_closes_its_socket_and_leaves_the_pool_clean(split, streams):
    app = create_app(split)
    with serving(app) as url:
        link = CloudLink(url)
        link.progressive(streams[0], Q, LINK, refine=False)
        for refine in (True, False):
            cut, outside = timed(lambda: link.progressive(streams[0], Q, LINK, cut_after_layer=2,
                                                          refine=refine))
            assert (cut.reply["layers"], cut.reply["partial"], cut.cut_after_layer) == (2, True, 2)
            assert cut.reply["answer"] == expected(split, streams[0], 2)
            assert_stages_make_the_wall(cut, outside)
            after = link.progressive(streams[1], Q, LINK, refine=False)  # not a stale layer-2 answer
            assert after.reply["answer"] == expected(split, streams[1], 4) and after.reply["layers"] == 4
            assert after.connect_ms > 0  # the cut socket was closed: a new one
        with pytest.raises(CloudError, match="before layer 1"):
            link.progressive(streams[0], Q, LINK, cut_after_layer=0)
        assert link.progressive(streams[1], Q, LINK, refine=False).reply["layers"] == 4
        link.close()
    # the first socket, then a new one after each of the three cuts
    assert app.state.stream_connections == link.sockets_opened == 4


def test_a_refused_request_does_not_poison_the_pool(split, streams):
    with serving(create_app(split)) as url:
        link = CloudLink(url)
        link.progressive(streams[0], Q, LINK, refine=False)
        with pytest.raises(CloudError, match="400.*wrong MAE fingerprint"):
            link.progressive(_foreign(streams[0]), Q, LINK)
        with pytest.raises(CloudError, match="400.*bad image"):
            link.full(b"not an image", Q, LINK)
        assert link.progressive(streams[1], Q, LINK).reply["answer"] == expected(split, streams[1], 4)
        link.close()


def test_concurrent_callers_get_a_socket_each(split, streams):
    app = create_app(split)
    with serving(app) as url:
        link = CloudLink(url)
        answers, errors = [], []

        def caller(i):
            try:
                for _ in range(2):
                    answers.append((i, link.progressive(streams[i % 2], Q, LINK, refine=False).reply["answer"]))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        idle = list(link._idle)
        link.close()
    assert not errors and len(answers) == 6
    assert all(a == expected(split, streams[i % 2], 4) for i, a in answers)
    assert 1 <= link.sockets_opened <= 3 and app.state.stream_connections == link.sockets_opened
    assert idle and all(ws.protocol.state is State.CLOSED for ws in idle)  # close() closed them


def test_without_keep_open_every_request_connects(split, streams):
    app = create_app(split)
    with serving(app) as url:
        link = CloudLink(url, keep_open=False)
        exchanges = [link.progressive(streams[0], Q, LINK, refine=False) for _ in range(2)]
        link.close()
    assert all(ex.connect_ms >= HANDSHAKE_RTTS["ws"] * LINK.rtt_ms for ex in exchanges)
    assert app.state.stream_connections == 2


def _foreign(data: bytes) -> bytes:
    """The same layers, written as by another MAE (valid on the edge, refused by the cloud)."""
    from progvlm.codec.bitstream import pack, parse
    bs = parse(data)
    return pack(bytes(4), bs.num_tokens, bs.num_layers, bs.layers)
