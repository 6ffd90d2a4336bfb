"""The cloud backend under hostile and careless clients (issue 12): every bad message gets an
error that says why and a close code, silence and floods are bounded, browsers from other
origins are refused, clients that go away are not errors, and the OpenAPI document describes
the responses the service really sends. Each test here failed before its fix."""
import json
import logging
import time

import jsonschema
import pytest
from local_client import LocalClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from cloud_server import serving
from progvlm import cli
from progvlm.codec.bitstream import TruncatedStream, parse
from progvlm.serve.cloud import create_app
from progvlm.toyworld.examples import load_examples
from progvlm.split import load_split

Q = "describe the scene ."
STREAM = "/v1/progressive/stream"


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def client(split):
    return LocalClient(create_app(split))


@pytest.fixture(scope="module")
def data(split):
    """A 4-layer stream of a bundled example."""
    return split.pack(split.edge(Image.open(load_examples()[2]["path"])))


def _error_then_close(ws) -> tuple[dict, int]:
    msg = ws.receive_json()
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    return msg, closed.value.code


# ---- a. the first message ----------------------------------------------------------------------
@pytest.mark.parametrize("send, status, reason", [
    (lambda ws: ws.send_bytes(b"\x00\x01"), 400, "JSON start message"),
    (lambda ws: ws.send_text("hello"), 400, "not JSON"),
    (lambda ws: ws.send_json([Q]), 422, "JSON object"),
    (lambda ws: ws.send_json({"question": 7}), 422, "question"),
    (lambda ws: ws.send_json({"refine": True}), 422, "question is required"),
    (lambda ws: ws.send_json({"question": Q, "refine": "no"}), 422, "refine must be true or false"),
    (lambda ws: ws.send_json({"question": Q, "kind": "jpeg"}), 422, "kind must be"),
    (lambda ws: ws.send_json({"question": "x" * 501}), 422, "at most 500"),
])
def test_a_bad_first_message_gets_an_error_and_a_close_code(client, send, status, reason):
    with client.websocket_connect(STREAM) as ws:
        send(ws)
        msg, code = _error_then_close(ws)
    assert msg["type"] == "error" and msg["status"] == status and reason in msg["detail"], msg
    assert code == 4000 + status


def test_a_text_message_other_than_end_inside_a_stream_is_refused(client, data):
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q})
        ws.send_bytes(data[:5])
        ws.send_json({"question": Q})
        msg, code = _error_then_close(ws)
    assert (msg["status"], code) == (400, 4400) and '{"end": true}' in msg["detail"]


def test_a_silent_socket_is_closed_after_the_idle_timeout(split, data):
    with serving(create_app(split, idle_timeout_s=0.3)) as url:
        ws_url = url.replace("http", "ws") + STREAM
        for opening in ([], [json.dumps({"question": Q}), data[:20]]):  # before and inside a request
            with ws_connect(ws_url) as ws:
                t0 = time.monotonic()
                for message in opening:
                    ws.send(message)
                msg = json.loads(ws.recv(timeout=5))
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=5)
            assert msg["status"] == 408 and "0.3 s" in msg["detail"], msg
            assert ws.close_code == 4408 and time.monotonic() - t0 < 3


def test_a_request_of_too_many_messages_is_refused(split, data):
    client = LocalClient(create_app(split, max_stream_messages=20))
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q})
        for i in range(21):
            ws.send_bytes(data[i:i + 1])
        msg, code = _error_then_close(ws)
    assert (msg["status"], code) == (413, 4413) and "20 messages" in msg["detail"], msg


def test_a_request_over_the_byte_limit_is_refused(split):
    client = LocalClient(create_app(split, max_body_bytes=1000))
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q})
        ws.send_bytes(b"PV" + bytes(999))
        msg, code = _error_then_close(ws)
    assert (msg["status"], code) == (413, 4413) and "limit of 1000 bytes" in msg["detail"], msg


class CountingSplit:
    """The split, counting how often a whole stream is parsed."""

    def __init__(self, split):
        self._split, self.unpacks = split, 0

    def unpack(self, data):
        self.unpacks += 1
        return self._split.unpack(data)

    def __getattr__(self, name):
        return getattr(self._split, name)


def test_a_stream_sent_one_byte_at_a_time_is_parsed_once_per_layer(split, data):
    """Parsing the whole buffer on every message cost time quadratic in the message count."""
    counting = CountingSplit(split)
    client = LocalClient(create_app(counting))
    layers = len(parse(data).layers)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q})
        for i in range(len(data)):
            ws.send_bytes(data[i:i + 1])
        ws.send_json({"end": True})
        got = [ws.receive_json() for _ in range(layers + 1)]
    assert [m["layers"] for m in got] == [1, 2, 3, 4, 4] and got[-1]["type"] == "final"
    reference = [split.cloud(split.unpack(data).prefix(j), Q).text for j in range(1, layers + 1)]
    assert [m["answer"] for m in got[:-1]] == reference
    # once per layer: the Frame parsed when layer j completes is the one answered (issue 17)
    assert len(data) > 50 and counting.unpacks <= layers, counting.unpacks


@pytest.mark.parametrize("mangle", [
    lambda d: b"XX" + d[2:],
    lambda d: d[:6] + bytes([d[6] ^ 1]) + d[7:],  # the fingerprint
    lambda d: d[:-1] + bytes([d[-1] ^ 0x55]),  # the last layer's checksum
    lambda d: d[:9] + bytes([d[9] ^ 0x40]) + d[10:],  # a header field
    lambda d: d + b"\x00",
])
def test_a_bad_stream_byte_by_byte_gets_the_reason_a_whole_body_gets(client, data, mangle):
    bad = mangle(data)
    expected = client.post("/v1/progressive", params={"question": Q}, content=bad).json()["detail"]
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"question": Q, "refine": False})
        for i in range(len(bad)):
            ws.send_bytes(bad[i:i + 1])
        ws.send_json({"end": True})
        while (msg := ws.receive_json())["type"] == "refinement":
            pass
    assert msg["type"] == "error" and msg["detail"] == expected, (msg, expected)


# ---- b. Origin ---------------------------------------------------------------------------------
def test_a_browser_from_another_origin_is_refused(split, data):
    client = LocalClient(create_app(split, allowed_origins=["https://ui.example"]))
    with client.websocket_connect(STREAM, headers={"origin": "https://evil.example"}) as ws:
        msg, code = _error_then_close(ws)
    assert (msg["status"], code) == (403, 4403) and "https://evil.example" in msg["detail"]
    for headers in ({"origin": "https://ui.example"}, {}):  # allowed, and no browser at all
        with client.websocket_connect(STREAM, headers=headers) as ws:
            ws.send_json({"question": Q})
            ws.send_bytes(data)
            assert ws.receive_json()["type"] == "refinement"
    with LocalClient(create_app(split)).websocket_connect(STREAM, headers={"origin": "null"}) as ws:
        assert _error_then_close(ws)[0]["status"] == 403  # none allowed by default


# ---- c. clients that go away; the truncation message -------------------------------------------
def test_a_client_that_goes_away_is_a_debug_line_not_an_error(split, data, caplog):
    import socket
    with serving(create_app(split)) as url, caplog.at_level(logging.DEBUG):
        ws_url = url.replace("http", "ws") + STREAM
        with ws_connect(ws_url) as ws:  # gone in the middle of a stream
            ws.send(json.dumps({"question": Q}))
            ws.send(data[:20])
        with ws_connect(ws_url) as ws:  # gone while the cloud answers
            ws.send(json.dumps({"question": Q}))
            ws.send(data)
            ws.socket.close()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:  # gone in the middle of a body
            s.sendall(b"POST /v1/full?question=hi HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nabc")
            time.sleep(0.2)
        time.sleep(1.5)
    server = [r for r in caplog.records if r.name.split(".")[0] in ("uvicorn", "progvlm")]
    loud = [r for r in server if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.getMessage()) for r in loud]
    gone = [r for r in server if r.name == "progvlm.cloud" and "went away" in r.getMessage()]
    assert len(gone) >= 3 and all(r.levelno == logging.DEBUG for r in gone)


def test_a_stream_too_short_to_read_says_what_it_needs(data):
    for n in (0, 5, 8):
        with pytest.raises(TruncatedStream) as e:
            parse(data[:n])
        assert f"{n} bytes" in str(e.value) and "at least 9" in str(e.value), e.value


# ---- d. the OpenAPI document tells the truth ---------------------------------------------------
def _documented(spec: dict, path: str, method: str, status: int) -> dict:
    schema = spec["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}


def test_the_openapi_document_describes_the_real_responses(split, data):
    app = create_app(split, token="t0ken", max_body_bytes=600_000)
    client = LocalClient(app, raise_server_exceptions=False)
    spec = client.get("/openapi.json").json()
    auth = {"Authorization": "Bearer t0ken"}
    jpeg = open(load_examples()[0]["path"], "rb").read()
    for path, good in (("/v1/full", jpeg), ("/v1/progressive", data)):
        op = spec["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] and body["content"]["application/octet-stream"]["schema"] == \
            {"type": "string", "format": "binary"}
        (question,) = [p for p in op["parameters"] if p["name"] == "question"]
        assert question["required"] and question["in"] == "query"
        assert {"200", "400", "401", "413", "422", "500"} <= set(op["responses"])
        for status in (400, 401, 413, 422, 500):
            detail = _documented(spec, path, "post", status)
            jsonschema.validate({"detail": "a reason"}, detail)
            with pytest.raises(jsonschema.ValidationError):  # an array detail is not the document's
                jsonschema.validate({"detail": [{"loc": ["query"], "msg": "x"}]}, detail)
        post = lambda **kw: client.post(path, **{"headers": auth, **kw})
        real = {
            200: [post(params={"question": Q}, content=good)],
            400: [post(params={"question": Q}, content=b"\x00" * 20), post(params={"question": Q}, content=b"")],
            401: [client.post(path, params={"question": Q}, content=good)],
            413: [post(params={"question": Q}, content=b"x" * 600_001)],
            422: [post(content=good), post(params={"question": "  "}, content=good),
                  post(params={"question": "x" * 501}, content=good)],
        }
        for status, responses in real.items():
            for r in responses:
                assert r.status_code == status, (path, r.status_code, r.text)
                jsonschema.validate(r.json(), _documented(spec, path, "post", status))
    app.state.model.full = lambda *a: 1 / 0  # anything unexpected
    r = client.post("/v1/full", params={"question": Q}, content=jpeg, headers=auth)
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["detail"]
    jsonschema.validate(r.json(), _documented(spec, "/v1/full", "post", 500))
    r = client.get("/v1/info", headers=auth)
    jsonschema.validate(r.json(), _documented(spec, "/v1/info", "get", 200))
    jsonschema.validate(client.get("/v1/info").json(), _documented(spec, "/v1/info", "get", 401))


def test_a_missing_question_is_named_in_the_422(client, data):
    r = client.post("/v1/progressive", content=data)
    assert r.status_code == 422 and "question" in r.json()["detail"], r.text


# ---- e. serve-cloud says who can reach it ------------------------------------------------------
@pytest.mark.parametrize("host, who", [("127.0.0.1", "any process on this machine"),
                                       ("0.0.0.0", "anyone who can reach this host")])
def test_serve_cloud_without_a_token_warns_at_start(monkeypatch, capsys, host, who):
    import progvlm.serve.cloud as cloud_service
    called = {}
    monkeypatch.setattr(cloud_service, "serve", lambda *a, **kw: called.update(args=a, kw=kw))
    monkeypatch.delenv(cloud_service.TOKEN_ENV, raising=False)
    open_ = [] if host == "127.0.0.1" else ["--allow-open"]  # else refused: no token (check_bind)
    assert cli.main(["serve-cloud", "--host", host, "--allow-origin", "https://ui.example", *open_]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and cloud_service.TOKEN_ENV in err and who in err, err
    assert called["kw"]["allowed_origins"] == ["https://ui.example"]
    monkeypatch.setenv(cloud_service.TOKEN_ENV, "s3cret")
    assert cli.main(["serve-cloud", "--host", host]) == 0
    assert "warning" not in capsys.readouterr().err and called["kw"]["allowed_origins"] == []


def test_a_stalled_body_gets_408_and_the_connection_is_freed(split):
    """A body declared but never sent is cut after the read timeout (it held a connection 70 s)."""
    import socket
    import threading
    import time as _time

    import uvicorn
    from progvlm.serve.cloud import create_app
    from progvlm.serve.children import free_port
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(split, read_timeout_s=1.0), port=port,
                                           log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        deadline = _time.monotonic() + 20
        while not server.started:
            assert _time.monotonic() < deadline
            _time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/progressive?question=what HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\nab")
            t0 = _time.monotonic()
            reply = sock.recv(4096)
            waited = _time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert waited < 8
    finally:
        server.should_exit = True
