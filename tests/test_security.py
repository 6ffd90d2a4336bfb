"""Hardening, round 2 (issue 21): each test here failed on the code before its fix.

1. A header of a few bytes announced N tokens up to 2^28; the cloud decoded them all under the
   model lock before the VLM refused them (N = 262,144: 7.9 s and +2.4 GB). A stream whose N,
   grid or L the paired VLM and MAE cannot take is now refused from its header alone; the fuzz
   draws every header field over its whole range, over HTTP and the WebSocket, with a bound on
   the memory the process gains.
2. The cloud's HTTP routes answered a cross-origin POST that a browser sends without a preflight.
3. DNS rebinding: a page whose own name resolves to this machine passed the Origin check (Origin
   and Host both its name); now both services answer only Hosts that name them.
4. A camera frame with a side over JPEG's 65,500 px: full-cloud raised a 500.
5. Deeply nested JSON as a WebSocket control message: a RecursionError, a 500 and close 1011.
6. The agent let questions through that the cloud refuses (over 500 characters): a 502 after
   the device's work; the protocol's limit is now one definition that both sides apply.
7. Link time over the agent's limit got 422 up to the deadline and 504 beyond it.
8. /v1/compare with modes=adaptive alone skipped the budget's check: NaN in the NDJSON.
9. After a 500 the cloud closed the kept-alive connection: the client's next request on it
   failed with a read error.
"""
import binascii
import io
import json
import os
import struct
import threading

import pytest
from local_client import LocalClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_agent.agent import EdgeAgent
from edge_agent.runtime import PyTorchRuntime
from edge_agent.service import create_app as edge_app
from progvlm.codec.bitstream import BitstreamError, Header
from progvlm.serve.cloud import create_app
from progvlm.toyworld.examples import load_examples
from progvlm.net.http_limits import bind_names, host_allowed
from progvlm.net.protocol import MAX_QUESTION_CHARS

Q = "describe the scene ."
STREAM = "/v1/progressive/stream"
MB = 1 << 20


def raw_stream(fingerprint: bytes, n: int, num_layers: int, payloads: list[bytes],
               grid: tuple[int, int] | None = None, k: int | None = None) -> bytes:
    """A stream written from the format's description (bitstream.py's docstring), not by its
    packer, so any field can take any value the format can hold: N up to 2^28 - 1, L and k
    up to 15, a grid of 0..255 × 0..255."""
    def varint(v):
        out = bytearray()
        while True:
            out.append(v & 0x7F | (0x80 if v >> 7 else 0))
            v >>= 7
            if not v:
                return bytes(out)
    k = len(payloads) if k is None else k
    head = b"PV" + bytes([1 if grid is None else 2]) + fingerprint + varint(n)
    head += bytes(grid) if grid is not None else b""
    head += bytes([num_layers << 4 | k]) + b"".join(varint(len(p)) for p in payloads)
    head += struct.pack(">H", binascii.crc_hqx(head, 0xFFFF))
    return head + b"".join(p + struct.pack(">H", binascii.crc_hqx(bytes([i]) + p, 0xFFFF))
                           for i, p in enumerate(payloads))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The most resident memory this process reached above where it started, sampled every
    2 ms in a thread while the block runs."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gained(self) -> int:
        return self.peak - self.start


@pytest.fixture(scope="module")
def client(split):
    return LocalClient(create_app(split))


@pytest.fixture(scope="module")
def real(split):
    """A real 4-layer frame of a bundled example (its payloads, N and fingerprint)."""
    return split.edge(Image.open(load_examples()[2]["path"]))


@pytest.fixture
def no_decoding(split, monkeypatch):
    """Decoding any layer fails the test: a refusal must come from the header alone."""
    def refuse(*a, **kw):
        raise AssertionError("the cloud decoded a stream it should have refused from its header")
    monkeypatch.setattr(split.mae, "decompress", refuse)
    monkeypatch.setattr(split.mae, "edge_codec", refuse)


# ---- 1. the memory bomb ----------------------------------------------------------------------
@pytest.mark.parametrize("n, grid, num_layers", [
    (262_144, None, 4),  # the 16-byte attack
    ((1 << 28) - 64, None, 4),  # the most the format's varint holds, a multiple of 64
    (128, None, 4),  # two blocks: the bundled VLM takes one
    (64, (1, 1), 4),  # a grid for a model with a fixed layout
    (64, None, 15),  # an L that is not this MAE's
])
def test_a_stream_the_model_cannot_take_is_refused_from_its_header(
        split, client, real, no_decoding, n, grid, num_layers):
    data = raw_stream(split.fingerprint, n, num_layers, real.layers[:1], grid)
    r = client.post("/v1/progressive", params={"question": Q}, content=data)
    assert r.status_code == 400 and "bad bitstream" in r.json()["detail"], r.text
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q})
        ws.send_bytes(data[:len(data) // 2])  # the header is enough: refused before layer 1 ends
        msg = ws.receive_json()
    assert msg["type"] == "error" and msg["status"] == 400, msg
    with pytest.raises(BitstreamError, match="does not fit|this MAE has"):
        split.unpack(data)


def test_the_header_check_is_the_unpack_check(split, real):
    """Split.check_header takes a parsed header (the WebSocket's incremental parse) and the
    whole stream's Bitstream alike, with one verdict."""
    good = Header(split.fingerprint, real.num_tokens, split.num_layers, [1], 12)
    split.check_header(good)
    for bad in (Header(split.fingerprint, 64 * 4096, split.num_layers, [1], 12),
                Header(split.fingerprint, real.num_tokens, split.num_layers - 1, [1], 12),
                Header(split.fingerprint, real.num_tokens, split.num_layers, [1], 12, (0, 0))):
        with pytest.raises(BitstreamError):
            split.check_header(bad)


@st.composite
def headers(draw, fingerprint: bytes, real_layers: list[bytes], n: int, num_layers: int):
    """Every header field over its whole range, or (for about half the draws of each field) the
    value the pair takes, so that some streams are answered; the layers real ones, random bytes
    or none."""
    def field(good, whole):
        return draw(st.one_of(st.just(good), whole))
    n = field(n, st.integers(1, (1 << 28) - 1))
    grid = field(None, st.tuples(st.integers(0, 255), st.integers(0, 255)))
    num_layers = field(num_layers, st.integers(0, 15))
    k = field(len(real_layers), st.integers(0, 15))
    payloads = field(real_layers[:max(1, min(k, len(real_layers)))],
                     st.lists(st.binary(max_size=48), min_size=0, max_size=min(k, 4)))
    fp = field(fingerprint, st.binary(min_size=4, max_size=4))
    return raw_stream(fp, n, num_layers, payloads, grid, k=max(k, len(payloads)) & 0x0F)


def test_fuzzed_headers_never_cost_memory_or_a_server_error(split, client, real):
    """Headers drawn over every field's whole range, over HTTP and the WebSocket: each answer
    is a 200 (only a stream this pair takes) or a 4xx, and the process gains under 200 MB in
    all (N = 262,144 alone had cost 2.4 GB)."""
    answered = []

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(headers(split.fingerprint, real.layers, real.num_tokens, split.num_layers))
    def one(data):
        r = client.post("/v1/progressive", params={"question": Q}, content=data)
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            frame = split.unpack(data)  # only what the pair takes is answered
            assert frame.num_tokens == split.vlm.tokens_per_block and frame.grid is None
            answered.append(data)
        with client.websocket_connect(STREAM) as ws:
            ws.send_json({"question": Q, "refine": False})
            ws.send_bytes(data)
            ws.send_json({"end": True})
            while (msg := ws.receive_json())["type"] == "refinement":
                pass
        assert msg["type"] in ("final", "error"), msg
        assert msg["type"] == "final" or msg["status"] < 500, msg

    with PeakRSS() as mem:
        one()
    assert mem.gained < 200 * MB, f"the process gained {mem.gained / MB:.0f} MB"
    assert answered, "no drawn header was one the pair takes: the fuzz never reached the model"


# ---- 2. cross-origin requests to the cloud -----------------------------------------------------
def test_the_cloud_refuses_a_cross_origin_simple_post(split, client, real):
    """A page on any site can POST text/plain to a loopback port without a preflight; the
    browser would hide the answer, but the cloud did the work (and item 1 was one such POST)."""
    data = split.pack(real)
    page = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    for path, body in (("/v1/progressive", data), ("/v1/full", b"x")):
        r = client.post(path, params={"question": Q}, content=body, headers=page)
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"], r.text
    assert client.get("/v1/info", headers={"Origin": "null"}).status_code == 403
    # a program (no Origin) and a page of this very origin are served
    assert client.post("/v1/progressive", params={"question": Q}, content=data).status_code == 200
    assert client.get("/v1/info", headers={"Origin": "http://127.0.0.1"}).status_code == 200


# ---- 3. DNS rebinding -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edge_client():
    return LocalClient(edge_app(EdgeAgent(PyTorchRuntime.load())))


def _rebound(port: str = "8700") -> dict:
    return {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}


def test_a_rebound_name_is_refused_by_the_agent(edge_client):
    image = open(load_examples()[0]["path"], "rb").read()
    form = {"question": Q, "mode": "full-edge"}
    for headers in (_rebound(), {"Host": "evil.example"}):  # same-origin GETs send no Origin
        r = edge_client.post("/v1/ask", files={"image": ("f.png", image)}, data=form, headers=headers)
        assert r.status_code == 403 and "does not name this service" in r.json()["detail"], r.text
        assert edge_client.get("/v1/info", headers=headers).status_code == 403
    r = edge_client.post("/v1/ask", files={"image": ("f.png", image)}, data=form,
                         headers={"Host": "localhost:8700", "Origin": "http://localhost:8700"})
    assert r.status_code == 200, r.text


def test_a_rebound_name_is_refused_by_the_cloud_over_http_and_websocket(split, client):
    assert client.get("/v1/info", headers=_rebound("8600")).status_code == 403
    from starlette.websockets import WebSocketDisconnect
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect(STREAM, headers=_rebound("8600")) as ws:
            ws.receive_json()
    assert refused.value.code == 4403
    # a name given with --allow-host is served
    named = LocalClient(create_app(split, allowed_hosts=bind_names("127.0.0.1", ["cloud.lan"])))
    assert named.get("/v1/info", headers={"Host": "cloud.lan:8600"}).status_code == 200
    assert named.get("/v1/info", headers={"Host": "evil.example"}).status_code == 403


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:8700", True), ("localhost", True), ("LOCALHOST:1", True), ("app.localhost", True),
    ("[::1]:8700", True), ("192.168.1.20:8700", True), ("cloud.lan", True),
    ("evil.example:8700", False), ("localhost.evil.example", False), ("", False), (None, False),
    ("[::1", False), ("127.0.0.1:notaport", False), ("cloud.lan.evil", False),
])
def test_which_hosts_name_a_service(host, ok):
    assert host_allowed(host, bind_names("0.0.0.0", ["Cloud.LAN"])) is ok


def test_a_service_bound_to_a_name_answers_to_it():
    assert bind_names("board.local", ()) == {"board.local"}
    assert bind_names("0.0.0.0", ()) == bind_names("127.0.0.1", ()) == frozenset()


# ---- 4–8. the agent against a real cloud -------------------------------------------------------
@pytest.fixture(scope="module")
def agent_client(running_cloud):
    agent = EdgeAgent(PyTorchRuntime.load(), running_cloud.url, running_cloud.token)
    return LocalClient(edge_app(agent))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _post(client, path: str, image: bytes, **form):
    form = {"question": Q, **{k: str(v) for k, v in form.items()}}
    return client.post(path, files={"image": ("f.png", image)}, data=form)


def test_a_frame_wider_than_jpeg_allows_is_downscaled_for_full_cloud(agent_client):
    wide = _png(Image.new("RGB", (70_000, 6), (200, 40, 40)))  # 420,000 pixels: under the cap
    r = _post(agent_client, "/v1/ask", wide, mode="full-cloud")
    assert r.status_code == 200, r.text
    assert "70000×6 downscaled to fit JPEG's 65,500 px sides" in r.json()["payload"], r.json()["payload"]
    r = _post(agent_client, "/v1/compare", wide, modes="full-cloud,progressive")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.status_code == 200 and lines[-1]["type"] == "done", lines[-1]


@pytest.mark.parametrize("message", ["[" * 2000, '{"a":' * 800, "{" * 4000],
                         ids=["lists", "objects", "braces"])
def test_deeply_nested_json_on_the_websocket_is_a_400(client, real, split, message):
    with client.websocket_connect(STREAM) as ws:  # as the start message
        ws.send_text(message)
        msg = ws.receive_json()
    assert (msg["type"], msg["status"]) == ("error", 400), msg
    with client.websocket_connect(STREAM) as ws:  # as the end message
        ws.send_json({"question": Q})
        ws.send_bytes(split.pack(real)[:10])
        ws.send_text(message)
        msg = ws.receive_json()
    assert (msg["type"], msg["status"]) == ("error", 400), msg


@pytest.mark.parametrize("question", [
    " ".join(["what"] * 4) + " " + "x" * 600,  # 5 words, 604+ characters
    "x" * 900_000,  # one word of 900 KB
], ids=["5-words", "900KB-word"])
@pytest.mark.parametrize("mode", ["progressive", "full-cloud", "full-edge"])
def test_the_agent_applies_the_clouds_question_limit_before_its_work(agent_client, question, mode):
    image = open(load_examples()[0]["path"], "rb").read()
    r = _post(agent_client, "/v1/ask", image, mode=mode, question=question)
    assert r.status_code == 422, r.text
    assert f"at most {MAX_QUESTION_CHARS}" in r.json()["detail"], r.text


@pytest.mark.parametrize("bandwidth_mbps", [0.012, 0.01])
def test_link_time_over_the_limit_is_one_refusal_whatever_its_size(running_cloud, bandwidth_mbps):
    """A noise frame's JPEG (~700 KB) at 0.012 Mbps spends ~470 s on the link, at 0.01 Mbps
    ~560 s: both over the 120 s limit and the 180 s deadline; 422 for both, as for 120-180 s."""
    agent = EdgeAgent(PyTorchRuntime.load(), running_cloud.url, running_cloud.token)
    noise = Image.frombytes("RGB", (640, 640), os.urandom(640 * 640 * 3))
    r = _post(LocalClient(edge_app(agent)), "/v1/ask", _png(noise), mode="full-cloud",
              bandwidth_mbps=bandwidth_mbps, rtt_ms=0)
    assert r.status_code == 422 and "limit of 120 s" in r.json()["detail"], r.text


@pytest.mark.parametrize("modes", ["adaptive", "progressive", "full-edge"])
@pytest.mark.parametrize("budget", ["nan", "inf", "-1", "0"])
def test_every_mode_checks_the_budget(agent_client, modes, budget):
    image = open(load_examples()[0]["path"], "rb").read()
    r = _post(agent_client, "/v1/compare", image, modes=modes, budget_ms=budget)
    assert r.status_code == 422 and "budget" in r.json()["detail"], r.text


# ---- 9. a 500 keeps the connection --------------------------------------------------------------
class FailingModel:
    """The cloud's model, failing unexpectedly on every progressive request."""

    def __init__(self, split):
        from progvlm.serve.cloud import CloudModel
        self._model = CloudModel(split)

    def progressive(self, data, question):
        raise RuntimeError("boom")

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_after_a_500_the_kept_alive_connection_still_serves(split, caplog):
    import httpx

    from cloud_server import serving
    with serving(create_app(split, model=FailingModel(split)), log_level="warning") as url, \
            httpx.Client(base_url=url) as http:
        opened = []
        for _ in range(3):
            r = http.post("/v1/progressive", params={"question": Q}, content=b"PV" + bytes(20),
                          extensions={"trace": lambda name, info: opened.append(name)
                                      if name == "connection.connect_tcp.complete" else None})
            assert r.status_code == 500 and "boom" in r.json()["detail"], r.text
            assert http.get("/v1/info").status_code == 200
    assert len(opened) == 1, f"{len(opened)} connections for 3 failures: the cloud dropped them"


def test_the_transport_retries_info_once_on_a_fresh_connection():
    import httpx

    from progvlm.net.transport import CloudError, CloudLink
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ReadError("connection reset by peer")
        return httpx.Response(200, json={"vlm_id": "x"})
    link = CloudLink("http://127.0.0.1:9")
    link._http = httpx.Client(base_url=link.base_url, transport=httpx.MockTransport(handler))
    assert link.info() == {"vlm_id": "x"} and calls == ["/v1/info"] * 2
    calls.clear()
    link._http = httpx.Client(base_url=link.base_url, transport=httpx.MockTransport(
        lambda request: (calls.append(1), (_ for _ in ()).throw(httpx.ReadError("reset")))[1]))
    with pytest.raises(CloudError, match="unreachable"):
        link.info()
    assert len(calls) == 2  # once more, not forever


# ---- risks: slow heads, trickling streams, concurrent decodes -----------------------------------
def test_a_request_head_sent_one_line_at_a_time_is_cut(split, monkeypatch):
    import socket
    import time

    from cloud_server import serving
    from progvlm.net import http_limits
    monkeypatch.setattr(http_limits, "HEAD_TIMEOUT_S", 1.0)
    with serving(create_app(split), http=http_limits.HeadDeadline) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            t0 = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            closed = None
            for i in range(40):  # a header line every 0.25 s, for 10 s if allowed
                time.sleep(0.25)
                try:
                    sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
                    sock.settimeout(0.01)
                    if sock.recv(1) == b"":
                        closed = time.monotonic() - t0
                        break
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    closed = time.monotonic() - t0
                    break
        assert closed is not None and closed < 3, f"the slow head held the connection ({closed})"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a whole head
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_a_stream_request_trickling_for_longer_than_its_limit_is_cut(split, real):
    import time
    client = LocalClient(create_app(split, request_timeout_s=1.0, idle_timeout_s=0.6))
    data = split.pack(real)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q})
        t0 = time.monotonic()
        for i in range(10):  # one byte every 0.3 s: never idle for 0.6 s
            ws.send_bytes(data[i:i + 1])
            time.sleep(0.3)
        msg = ws.receive_json()
    assert (msg["type"], msg["status"]) == ("error", 408) and "over 1 s" in msg["detail"], msg
    assert time.monotonic() - t0 < 4


def _uploaded_at_once(client, image: bytes, n: int) -> list[int]:
    """The statuses of n full-edge asks of `image` sent at the same time."""
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(_post(
        client, "/v1/ask", image, mode="full-edge").status_code)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_concurrent_uploads_are_decoded_a_few_at_a_time(monkeypatch):
    """8 concurrent 6000 × 6000 PNGs (105 KB each, ~260 MB each to decode) took the agent from
    0.6 to 2.6 GB: decoding ran outside the device lock with no limit. Now at most DECODE_SLOTS
    decode at once, and the others wait for a slot within their deadline."""
    import time

    from edge_agent import agent as agent_module
    agent = EdgeAgent(PyTorchRuntime.load())
    client = LocalClient(edge_app(agent))
    now = max_now = 0
    lock = threading.Lock()
    real_load = agent_module.load_image

    def slow_load(source, *a, **kw):
        nonlocal now, max_now
        with lock:
            now += 1
            max_now = max(max_now, now)
        try:
            time.sleep(0.2)
            return real_load(source, *a, **kw)
        finally:
            with lock:
                now -= 1
    monkeypatch.setattr(agent_module, "load_image", slow_load)
    image = open(load_examples()[0]["path"], "rb").read()
    assert _uploaded_at_once(client, image, 8) == [200] * 8
    assert 1 < max_now <= agent_module.DECODE_SLOTS, max_now


@pytest.mark.slow
def test_concurrent_large_uploads_stay_within_a_memory_bound():
    agent = EdgeAgent(PyTorchRuntime.load())
    client = LocalClient(edge_app(agent))
    big = _png(Image.new("RGB", (6000, 6000), (30, 60, 90)))
    with PeakRSS() as mem:
        codes = _uploaded_at_once(client, big, 8)
    assert codes == [200] * 8
    assert mem.gained < 1200 * MB, f"8 uploads of 6000 × 6000 gained {mem.gained / MB:.0f} MB"
