"""A new transport is one class (issue 17.3): a Transport subclass that opens channels to the
cloud's stream route gets the full, progressive and steered requests, their schedules and
their time accounting from progvlm.net.transport. Here: an in-process loopback that calls the
cloud app directly (Starlette's test client), no socket, no network."""
import anyio
import pytest
from local_client import LocalClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from progvlm.codec.bitstream import parse
from progvlm.net.exchange import ChannelClosed
from progvlm.net.link import LinkProfile
from progvlm.net.protocol import INFO_PATH, STREAM_PATH
from progvlm.net.transport import CloudError, Transport
from progvlm.serve.cloud import create_app
from progvlm.toyworld.examples import load_examples

Q = "describe the scene ."
LINK = LinkProfile(10.0, 4.0)


class LoopbackChannel:
    """The test client's WebSocket session as a Channel."""

    def __init__(self, session):
        self.session = session.__enter__()
        self.closed = False

    def send(self, message):
        if self.closed:
            raise ChannelClosed
        (self.session.send_text if isinstance(message, str) else self.session.send_bytes)(message)

    def recv(self) -> str:
        try:
            return self.session.receive_text()
        except (WebSocketDisconnect, anyio.ClosedResourceError, anyio.EndOfStream):
            raise ChannelClosed from None

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.session.__exit__(None, None, None)
            except WebSocketDisconnect:
                pass


class Loopback(Transport):
    """The whole transport: how to reach the cloud (info, a channel per request)."""

    def __init__(self, app):
        self.client, self.base_url, self.opened = LocalClient(app), "loopback:", 0

    def info(self) -> dict:
        return self.client.get(INFO_PATH).json()

    def open(self, link):
        self.opened += 1
        return LoopbackChannel(self.client.websocket_connect(STREAM_PATH))

    def close(self):
        self.client.close()


@pytest.fixture(scope="module")
def app(split):
    return create_app(split)


@pytest.fixture(scope="module")
def frame(split):
    return split.edge(Image.open(load_examples()[1]["path"]))


def expected(split, frame, k):
    return split.cloud(frame.prefix(k), Q).text


def assert_stages_make_the_wall(ex):
    cloud = sum(ex.reply["stage_ms"].values())
    assert ex.uplink_ms >= LINK.rtt_ms / 2 and ex.downlink_ms >= LINK.rtt_ms / 2, ex
    assert abs(sum(ex.link_stages_ms(cloud).values()) + cloud - ex.wall_ms) <= 1, ex


def test_a_transport_defined_here_carries_every_kind_of_request(app, split, frame):
    link = Loopback(app)
    assert link.info()["num_layers"] == split.num_layers
    data = split.pack(frame)
    seen = []
    ex = link.progressive(data, Q, LINK, on_refinement=seen.append)
    assert [m["layers"] for m in seen] == list(range(1, frame.k + 1))
    assert [m["answer"] for m in seen] == [expected(split, frame, k) for k in range(1, frame.k + 1)]
    assert ex.reply["answer"] == expected(split, frame, frame.k) and not ex.reply["partial"]
    assert_stages_make_the_wall(ex)

    cut = link.progressive(data, Q, LINK, cut_after_layer=2)
    assert (cut.reply["layers"], cut.reply["partial"], cut.cut_after_layer) == (2, True, 2)
    assert cut.reply["answer"] == expected(split, frame, 2)

    # adaptive: one more layer after each answer, until the third
    asked = []
    ex = link.steered(data, Q, LINK, 1, more=lambda answer, ms: asked.append(answer["layers"]) or answer["layers"] < 3)
    assert asked == [1, 2, 3] and ex.reply["layers"] == 3 and ex.reply["answer"] == expected(split, frame, 3)
    assert ex.bytes_sent == parse(data).layer_ends()[2]  # the header and layers 1..3
    assert_stages_make_the_wall(ex)

    jpeg = open(load_examples()[1]["path"], "rb").read()
    full = link.full(jpeg, Q, LINK)
    assert full.reply["answer"] == split.vlm.answer(Image.open(load_examples()[1]["path"]), Q).text
    assert full.reply["received_bytes"] == len(jpeg)
    assert_stages_make_the_wall(full)

    with pytest.raises(CloudError, match="400.*bad image"):
        link.full(b"not an image", Q, LINK)
    assert link.opened == 5  # the base class keeps nothing open unless the transport does
    link.close()


def test_a_conversation_resumes_through_it(app, split, frame):
    link = Loopback(app)
    data = split.pack(frame)
    first = link.steered(data, Q, LINK, 2, frame_id="loopback-frame")
    assert first.resumed is None and first.reply["layers"] == 2
    follow = link.steered(data, "what shape is purple ?", LINK, 2, frame_id="loopback-frame", resume=True)
    assert follow.resumed is True and follow.layers_held == 2 and follow.bytes_sent == 0
    assert follow.reply["answer"] == split.cloud(frame.prefix(2), "what shape is purple ?").text
    link.close()


def test_the_edge_agent_runs_on_any_transport(app, split):
    """EdgeAgent depends on the Transport interface only: given this test's loopback instead
    of a URL, every mode that talks to the cloud answers through it."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.runtime import PyTorchRuntime
    link = Loopback(app)
    agent = EdgeAgent(PyTorchRuntime(split), link)
    image = load_examples()[1]["path"]
    for mode in ("progressive", "full-cloud", "adaptive"):
        record = agent.ask(image, Q, mode, k=2, rtt_ms=4, bandwidth_mbps=10)
        assert record["answer"] and record["mode"] == mode, record
    assert link.opened >= 3 and agent.runtime.info()["vlm_id"] == link.info()["vlm_id"]
