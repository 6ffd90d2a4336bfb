"""The cloud on Ray Serve answers as the single-process service, over the same HTTP contract.

One local Ray instance (2 CPUs, no dashboard), one replica of the bundled model; slow (Ray
takes ~20 s to start here)."""
import json
import socket
import threading

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
import httpx  # noqa: E402
from local_client import LocalClient  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from progvlm.serve.cloud import create_app  # noqa: E402
from progvlm.serve.ray_serve import APP_NAME, cloud_application  # noqa: E402
from progvlm.toyworld.scenes import generate_scene, render_scene  # noqa: E402
from progvlm.split import load_split  # noqa: E402

pytestmark = pytest.mark.slow
QUESTIONS = ["describe the scene .", "how many objects are there ?", "is there a red circle ?",
             "what colour is the large square ?"]
MAX_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cloud():
    """(base URL, port) of the deployed application; Ray shut down afterwards."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # a long batch wait, so that requests sent together surely share a batch
        serve.run(cloud_application(num_cpus=0.5, max_batch=MAX_BATCH, batch_wait_ms=2000),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local():
    split = load_split()
    return split, LocalClient(create_app(split))


def test_ray_cloud_answers_as_the_single_process_service(ray_cloud, local):
    url, port = ray_cloud
    split, client = local
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    info, want_info = httpx.get(f"{url}/v1/info").json(), client.get("/v1/info").json()
    assert {k: v for k, v in info.items() if k not in ("concurrency", "batching")} == \
           {k: v for k, v in want_info.items() if k != "concurrency"}
    assert info["batching"]["max_batch"] == MAX_BATCH and "serve.batch" in info["concurrency"]

    streams = [split.pack(split.edge(render_scene(generate_scene(60 + s)), 1 + s))
               for s in range(MAX_BATCH)]
    requests = list(zip(streams, QUESTIONS))
    want = [client.post("/v1/progressive", params={"question": q}, content=d).json()
            for d, q in requests]
    got = [None] * len(requests)

    def ask(i):
        d, q = requests[i]
        got[i] = httpx.post(f"{url}/v1/progressive", params={"question": q}, content=d,
                            timeout=60).json()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("answer", "layers_used", "partial")} == \
               {k: w[k] for k in ("answer", "layers_used", "partial")}
    assert max(g["batch_size"] for g in got) > 1  # Ray Serve batched them

    bad = httpx.post(f"{url}/v1/progressive", params={"question": QUESTIONS[0]},
                     content=b"XX" + streams[0][2:])
    assert bad.status_code == 400 and "bad bitstream" in bad.json()["detail"]


def test_ray_cloud_serves_the_websocket_stream(ray_cloud, local):
    _, port = ray_cloud
    split, client = local
    data = split.pack(split.edge(render_scene(generate_scene(70))))

    def final(send_json, send_bytes, receive):
        send_json({"question": QUESTIONS[0], "refine": False})
        send_bytes(data)
        send_json({"end": True})
        while (msg := receive())["type"] != "final":
            assert msg["type"] == "refinement"
        return msg
    with connect(f"ws://127.0.0.1:{port}/v1/progressive/stream", open_timeout=30) as ws:
        got = final(lambda m: ws.send(json.dumps(m)), ws.send, lambda: json.loads(ws.recv(60)))
    with client.websocket_connect("/v1/progressive/stream") as ws:
        want = final(ws.send_json, ws.send_bytes, ws.receive_json)
    assert got["answer"] == want["answer"] and got["layers"] == want["layers"]
