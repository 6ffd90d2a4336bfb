"""A new mode is one class plus its registry entry (edge_agent/modes): this file defines one
(`Echo`), registers it from here alone, and finds it everywhere a mode is offered: the edge
CLI's choices (and its run), GET /v1/info, POST /v1/ask and /v1/compare, and the page."""
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from local_client import LocalClient

from edge_agent.__main__ import build_parser, main
from edge_agent.agent import AskError, EdgeAgent
from edge_agent.modes import MODES, Mode, register, unregister
from edge_agent.runtime import PyTorchRuntime
from edge_agent.service import create_app
from progvlm.serve.children import free_port
from progvlm.toyworld.examples import load_examples

ROOT = Path(__file__).resolve().parents[1]
IMAGE = load_examples()[0]["path"]
Q = "describe the scene ."


class Echo(Mode):
    """The question back, with how many visual tokens the device saw: nothing crosses the link."""
    name = "echo"
    needs_cloud = False

    def on_device(self, context):
        tokens, _ = context.see()
        return f"{context.request.question} ({tokens.shape[0]} tokens)"

    def run(self, context):
        context.record.update(answer=context.seen, payload_bytes=0)


@pytest.fixture(scope="module")
def echo():
    register(Echo())
    yield "echo"
    unregister("echo")


@pytest.fixture(scope="module")
def agent(split, echo):
    runtime = PyTorchRuntime(split)
    yield EdgeAgent(runtime)  # no cloud: the echo needs none
    runtime.set_threads(runtime.default_threads)


def _choices(parser, command: str, dest: str):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if a.dest == dest).choices


def test_the_cli_offers_and_runs_the_new_mode(echo, capsys):
    assert list(_choices(build_parser(), "ask", "mode")) == list(MODES)
    assert echo in _choices(build_parser(), "ask", "mode")
    assert main(["ask", "--image", IMAGE, "--question", Q, "--mode", echo]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["mode"] == echo and record["answer"] == f"{Q} (64 tokens)"
    assert record["payload_bytes"] == 0 and "edge_vision" in record["stage_ms"]


def test_the_http_api_lists_and_runs_the_new_mode(agent, echo):
    client = LocalClient(create_app(agent))
    info = client.get("/v1/info").json()
    assert info["modes"] == list(MODES) and info["modes"][-1] == echo
    assert info["num_layers"] == agent.runtime.num_layers and "host" in info["device_profiles"]
    image = open(IMAGE, "rb").read()
    r = client.post("/v1/ask", files={"image": ("f.png", image)}, data={"question": Q, "mode": echo})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == echo and r.json()["answer"] == f"{Q} (64 tokens)"
    r = client.post("/v1/compare", files={"image": ("f.png", image)},
                    data={"question": Q, "modes": f"full-edge,{echo}"})
    results = [json.loads(line) for line in r.text.splitlines()]
    assert [x["mode"] for x in results if x["type"] == "result"] == ["full-edge", echo]
    assert results[-1]["type"] == "done"


def test_the_page_offers_the_new_mode(agent, echo):
    server = uvicorn.Server(uvicorn.Config(create_app(agent), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        sys.path.insert(0, str(ROOT))
        import app
        app.connect(f"http://127.0.0.1:{server.config.port}")
        components = list(app.demo.blocks.values())
        choices = next(c for c in components if getattr(c, "label", None) == "Modes to compare").choices
        assert [value for _, value in choices] == list(MODES)
        assert any(getattr(c, "elem_id", None) == f"card-{echo}" for c in components)
        *_, last = app.compare(IMAGE, Q, 1, 20, 2, [echo], 500)
        *cards, _chart, _ladder, _picture, _notes, records = last
        assert [r["mode"] for r in records] == [echo]
        assert f"**{Q} (64 tokens)**" in cards[list(MODES).index(echo)]
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_unregistered_mode_is_refused(agent):
    unregister("echo")
    try:
        with pytest.raises(AskError, match="unknown mode 'echo'"):
            agent.check(IMAGE, Q, "echo")
        assert "echo" not in _choices(build_parser(), "ask", "mode")
    finally:
        register(Echo())
