"""The cloud backend over HTTP: answers equal the library's, every fault gets a 4xx reason."""
import threading
import time

import pytest
from local_client import LocalClient
from PIL import Image

from progvlm.serve.cloud import create_app
from progvlm.toyworld.examples import load_examples
from progvlm.split import Frame, load_split

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q = "describe the scene ."


def stream(split, tokens, k):
    """The wire form of layers 1..k of these tokens."""
    return split.pack(Frame(split.mae.compress(tokens, k), len(tokens)))


def decode(split, data):
    frame = split.unpack(data)
    return split.decode(frame), frame


@pytest.fixture(scope="module")
def parts():
    split = load_split()
    return split.vlm, split


@pytest.fixture(scope="module")
def client(parts):
    return LocalClient(create_app(parts[1], token=TOKEN, max_body_bytes=600_000))


@pytest.fixture(scope="module")
def example(parts):
    path = load_examples()[3]["path"]
    backend, mae = parts
    return path, backend.edge_half(Image.open(path))


def test_health_is_open_and_info_needs_the_token(client, parts):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/info").status_code == 401
    assert client.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    info = client.get("/v1/info", headers=AUTH).json()
    backend, mae = parts
    assert info["vlm_id"] == backend.model_id and info["mae_fingerprint"] == mae.fingerprint.hex()
    assert (info["num_layers"], info["num_tokens"], info["token_dim"]) == (4, 64, 128)


def test_full_answers_as_the_whole_model(client, parts, example):
    path, _ = example
    r = client.post("/v1/full", params={"question": Q}, content=open(path, "rb").read(), headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == parts[0].answer(Image.open(path), Q).text
    assert set(body["stage_ms"]) == {"image_decode_ms", "vision_ms", "prefill_ms", "generation_ms"}


def test_progressive_answers_from_the_layers_present(client, parts, example):
    backend, mae = parts
    _, tokens = example
    data = stream(mae, tokens, 3)
    for cut, layers in ((len(data), 3), (len(data) - 1, 2)):
        r = client.post("/v1/progressive", params={"question": Q}, content=data[:cut], headers=AUTH)
        body = r.json()
        decoded, _ = decode(mae, data[:cut])
        assert body["answer"] == backend.cloud_half(decoded, Q).text
        assert (body["layers_used"], body["partial"]) == (layers, layers < 3)
        assert set(body["stage_ms"]) == {"mae_decode_ms", "prefill_ms", "generation_ms"}


@pytest.mark.parametrize("mangle, reason", [
    (lambda d: b"XX" + d[2:], "not a progvlm bitstream"),
    (lambda d: _other_fingerprint(d), "wrong MAE fingerprint"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 0x55]), "checksum mismatch"),
    (lambda d: d[:5], "truncated"),
])
def test_a_bad_bitstream_gets_400_with_the_reason(client, parts, example, mangle, reason):
    data = stream(parts[1], example[1], 2)
    r = client.post("/v1/progressive", params={"question": Q}, content=mangle(data), headers=AUTH)
    assert r.status_code == 400 and reason in r.json()["detail"]


def test_bad_requests_get_4xx_never_500(client):
    post = lambda path, **kw: client.post(path, headers=AUTH, **kw)
    assert post("/v1/full", params={"question": Q}, content=b"not an image").status_code == 400
    assert post("/v1/full", content=b"x").status_code == 422  # no question
    assert post("/v1/full", params={"question": Q}, content=b"").status_code == 400
    assert post("/v1/full", params={"question": Q}, content=b"x" * 600_001).status_code == 413

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(700):
            yield b"x" * 1000
    assert post("/v1/progressive", params={"question": Q}, content=chunked()).status_code == 413
    long_q = " ".join(["what"] * 40)
    r = post("/v1/full", params={"question": long_q}, content=open(load_examples()[0]["path"], "rb").read())
    assert r.status_code == 400 and "too long" in r.json()["detail"]


def test_the_stream_answers_after_every_layer(client, parts, example):
    backend, mae = parts
    data = stream(mae, example[1], 4)
    layers = _layer_ends(data)
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        ws.send_json({"question": Q})
        start = 0
        for end in layers:
            ws.send_bytes(data[start:end])
            start = end
            msg = ws.receive_json()
            assert msg["type"] == "refinement"
            decoded, _ = decode(mae, data[:end])
            assert msg["answer"] == backend.cloud_half(decoded, Q).text
        ws.send_json({"end": True})
        final = ws.receive_json()
    assert [final["type"], final["layers"], final["partial"]] == ["final", 4, False]


def test_a_stream_that_ends_early_is_answered_and_marked_partial(client, parts, example):
    data = stream(parts[1], example[1], 4)
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        ws.send_json({"question": Q})
        ws.send_bytes(data[:_layer_ends(data)[1]])
        assert ws.receive_json()["layers"] == 2
        ws.send_json({"end": True})
        final = ws.receive_json()
    assert (final["layers"], final["layers_announced"], final["partial"]) == (2, 4, True)


def test_an_unwatched_stream_is_answered_once_even_when_cut(client, parts, example):
    data = stream(parts[1], example[1], 4)
    ends = _layer_ends(data)
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        ws.send_json({"question": Q, "refine": False})
        start = 0
        for end in ends:  # layer by layer, as a slow link delivers them
            ws.send_bytes(data[start:end])
            start = end
        assert ws.receive_json()["layers"] == 4  # no answers for layers 1..3
        ws.send_json({"end": True})
        assert ws.receive_json()["type"] == "final"
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        ws.send_json({"question": Q, "refine": False})
        ws.send_bytes(data[:ends[1]])  # then silence: the uplink was cut after layer 2
        t0 = time.monotonic()
        msg = ws.receive_json()
    assert msg["layers"] == 2 and 0.4 < time.monotonic() - t0 < 3


def test_the_stream_rejects_a_wrong_token_and_a_corrupt_stream(client, parts, example):
    with client.websocket_connect("/v1/progressive/stream") as ws:
        assert ws.receive_json()["status"] == 401
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        ws.send_json({"question": Q})
        ws.send_bytes(b"XX" + stream(parts[1], example[1], 1)[2:])
        msg = ws.receive_json()
    assert msg["status"] == 400 and "not a progvlm bitstream" in msg["detail"]


def test_concurrent_requests_get_the_answers_of_sequential_ones(parts):
    backend, mae = parts
    client = LocalClient(create_app(mae))
    paths = [e["path"] for e in load_examples()[:4]]
    streams = [stream(mae, backend.edge_half(Image.open(p)), 2) for p in paths]
    questions = ["how many objects are there ?", Q]
    expected = {(i, q): client.post("/v1/progressive", params={"question": q}, content=s).json()["answer"]
                for i, s in enumerate(streams) for q in questions}
    got, errors = {}, []

    def worker(i, q):
        try:
            r = client.post("/v1/progressive", params={"question": q}, content=streams[i])
            got[(i, q)] = r.json()["answer"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=key) for key in expected for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected


def _layer_ends(data: bytes) -> list[int]:
    """Byte offsets where layers 1..k end in the wire form."""
    from progvlm.codec.bitstream import parse
    return parse(data).layer_ends()


def _other_fingerprint(data: bytes) -> bytes:
    """The same layers, written as by another MAE (a valid stream, the wrong model)."""
    from progvlm.codec.bitstream import pack, parse
    bs = parse(data)
    return pack(bytes(4), bs.num_tokens, bs.num_layers, bs.layers)


def test_one_socket_carries_requests_in_sequence_when_kept_open(client, parts, example):
    """The edge's session: progressive and full requests, one after another, on one socket."""
    backend, mae = parts
    path, tokens = example
    data = stream(mae, tokens, 2)
    jpeg = open(path, "rb").read()
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        for _ in range(2):
            ws.send_json({"question": Q, "refine": False, "keep_open": True})
            ws.send_bytes(data)
            ws.send_json({"end": True})
            assert ws.receive_json()["type"] == "refinement"
            final = ws.receive_json()
            assert (final["type"], final["layers"]) == ("final", 2)
            assert final["answer"] == backend.cloud_half(decode(mae, data)[0], Q).text
            ws.send_json({"question": Q, "kind": "full", "keep_open": True})
            ws.send_bytes(jpeg[:1000])
            ws.send_bytes(jpeg[1000:])
            ws.send_json({"end": True})
            full = ws.receive_json()
            assert full["type"] == "final" and full["received_bytes"] == len(jpeg)
            assert full["answer"] == backend.answer(Image.open(path), Q).text
            assert set(full["stage_ms"]) == {"image_decode_ms", "vision_ms", "prefill_ms", "generation_ms"}


def test_a_one_shot_stream_is_closed_after_its_final_answer(client, parts, example):
    from starlette.websockets import WebSocketDisconnect
    data = stream(parts[1], example[1], 1)
    with client.websocket_connect("/v1/progressive/stream", headers=AUTH) as ws:
        ws.send_json({"question": Q})  # as clients before sessions send it: no keep_open
        ws.send_bytes(data)
        ws.send_json({"end": True})
        assert [ws.receive_json()["type"] for _ in range(2)] == ["refinement", "final"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1000
