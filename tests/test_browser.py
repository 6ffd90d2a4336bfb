"""A real browser on the demo: headless Chromium (Debian's) driven by Playwright picks an
example, runs the comparison, waits for every card, and checks the shown answers and bytes
against the named API's response for the same inputs. Saves a screenshot. On the video tab it
plays an example clip (the chart, the events, the ground truth) and streams Chromium's fake
camera (--use-fake-device-for-media-stream) to the agent.

Skipped where Chromium or Playwright is missing, unless PROGVLM_REQUIRE_BROWSER=1 (CI sets it).
"""
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from progvlm.serve.children import free_port

# starts the demo with its two services and a browser: ~50 s; CI runs it with `-m slow`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "tests" / "artifacts" / "demo.png"
MODES = ["full-cloud", "full-edge", "progressive", "auto"]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "no chromium (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


@pytest.fixture(scope="module")
def page_url():
    reason = _missing()
    if reason:
        if os.environ.get("PROGVLM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but {reason}")
        pytest.skip(reason)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("app.py did not serve its page: " + proc.stderr.read().decode()[-2000:])
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_browser_runs_an_example_and_sees_what_the_api_returns(page_url):
    from gradio_client import Client, handle_file
    from playwright.sync_api import sync_playwright

    from progvlm.toyworld.examples import load_examples
    example = load_examples()[2]
    question = example["questions"][0]["question"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(page_url)
        page.get_by_text("Example scenes").wait_for()
        # the page says which VLM and MAE it runs (id, fingerprint, N × D)
        page.locator("#model-banner").get_by_text("progvlm-tiny@").wait_for(timeout=30_000)
        banner = page.locator("#model-banner").inner_text()
        page.locator(".gallery-item, [data-testid='example'], table.gallery td").nth(2).click()
        page.get_by_label(question, exact=True).check(timeout=30_000)  # a suggested question
        page.get_by_role("button", name="Run").click()
        cards = {m: page.locator(f"#card-{m}") for m in MODES}
        for m in MODES:
            cards[m].get_by_text("payload:").wait_for(timeout=120_000)
        page.locator("#layer-map img").wait_for(timeout=120_000)  # the last output to arrive
        shown = {m: cards[m].inner_text() for m in MODES}
        # the conversation: a question, then a follow-up about the same frame
        chat = page.locator("#chat")
        follow_ups = [q["question"] for q in example["questions"][:2]]
        for turn, q in enumerate(follow_ups, start=1):
            page.locator("#chat-question textarea").fill(q)
            page.locator("#chat-ask").click()
            chat.get_by_text("bytes this turn").nth(turn - 1).wait_for(timeout=120_000)
        chat_text = chat.inner_text()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()

    # the same inputs through the named API: the page's own defaults (what the browser ran with)
    api = Client(page_url, verbose=False)
    defaults = {p["parameter_name"]: p["parameter_default"]
                for p in api.view_api(print_info=False, return_format="dict")["named_endpoints"]["/compare"]["parameters"]
                if p["parameter_has_default"]}
    result = api.predict(handle_file(example["path"]), question, defaults["bandwidth_mbps"],
                         defaults["rtt_ms"], defaults["k"], MODES, defaults["budget_ms"], defaults["device"],
                         api_name="/compare")
    records = result[-1]
    assert [r["mode"] for r in records] == MODES
    for record in records:
        text = shown[record["mode"]]
        assert record["answer"] in text, (record["mode"], text)
        if record["mode"] != "auto":  # auto's k follows the times it measured, run to run
            assert f"payload: {record['payload_bytes']} bytes" in text, (record["mode"], text)
    assert all(q in chat_text for q in follow_ups)
    assert "the cloud held this frame: no image bytes re-sent" in chat_text
    assert SCREENSHOT.stat().st_size > 10_000
    assert "64 × 128 visual tokens" in banner and "17f848a6" in banner


def _video_tab(browser, page_url):
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(page_url)
    page.get_by_role("tab", name="Video").click()
    return page


def test_the_video_tab_plays_an_example_clip_against_its_ground_truth(page_url):
    """The video tab: pick an example clip, Play, and wait for the summary: the chart draws one
    point per frame, the events arrived, and most answers match the clip's ground truth."""
    import re

    from playwright.sync_api import sync_playwright

    from progvlm.toyworld.clips import load_example_clips
    clip = next(e for e in load_example_clips() if e["kind"] == "events")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = _video_tab(browser, page_url)
        page.locator("#video-clip input").click()
        page.get_by_role("option", name=clip["name"]).click()
        page.wait_for_function("document.querySelector('#video-questions textarea').value.length > 0",
                               timeout=30_000)  # the clip's standing questions, prefilled
        assert page.locator("#video-questions textarea").input_value().splitlines() == clip["questions"]
        page.locator("#video-file video").wait_for(timeout=30_000)  # the clip, playable in the page
        page.locator("#video-play").click()
        summary = page.locator("#video-summary")
        summary.get_by_text("frames/s").wait_for(timeout=60_000)
        summary_text, events = summary.inner_text(), page.locator("#video-events").inner_text()
        points = page.locator("#video-bytes svg [aria-roledescription='point']").evaluate_all(
            "marks => marks.map(m => m.getAttribute('aria-label'))")
        table = page.locator("#video-answers").inner_text()
        page.screenshot(path=str(SCREENSHOT.with_name("video.png")), full_page=True)
        browser.close()
    frames = sorted(int(re.match(r"frame: (\d+);", label).group(1)) for label in points)
    assert frames == list(range(clip["frames"])), points[:5]  # one point per frame
    assert f"{clip['frames']} frames" in summary_text and "bytes per frame" in summary_text
    assert "(emulated link)" in summary_text and "emulated link: 1 Mbps, RTT 20 ms" in summary_text
    first = [line for line in events.splitlines() if line.startswith("frame 0 ")]
    assert len(first) == len(clip["questions"])  # every question's first answer, as an event
    assert any(not line.startswith("frame 0 ") for line in events.splitlines() if line)  # a change
    matched, compared = map(int, re.search(r"ground truth: (\d+) of (\d+)", summary_text).groups())
    assert compared == clip["frames"] * len(clip["questions"]) and matched >= 0.9 * compared
    assert f"{clip['questions'][0]} · truth" in table and "✓" in table


def test_the_video_tab_streams_the_webcam_to_the_agent(page_url):
    """The webcam, Chromium's fake camera: Record opens a live stream at the agent, a few frames
    get their records (the first answers appear as events), Stop closes the stream."""
    from playwright.sync_api import sync_playwright
    questions = ["how many objects are there ?", "what colour is the circle ?"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        page = _video_tab(browser, page_url)
        page.locator("#video-questions textarea").fill("\n".join(questions))
        webcam, status = page.locator("#video-webcam"), page.locator("#webcam-status")
        webcam.get_by_text("Click to Access Webcam").click()
        webcam.locator("button", has_text="Record").click(timeout=30_000)
        status.get_by_text("streaming: frame 3 ").wait_for(timeout=60_000)  # four frames answered
        events = page.locator("#webcam-events").inner_text()
        webcam.locator("button", has_text="Stop").click()
        status.get_by_text("stream closed after").wait_for(timeout=30_000)
        closed = status.inner_text()
        browser.close()
    first = [line for line in events.splitlines() if line.startswith("frame 0 ")]
    assert [q for q in questions if any(q in line for line in first)] == questions
    assert int(closed.split("after ")[1].split()[0]) >= 4
