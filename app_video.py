"""The page's video tab (UI only): a camera that watches (issue 18).

A clip, an example of the bundled world (every frame's ground truth known) or an upload, is
played through the edge agent (POST /v1/watch, edge_agent/client.py's `watch_stream`) with the
chosen method, k, bandwidth and RTT: the bytes of every frame drawn as they arrive, each
standing question's answer on every frame beside its ground truth, the events (answers that
changed) as they arrive, then a summary. The webcam (Gradio's streaming image) sends each
streamed frame to a live stream of the agent (POST /v1/watch/sessions…): opened on the first
frame, closed when the streaming stops (or by the agent when idle). The settings' defaults and
ranges are WatchSettings' (edge_agent/watch.py). app.py lays the tab out with `video_tab`.
"""
from __future__ import annotations

import functools
import io
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from edge_agent.client import EdgeAgentError
from edge_agent.watch import WatchSettings
from progvlm.toyworld.clips import example_clip, load_example_clips, truths

CLIPS = load_example_clips()
FIELDS = WatchSettings.model_json_schema()["properties"]  # the stream's defaults and ranges
LINK_STAGES = ("uplink", "downlink")  # paced on the emulated link, labelled so
AGENT = {"client": None}  # the edge agent's client (set by video_tab)
CLIP_DIR = Path(tempfile.gettempdir()) / "progvlm-clips"  # the example clips' rendered mp4s
UPDATE_EVERY_S = 0.25  # the page redraws at most this often while a clip plays
EVENTS_SHOWN = 40  # the latest events listed (all of them are in the summary)
# a click on the webcam's own Record/Stop button, told to the server (Gradio's streaming image
# has no start/stop events of its own)
WEBCAM_BUTTONS_JS = """
document.addEventListener('click', (e) => {
  const b = e.target.closest('#video-webcam button');
  if (!b) return;
  const t = b.innerText.trim();
  if (t === 'Stop') trigger('stop_recording');
  else if (t === 'Record') trigger('start_recording');
}, true);
"""


def _entry(name: str) -> dict:
    return next(e for e in CLIPS if e["name"] == name)


@functools.lru_cache(maxsize=len(CLIPS))
def clip_file(name: str) -> str:
    """The example clip as an H.264 mp4 a browser plays (and the agent reads), rendered once."""
    from progvlm.video.h264 import write_mp4
    e = _entry(name)
    path = CLIP_DIR / f"clip-{e['kind']}-{e['seed']}-{e['frames']}-{e['fps']}.mp4"
    if not path.exists():
        CLIP_DIR.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=CLIP_DIR)
        os.close(fd)
        write_mp4(example_clip(name).frames(), tmp, e["fps"])
        os.replace(tmp, path)  # whole or absent, whoever else renders it at the same time
    return str(path)


def pick_clip(name: str | None):
    """An example clip picked: its video, its standing questions, and its name (ground truth)."""
    if not name:
        return gr.update(), gr.update(), None, ""
    e = _entry(name)
    return (clip_file(name), "\n".join(e["questions"]), name,
            f"_{e['text']}_ {e['frames']} frames at {e['fps']} fps; ground truth known on every frame.")


def uploaded():
    """A user's own video: no example picked, no ground truth."""
    return gr.update(value=None), None, "_Your video: no ground truth, the answers alone._"


def parse_questions(text: str | None) -> list[str]:
    questions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not questions:
        raise gr.Error("Type at least one standing question (one per line).")
    return questions


def stream_fields(method, k, bandwidth_mbps, rtt_ms) -> dict:
    """The page's settings as WatchSettings' fields (their ranges are the agent's to check)."""
    try:
        return dict(method=method, k=int(k), bandwidth_mbps=float(bandwidth_mbps), rtt_ms=float(rtt_ms))
    except (TypeError, ValueError):
        raise gr.Error(f"k, the bandwidth and the RTT must be numbers, got {k!r}, {bandwidth_mbps!r} "
                       f"and {rtt_ms!r}.") from None


def _mark(answer, truth) -> str:
    return "" if truth is None else ("✓" if answer == truth else "✗")


class Playback:
    """What the page shows of one stream, frame record by frame record: the bytes per frame,
    each question's current answer (an answer holds until an event changes it) with the ground
    truth beside it, and the events."""

    def __init__(self, questions: list[str], method: str, fps: float, truth: dict | None = None):
        self.questions, self.method, self.fps, self.truth = questions, method, fps, truth
        self.current = dict.fromkeys(questions)
        self.rows, self.points, self.events, self.layers = [], [], [], []
        self.matched = self.compared = 0

    def add(self, record: dict):
        i = record["index"]
        if record.get("resync"):
            self.events.append(f"- frame {i}: sent again as a key frame ({record['resync']})")
        for e in record["events"]:
            self.current[e["question"]] = e["answer"]
            before = "" if e.get("previous") is None else f"{e['previous']} → "
            self.events.append(f"- frame {i} · {i / self.fps:.2f} s · _{e['question']}_ "
                               f"{before}**{e['answer']}**")
        row = {"frame": i, "t (s)": round(i / self.fps, 2), "kind": record["kind"], "bytes": record["bytes"]}
        for q in self.questions:
            row[q] = self.current.get(q)
            if self.truth is not None:
                t = self.truth[q][i] if i < len(self.truth[q]) else None
                row[f"{q} · truth"], row[f"{q} · match"] = t, _mark(row[q], t)
                self.compared += t is not None
                self.matched += t is not None and row[q] == t
        self.rows.append(row)
        if record.get("layers") is not None:  # layers the cloud answered from (layer methods)
            self.layers.append(record["layers"])
        self.points.append({"frame": i, "bytes": record["bytes"], "method": self.method,
                            "kind": record["kind"]})

    def chart(self) -> pd.DataFrame:
        return pd.DataFrame(self.points, columns=["frame", "bytes", "method", "kind"])

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def event_list(self) -> str:
        if not self.events:
            return "_no events yet_"
        shown = self.events[-EVENTS_SHOWN:]
        more = len(self.events) - len(shown)
        return (f"_{more} earlier events above these_\n\n" if more else "") + "\n".join(shown)

    def ground_truth(self) -> str:
        if not self.compared:
            return ""
        return (f"ground truth: **{self.matched} of {self.compared}** answers match "
                f"({100 * self.matched / self.compared:.0f}%)")


def summary_line(summary: dict, bandwidth: float, rtt: float, view: Playback) -> str:
    """The agent's summary in words: bytes per frame, sustained frame rate, stage means."""
    method = summary.get("method", "")
    kinds = ", ".join(f"{kind} {b:g} × {summary['frames_by_kind'][kind]}"
                      for kind, b in summary.get("bytes_per_frame_by_kind", {}).items())
    stages = " · ".join(f"{name} {ms:g}" + (" (emulated link)" if name in LINK_STAGES else "")
                        for name, ms in summary.get("stage_ms_mean", {}).items())
    layers = f" · {sum(view.layers) / len(view.layers):.2f} layers per frame" if view.layers else ""
    lines = [f"**{summary['frames']} frames** · {method}{layers}"
             + f" · **{summary.get('bytes_per_frame', 0):g} bytes per frame** ({kinds}) · sustained "
             f"**{summary.get('sustained_fps')} frames/s** on this host · {len(summary['events'])} events"
             + (f" · {summary['resyncs']} resyncs" if summary.get("resyncs") else ""),
             f"emulated link: {bandwidth:g} Mbps, RTT {rtt:g} ms",
             f"stage means (ms): {stages}"]
    truth = view.ground_truth()
    return "  \n".join(lines + ([truth] if truth else []))


def play(video, clip_name, questions_text, method, k, bandwidth_mbps, rtt_ms, progress=gr.Progress()):
    """Play the clip through the edge agent. Yields the page (status, bytes chart, answers
    table, events) as frames are answered, at most every UPDATE_EVERY_S, then the summary."""
    if not video:
        raise gr.Error("Pick an example clip or upload a video first.")
    questions = parse_questions(questions_text)
    fields = stream_fields(method, k, bandwidth_mbps, rtt_ms)
    truth = None
    if clip_name:
        fields["fps"] = _entry(clip_name)["fps"]
        clip = example_clip(clip_name)
        truth = {q: truths(clip, q) for q in questions}
    view = Playback(questions, method, fields.get("fps", FIELDS["fps"]["default"]), truth)

    def page(status: str):
        return status, view.chart(), view.table(), view.event_list()
    progress(0, desc="sending the clip to the edge agent")
    frames, shown = None, 0.0
    try:
        for item in AGENT["client"].watch_stream(video, questions, **fields):
            if item["type"] == "video":
                frames, view.fps = item["frames"], item["fps"] or view.fps
                yield page(f"playing {frames} frames ({item['size'][0]}×{item['size'][1]}) …")
            elif item["type"] == "frame":
                view.add(item["record"])
                done = len(view.rows)
                progress(done / (frames or done), desc=f"frame {done} of {frames}")
                if time.monotonic() - shown >= UPDATE_EVERY_S:
                    shown = time.monotonic()
                    yield page(f"frame {done} of {frames} …")
            elif item["type"] == "summary":
                yield page(summary_line(item, fields["bandwidth_mbps"], fields["rtt_ms"], view))
                return
    except EdgeAgentError as e:
        raise gr.Error(f"The edge agent could not play this video: {e}") from None
    raise gr.Error("The edge agent's stream ended before its summary.")


# ---- the webcam: a live stream ------------------------------------------------------------------
def _frame_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)  # the camera's frame, as a camera sends it
    return buf.getvalue()


def live_frame(image, live, questions_text, method, k, bandwidth_mbps, rtt_ms):
    """One streamed webcam frame → the agent's live stream (opened on the first frame, reopened
    once if the agent closed it). `live`: {"session", "frames", "events"}."""
    if image is None:
        return live, gr.update(), gr.update()
    client = AGENT["client"]
    live = dict(live or {"session": None, "frames": 0, "events": []})
    data = _frame_bytes(image)
    try:
        for attempt in range(2):
            if live["session"] is None:
                fields = stream_fields(method, k, bandwidth_mbps, rtt_ms)
                live.update(session=client.watch_open(parse_questions(questions_text), **fields),
                            frames=0, events=[])
            try:
                record = client.watch_frame(live["session"], data)
                break
            except EdgeAgentError as e:
                if e.status != 404 or attempt:
                    raise
                live["session"] = None  # closed or idle too long: a new stream
    except (EdgeAgentError, gr.Error) as e:  # (gr.Error: no question, a setting not a number)
        reason = e.message if isinstance(e, gr.Error) else str(e)
        gr.Warning(f"The webcam's stream could not go on: {reason}")
        return {**live, "session": None}, f"⚠ {reason}", gr.update()
    live["frames"] += 1
    live["events"] = (live["events"] + [f"- frame {record['index']} · _{e['question']}_ "
                                        f"**{e['answer']}**" for e in record["events"]])[-EVENTS_SHOWN:]
    status = (f"streaming: frame {record['index']} · {record['kind']} · {record['bytes']} bytes · "
              f"{record['total_ms']:.0f} ms")
    return live, status, "\n".join(live["events"]) or "_no events yet_"


def close_live(live):
    """The webcam stopped: close its stream at the agent."""
    if live and live.get("session"):
        try:
            AGENT["client"].watch_close(live["session"])
        except EdgeAgentError:
            pass  # the agent closes an idle stream itself
        return {**live, "session": None}, f"stream closed after {live['frames']} frames"
    return live, gr.update()


def video_tab(client, info: dict, bandwidths) -> None:
    """The video tab's components and events (inside the page's gr.Blocks and a gr.Tab).
    `client`: the agent's EdgeAgentClient; `info`: its /v1/info (L); `bandwidths`: the page's presets."""
    AGENT["client"] = client
    with gr.Row():
        with gr.Column(scale=2):
            clip = gr.Dropdown([e["name"] for e in CLIPS], value=None, elem_id="video-clip",
                               label="Example clip (ground truth known)")
            about = gr.Markdown(elem_id="video-about")
            video = gr.Video(label="Clip (an example above, or upload a GIF / MP4 / WebM)",
                             elem_id="video-file", sources=["upload"], height=320)
            questions = gr.Textbox(label="Standing questions (one per line)", lines=3,
                                   elem_id="video-questions", placeholder="how many objects are there ?")
        with gr.Column(scale=1):
            method = gr.Radio(FIELDS["method"]["enum"], value=FIELDS["method"]["default"], label="Method",
                              info=FIELDS["method"]["description"])
            k = gr.Slider(FIELDS["k"]["minimum"], info["num_layers"], value=FIELDS["k"]["default"], step=1,
                          label="Layers per frame k", info=FIELDS["k"]["description"])
            bandwidth = gr.Dropdown(bandwidths, value=FIELDS["bandwidth_mbps"]["default"],
                                    allow_custom_value=True, label="Uplink bandwidth (Mbps)",
                                    info=FIELDS["bandwidth_mbps"]["description"])
            rtt = gr.Number(value=FIELDS["rtt_ms"]["default"], label="RTT (ms)",
                            info=FIELDS["rtt_ms"]["description"])
            play_button = gr.Button("Play", variant="primary", elem_id="video-play")
    status = gr.Markdown(elem_id="video-summary")
    chart = gr.LinePlot(x="frame", y="bytes", color="method", tooltip=["frame", "bytes", "kind"],
                        title="Bytes per frame", y_title="bytes", label="Bytes per frame",
                        elem_id="video-bytes")
    with gr.Row():
        answers = gr.Dataframe(headers=["frame", "t (s)", "kind", "bytes"], interactive=False,
                               label="Each standing question's answer on every frame (and the ground truth)",
                               elem_id="video-answers", scale=3, max_height=420)
        events = gr.Markdown("_no events yet_", label="Events", elem_id="video-events", container=True,
                             max_height=420)
    with gr.Group():
        gr.Markdown("### Live: your webcam\nPress **Record**: each streamed frame goes to a live "
                    "stream of the edge agent with the standing questions and settings above; "
                    "**Stop** closes it.")
        with gr.Row():
            webcam = gr.Image(sources=["webcam"], streaming=True, type="pil", label="Webcam",
                              elem_id="video-webcam", webcam_options=gr.WebcamOptions(constraints={
                                  "video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}))
            with gr.Column():
                live_status = gr.Markdown("_not streaming_", elem_id="webcam-status")
                live_events = gr.Markdown("_no events yet_", elem_id="webcam-events")
    buttons = gr.HTML("", js_on_load=WEBCAM_BUTTONS_JS, elem_id="webcam-buttons")
    live = gr.State(None, delete_callback=lambda live: close_live(live))  # the page closed: close it
    clip_name = gr.State(None)

    clip.change(pick_clip, clip, [video, questions, clip_name, about], api_name="pick_clip")
    video.upload(uploaded, None, [clip, clip_name, about], api_name=False)
    settings = [questions, method, k, bandwidth, rtt]
    play_button.click(play, [video, clip_name, *settings], [status, chart, answers, events], api_name="watch")
    webcam.stream(live_frame, [webcam, live, *settings], [live, live_status, live_events],
                  stream_every=0.5, api_name="watch_webcam_frame")
    buttons.start_recording(lambda: ("_starting …_", "_no events yet_"), None, [live_status, live_events],
                            api_name=False)
    buttons.stop_recording(close_live, live, [live, live_status], api_name="watch_webcam_stop")
