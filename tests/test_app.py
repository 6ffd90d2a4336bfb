"""The demo page: compares the modes through a real edge agent and cloud backend (child
processes on loopback), turns bad input into readable messages, and ends its children."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest

from progvlm.services import cloud_service, edge_service, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(ROOT))
    import app as demo_app
    with cloud_service() as cloud, edge_service(cloud.url) as edge:
        demo_app.connect(edge.url)
        yield demo_app


def run(app, image, question, modes=("full-cloud", "full-edge", "progressive", "auto"), k=2):
    *_, last = app.compare(image, question, 1, 20, k, list(modes), 300)
    return last


def test_compare_shows_every_mode_and_the_ladder(app):
    ex = app.EXAMPLES[0]
    q = ex["questions"][0]
    rows, ladder, _ = run(app, ex["path"], q["question"])
    assert [r[0].split()[0] for r in rows] == ["full-cloud", "full-edge", "progressive", "auto"]
    full_edge = rows[1]
    assert full_edge[2] == ("✓" if full_edge[1] == q["answer"] else "✗")
    assert full_edge[3] == "1.000" and full_edge[4] == 0  # the reference itself, nothing sent
    assert [r[0] for r in ladder] == [1, 2, 3, 4] and ladder[0][1] <= 64
    assert rows[2][4] == ladder[1][1]  # progressive k=2 sends what the ladder's k=2 sends


def test_progressive_answers_refine_live(app):
    ex = app.EXAMPLES[2]
    updates = list(app.compare(ex["path"], "describe the scene .", 1, 20, 3, ["progressive"], 300))
    live = [u[0][-1][0] for u in updates[:-1] if "so far" in u[0][-1][0]]
    assert live == [f"progressive ({j} layers so far)" for j in (1, 2, 3)]


def test_bad_input_becomes_a_message_not_a_traceback(app, tmp_path):
    with pytest.raises(gr.Error, match="Pick an example"):
        run(app, None, "what colour is the circle ?")
    with pytest.raises(gr.Error, match="Type a question"):
        run(app, app.EXAMPLES[0]["path"], "  ")
    with pytest.raises(gr.Error, match="at least one mode"):
        run(app, app.EXAMPLES[0]["path"], "describe the scene .", modes=())
    bogus = tmp_path / "notes.png"
    bogus.write_text("not pixels")
    with pytest.raises(gr.Error, match="not an image"):
        run(app, str(bogus), "describe the scene .")
    *_, notes = run(app, app.EXAMPLES[0]["path"], "what colour is the giraffe ?", modes=("full-edge",))
    assert "giraffe" in notes


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_python_app_py_serves_the_page_and_ends_its_children(stop):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200 and b"progvlm" in r.read()
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stdout.read().decode()[-2000:])
                time.sleep(1)
        else:
            pytest.fail("app.py did not serve its page within 120 s")
        children = _children(proc.pid)
        assert len(children) == 2  # the cloud backend and the edge agent
        proc.send_signal(stop)
        proc.wait(timeout=30)
        time.sleep(0.5)
        alive = [c for c in children if os.path.exists(f"/proc/{c}") and
                 "Z" not in open(f"/proc/{c}/stat").read().split()[2]]
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
