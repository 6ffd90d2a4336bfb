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

from progvlm.serve.children import cloud_service, edge_service, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(ROOT))
    import app as demo_app
    with cloud_service() as cloud, edge_service(cloud.url, cloud_token=cloud.token) as edge:
        demo_app.connect(edge.url, token=edge.token)
        yield demo_app


def run(app, image, question, modes=("full-cloud", "full-edge", "progressive", "auto"), k=2):
    *_, last = app.compare(image, question, 1, 20, k, list(modes), 300)
    return last


def test_compare_shows_every_mode_the_chart_ladder_and_picture(app):
    ex = app.EXAMPLES[0]
    q = ex["questions"][0]
    *cards, chart, ladder, picture, notes, records = run(app, ex["path"], q["question"])
    assert [r["mode"] for r in records] == ["full-cloud", "full-edge", "progressive", "auto"]
    for text, record in zip(cards, records):
        assert f"**{record['answer']}**" in text and f"payload: **{record['payload_bytes']} bytes**" in text
        assert ("✓ correct" in text) == (record["answer"] == q["answer"])
    assert "consistency: 1.000" in cards[1] and "auto: predicted" in cards[3]
    assert set(chart["mode"]) == {"full-cloud", "full-edge", "progressive · k=2", f"auto · k={records[3]['k']}"}
    assert abs(chart[chart["mode"] == "full-edge"]["ms"].sum() - records[1]["total_ms"]) < 0.01
    assert [r[0] for r in ladder] == [1, 2, 3, 4] and ladder[0][1] <= 64
    assert records[2]["payload_bytes"] == ladder[1][1]  # progressive k=2 sends the ladder's k=2
    assert picture.size[0] > 4 * picture.size[1] - 40  # four panels side by side


def test_the_emulated_device_is_marked_projected(app):
    ex = app.EXAMPLES[1]
    *_, last = app.compare(ex["path"], "describe the scene .", 1, 20, 2, ["full-edge", "progressive"],
                           300, "imx95-emulated")
    *cards, chart, _, _, _, records = last
    assert all(r["device_profile"] == "imx95-emulated" and r["projected_stages"] for r in records)
    assert "(projected)" in cards[1] and "(projected)" in cards[2]
    assert any(stage.endswith("(projected)") for stage in chart["stage"])


def test_progressive_answers_refine_live(app):
    ex = app.EXAMPLES[2]
    updates = list(app.compare(ex["path"], "describe the scene .", 1, 20, 3, ["progressive"], 300))
    # (the page watches the stream, so the cloud answers every layer, however fast they arrive)
    live = [u[2] for u in updates if "refining" in u[2]]
    assert [line.split("_refining: ")[1].split(" of")[0] for line in live] == ["1", "2", "3"]


def test_suggested_questions_follow_the_picked_image(app):
    ex = app.EXAMPLES[1]
    assert app.suggested(ex["path"])["choices"] == [q["question"] for q in ex["questions"]]
    assert app.suggested(None)["choices"] == app.GENERIC_QUESTIONS


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
    *_, notes, _ = run(app, app.EXAMPLES[0]["path"], "what colour is the giraffe ?", modes=("full-edge",))
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


def test_a_conversation_about_one_frame_sends_its_bytes_once(app):
    """The chat: the first question sends the frame's first layers, a follow-up none (the
    cloud holds them); every turn shows its bytes and the answer is the one-shot request's."""
    ex = app.EXAMPLES[1]
    q1, q2 = (q["question"] for q in ex["questions"][:2])
    history, cleared, first = app.converse(ex["path"], q1, [], 1, 20, 500)
    history, _, second = app.converse(ex["path"], q2, history, 1, 20, 500)
    assert cleared == "" and [m["role"] for m in history] == ["user", "assistant"] * 2
    assert first["bytes_sent_this_turn"] > 0 and not first["resumed"]
    assert second["resumed"] and second["bytes_sent_this_turn"] < first["bytes_sent_this_turn"]
    assert f"**{second['answer']}**" in history[-1]["content"]
    assert f"{second['bytes_sent_this_turn']} bytes this turn" in history[-1]["content"]
    alone = app.EDGE["client"].ask(ex["path"], q2, mode="adaptive")
    assert second["answer"] == alone["answer"]
    with pytest.raises(gr.Error, match="Type a question"):
        app.converse(ex["path"], " ", history, 1, 20, 500)
