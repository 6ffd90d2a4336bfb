"""The demo page: starts, answers an example, turns bad input into readable messages."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(ROOT))
    import app as demo_app
    return demo_app


def test_answer_on_an_example_returns_the_ladder(app):
    ex = app.EXAMPLES[0]
    q = ex["questions"][0]
    answer, rows, _ = app.answer(ex["path"], q["question"])
    assert answer == q["answer"]
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert rows[0][1] <= 64  # layer 1 alone, header included


def test_bad_input_becomes_a_message_not_a_traceback(app, tmp_path):
    with pytest.raises(gr.Error, match="Pick an example"):
        app.answer(None, "what colour is the circle ?")
    with pytest.raises(gr.Error, match="Type a question"):
        app.answer(app.EXAMPLES[0]["path"], "  ")
    bogus = tmp_path / "notes.png"
    bogus.write_text("not pixels")
    with pytest.raises(gr.Error, match="not an image"):
        app.answer(str(bogus), "describe the scene .")
    _, _, notes = app.answer(app.EXAMPLES[0]["path"], "what colour is the giraffe ?")
    assert "giraffe" in notes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_app_py_serves_the_page():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200 and b"progvlm" in r.read()
                    return
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stdout.read().decode()[-2000:])
                time.sleep(1)
        pytest.fail("app.py did not serve its page within 90 s")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
