"""Hostile and careless input (issue 12): every one is refused with its reason, never a 500, a
hung thread or the page's generic error. Each test here failed before its fix."""
import io
import re
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from local_client import LocalClient
from PIL import Image

from edge_agent.agent import EdgeAgent
from edge_agent.runtime import PyTorchRuntime
from edge_agent.service import create_app as edge_app
from progvlm.serve.cloud import create_app as cloud_app
from progvlm.toyworld.examples import load_examples
from progvlm.images import ImageInputError, load_image
from progvlm.net import link
from progvlm.net.link import LinkError, LinkProfile
from progvlm.serve.children import free_port
from progvlm.net.transport import CloudError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = load_examples()[0]["path"]
# 30 words: one more than the bundled model reads (<bos> question <sep> in 32 text positions)
LONG_QUESTION = " ".join(["what", "colour", "is", "the", "circle"] * 6)
OK_QUESTION = " ".join((["what", "colour", "is", "the", "circle"] * 6)[:29])


# ---- hostile files, built by hand ---------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, extra: bytes = b"", rows: bytes | None = None) -> bytes:
    """An 8-bit RGB PNG; `extra` chunks go before the pixels (where Pillow reads them at open)."""
    if rows is None:
        rows = (b"\x00" + b"\x80" * 3 * width) * height
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + extra + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def _ztxt_png() -> bytes:
    """8×8 pixels and a zTXt chunk that inflates to 200 MB (a few hundred KB on disk)."""
    comp, zeros = zlib.compressobj(9), bytes(1 << 20)
    text = b"".join(comp.compress(zeros) for _ in range(200)) + comp.flush()
    return _png(8, 8, _chunk(b"zTXt", b"Comment\x00\x00" + text))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = Path(EXAMPLE).read_bytes()
    files = {
        "ztxt": _ztxt_png(),
        "truncated": good[:len(good) // 2],
        "text": b"this is a text file, not pixels\n" * 10,
        "empty": b"",
        # headers that claim 10^10 and 6.4·10^7 pixels: Pillow's bomb guard, then ours (40 MP)
        "bomb": _png(100_000, 100_000, rows=b"\x00"),
        "over_limit": _png(8_000, 8_000, rows=b"\x00"),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / f"{name}.png"
        paths[name].write_bytes(data)
    return paths


REASONS = {"ztxt": "MAX_TEXT_CHUNK", "truncated": "truncated", "text": "not an image",
           "empty": "empty", "bomb": "too large", "over_limit": "too large"}


# ---- the models, loaded once ----------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime():
    return PyTorchRuntime.load()


@pytest.fixture(scope="module")
def edge(runtime):
    """The edge agent's HTTP API, no cloud (full-edge answers; the rest refuse)."""
    return LocalClient(edge_app(EdgeAgent(runtime)))


class StubCloud:
    """A cloud that must not be reached: records any call and refuses it."""
    base_url = "http://stub"

    def __init__(self):
        self.calls = []

    def full(self, *args, **kw):
        self.calls.append("full")
        raise CloudError("cloud refused the request (400): stub", 400)

    progressive = full

    def info(self):
        return {}


def _agent_with_stub_cloud(runtime, **kw):
    agent = EdgeAgent(runtime, **kw)
    agent.cloud, agent._cloud_checked = StubCloud(), True
    return agent


def _ask(client: LocalClient, image=EXAMPLE, **form):
    form.setdefault("question", "describe the scene .")
    form = {k: str(v) for k, v in form.items()}
    data = image.read_bytes() if isinstance(image, Path) else Path(image).read_bytes()
    return client.post("/v1/ask", files={"image": ("frame.png", data)}, data=form)


# ---- 1. the link's parameters have ranges, and a request's time on the link has a bound ------
@pytest.mark.parametrize("field,value", [("rtt_ms", 1e300), ("rtt_ms", 600_000), ("rtt_ms", -1),
                                         ("bandwidth_mbps", 1e-300), ("bandwidth_mbps", 1e-6),
                                         ("bandwidth_mbps", 1e300), ("bandwidth_mbps", 0)])
@pytest.mark.parametrize("mode", ["full-edge", "progressive"])
def test_out_of_range_link_parameters_get_422_with_the_range(edge, mode, field, value):
    t0 = time.perf_counter()
    r = _ask(edge, mode=mode, **{field: value})
    assert time.perf_counter() - t0 < 10  # refused at once, never slept or paced
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    if field == "rtt_ms":
        assert f"0–{link.MAX_RTT_MS:g} ms" in detail, detail
    else:
        assert f"{link.MIN_BANDWIDTH_MBPS:g}–{link.MAX_BANDWIDTH_MBPS:g} Mbps" in detail, detail


def test_the_ranges_are_documented_and_their_ends_accepted():
    MIN_BANDWIDTH_MBPS, MAX_BANDWIDTH_MBPS = link.MIN_BANDWIDTH_MBPS, link.MAX_BANDWIDTH_MBPS
    MAX_RTT_MS = link.MAX_RTT_MS
    assert f"{MIN_BANDWIDTH_MBPS:g}–{MAX_BANDWIDTH_MBPS:g} Mbps" in LinkProfile.__doc__
    assert f"0–{MAX_RTT_MS:g} ms" in LinkProfile.__doc__
    for bw, rtt in ((MIN_BANDWIDTH_MBPS, 0), (MAX_BANDWIDTH_MBPS, MAX_RTT_MS), (1, 20)):
        assert LinkProfile.checked(bw, rtt) == LinkProfile(bw, rtt)
    with pytest.raises(LinkError, match="0.01–10000 Mbps"):
        LinkProfile.checked(0.001, 20)
    with pytest.raises(LinkError, match="0–10000 ms"):
        LinkProfile.checked(1, 10_001)


def test_a_payload_that_would_stay_on_the_link_too_long_is_refused_before_sending(runtime):
    agent = _agent_with_stub_cloud(runtime, max_link_s=1.0)
    client = LocalClient(edge_app(agent))
    # full-cloud: a ~2.6 kB JPEG at 0.01 Mbps is ~2 s on the link
    r = _ask(client, mode="full-cloud", bandwidth_mbps=0.01, rtt_ms=0)
    assert r.status_code == 422, r.text
    assert "limit of 1 s" in r.json()["detail"] and "0.01 Mbps" in r.json()["detail"]
    # progressive: ~100 bytes, but the round trip alone nearly fills the bound
    r = _ask(client, mode="progressive", k=4, bandwidth_mbps=0.01, rtt_ms=990)
    assert r.status_code == 422 and "limit of 1 s" in r.json()["detail"], r.text
    # a round trip over the bound is refused before any compute
    r = _ask(client, mode="auto", bandwidth_mbps=1, rtt_ms=1500)
    assert r.status_code == 422 and "limit of 1 s" in r.json()["detail"], r.text
    assert agent.cloud.calls == []  # nothing was sent
    # within the bound the request goes to the cloud (here: the stub's refusal, 502)
    assert _ask(client, mode="progressive", k=1, bandwidth_mbps=1, rtt_ms=20).status_code == 502
    assert agent.cloud.calls == ["full"]


def test_the_default_bound_admits_the_bundled_model_on_the_slowest_link(runtime):
    from progvlm.net.protocol import MAX_LINK_S
    assert MAX_LINK_S == 120
    agent = _agent_with_stub_cloud(runtime)
    client = LocalClient(edge_app(agent))
    r = _ask(client, mode="full-cloud", bandwidth_mbps=link.MIN_BANDWIDTH_MBPS, rtt_ms=link.MAX_RTT_MS)
    assert r.status_code == 502 and agent.cloud.calls == ["full"], r.text  # reached the cloud


# ---- 3. image loading: every Pillow failure is the project's image error -------------------------
@pytest.mark.parametrize("name", list(REASONS))
def test_every_unreadable_file_is_an_image_input_error(bad_files, name):
    for source in (bad_files[name], bad_files[name].read_bytes(), io.BytesIO(bad_files[name].read_bytes())):
        with pytest.raises(ImageInputError, match=REASONS[name]):
            load_image(source)


@pytest.mark.parametrize("name", ["ztxt", "truncated", "text", "empty"])
def test_unreadable_files_get_400_from_both_services(runtime, edge, bad_files, name):
    r = _ask(edge, image=bad_files[name], mode="full-edge")
    assert r.status_code == 400 and re.search(REASONS[name], r.json()["detail"]), r.text
    cloud = LocalClient(cloud_app(runtime.split))
    r = cloud.post("/v1/full", params={"question": "describe the scene ."},
                   content=bad_files[name].read_bytes() or b"\x00")
    assert r.status_code == 400, r.text


# ---- 3. a question longer than the bundled model reads --------------------------------------------
def test_the_runtime_checks_the_question_length(runtime):
    runtime.check_question(OK_QUESTION)
    with pytest.raises(ValueError, match="reads at most 29"):
        runtime.check_question(LONG_QUESTION)


def test_the_onnx_runtime_checks_the_question_length():
    from edge_agent.onnx_runtime import OnnxRuntime
    fake = SimpleNamespace(max_text_len=32)
    OnnxRuntime.check_question(fake, OK_QUESTION)
    with pytest.raises(ValueError, match="reads at most 29"):
        OnnxRuntime.check_question(fake, LONG_QUESTION)


@pytest.mark.parametrize("mode", ["full-edge", "full-cloud", "progressive", "auto"])
def test_a_question_over_29_words_gets_422_before_any_work(runtime, mode):
    agent = _agent_with_stub_cloud(runtime)
    r = _ask(LocalClient(edge_app(agent)), mode=mode, question=LONG_QUESTION)
    assert r.status_code == 422, r.text
    assert "at most 29" in r.json()["detail"]
    assert agent.cloud.calls == []
    assert _ask(LocalClient(edge_app(agent)), mode="full-edge", question=OK_QUESTION).status_code == 200


def test_the_cloud_answers_400_for_a_question_over_29_words(runtime):
    cloud = LocalClient(cloud_app(runtime.split))
    r = cloud.post("/v1/full", params={"question": LONG_QUESTION}, content=Path(EXAMPLE).read_bytes())
    assert r.status_code == 400 and "at most 29" in r.json()["detail"], r.text
    bitstream = runtime.split.pack(runtime.split.edge(load_image(EXAMPLE)))
    r = cloud.post("/v1/progressive", params={"question": LONG_QUESTION}, content=bitstream)
    assert r.status_code == 400 and "at most 29" in r.json()["detail"], r.text


# ---- 7. the page: reasons, not gradio's generic error; gradio's environment; the Space's pins ---
@pytest.fixture(scope="module")
def app(runtime):
    """The page in-process, talking over HTTP to an in-process edge agent (no cloud)."""
    import uvicorn
    sys.path.insert(0, str(ROOT))
    import app as demo_app
    server = uvicorn.Server(uvicorn.Config(edge_app(EdgeAgent(runtime)), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    demo_app.connect(f"http://127.0.0.1:{server.config.port}")
    yield demo_app
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("name", list(REASONS))
def test_the_page_names_the_reason_for_a_bad_upload(app, bad_files, name):
    from gradio.components.image import ImageData
    # gradio hands the upload to compare() as it is (its own preprocessing opened it with Pillow
    # and failed with the generic error)...
    path = app.image.preprocess(ImageData(path=str(bad_files[name]), orig_name=f"{name}.png"))
    assert path == str(bad_files[name])
    # ...and compare() says what is wrong with it
    with pytest.raises(gr.Error, match=REASONS[name]):
        list(app.compare(path, "describe the scene .", 1, 20, 2, ["full-edge"], 300))
    assert app.suggested(path)["choices"] == app.GENERIC_QUESTIONS


def test_the_served_page_shows_the_reason_for_a_bad_upload(app, bad_files):
    """Through gradio's HTTP API, as the browser sends an upload (preprocessing included)."""
    from gradio_client import Client, handle_file
    port = free_port()
    app.demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for name in ("ztxt", "text", "empty", "bomb"):
            with pytest.raises(Exception, match=f"Cannot use this image: .*{REASONS[name]}"):
                client.predict(handle_file(str(bad_files[name])), "describe the scene .", 1, 20, 2,
                               ["full-edge"], 300, "host", api_name="/compare")
    finally:
        app.demo.close()


def test_the_page_still_passes_good_uploads_through_gradio(app):
    from gradio.components.image import ImageData
    assert app.image.preprocess(ImageData(path=EXAMPLE, orig_name="scene.png")) == EXAMPLE
    assert type(app.image) is gr.Image  # no component subclass (gradio would write app.pyi)
    assert not (ROOT / "app.pyi").exists()


def test_the_agents_reason_reaches_the_page(app):
    with pytest.raises(gr.Error, match="at most 29") as e:
        list(app.compare(EXAMPLE, LONG_QUESTION, 1, 20, 2, ["full-edge"], 300))
    assert "internal error" not in str(e.value)
    with pytest.raises(gr.Error, match="0–10000 ms"):
        list(app.compare(EXAMPLE, "describe the scene .", 1, 1e300, 2, ["full-edge"], 300))


def test_main_honours_gradios_environment(app, monkeypatch):
    launched = {}
    monkeypatch.setattr(app.demo, "launch", lambda **kw: launched.update(kw))
    monkeypatch.setattr(app, "connect", lambda *a, **kw: None)
    monkeypatch.setattr(app.signal, "signal", lambda *a: None)
    monkeypatch.setattr(sys, "argv", ["app.py", "--edge-url", "http://127.0.0.1:1"])
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    app.main()
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 7861
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    monkeypatch.delenv("GRADIO_SERVER_PORT")
    app.main()
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860
    monkeypatch.setattr(sys, "argv", ["app.py", "--edge-url", "http://127.0.0.1:1", "--host", "::1",
                                      "--port", "7999"])
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    app.main()  # the command line beats the environment
    assert launched["server_name"] == "::1" and launched["server_port"] == 7999


def test_the_space_front_matter_pins_the_gradio_in_requirements():
    import yaml
    readme = (ROOT / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert match, "README.md has no front matter"
    meta = yaml.safe_load(match.group(1))
    pins = re.findall(r"^gradio==(\S+)\s*$", (ROOT / "requirements.txt").read_text(), re.M)
    assert len(pins) == 1, "requirements.txt must pin gradio exactly once"
    assert meta["sdk"] == "gradio" and str(meta.get("sdk_version")) == pins[0]
    assert str(meta.get("python_version")) == "3.11"
