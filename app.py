"""progvlm demo (UI only): one question about one camera frame, answered in every mode side by side.

`python app.py` starts the cloud backend and the edge agent as child processes on loopback and
talks to the agent over real HTTP (the agent talks to the cloud through the shaped link);
`--edge-url` uses a running agent instead. Model, link and service code live in progvlm/ and
edge_agent/; this file lays out the page and formats what the agent returns. The page is built
for the agent it talks to (`connect` → `build_page`): a card and a choice per mode it runs, k up
to its L and its device profiles, all from its GET /v1/info; the link's and the budget's
defaults and ranges are the request model's (edge_agent/request.py). The Video tab (a clip or
the webcam through the agent, standing questions answered per frame) is app_video.py's.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys

import gradio as gr
import pandas as pd

from app_video import video_tab
from edge_agent.client import EdgeAgentClient, EdgeAgentError
from edge_agent.request import AskRequest
from progvlm.eval.metrics import SemanticConsistency
from progvlm.images import ImageInputError, load_image
from progvlm.toyworld.examples import find_example, ground_truth, load_examples
from progvlm.toyworld.questions import unknown_words

EXAMPLES = load_examples()
BANDWIDTHS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 50, 100]  # Mbps, log-spaced presets
GENERIC_QUESTIONS = ["describe the scene .", "how many objects are there ?"]
FIELDS = AskRequest.model_json_schema()["properties"]  # the request's defaults and ranges
# set by connect(): the agent this page talks to, what it runs (its /v1/info), the VLM/MAE specs
EDGE = {"client": None, "info": {}, "vlm": None, "mae": None}
demo = image = None  # the page and its image input, built by connect() for that agent
consistency = SemanticConsistency()


def connect(edge_url: str, vlm: str | None = None, mae: str | None = None, token: str | None = None):
    """Talk to the agent at `edge_url` and build the page for what it runs (`build_page`).
    `token`: the agent's access token (default: $PROGVLM_AGENT_TOKEN, if set). Loads what
    the page itself uses (the sentence-embedding model, the layer map's models) now, so the
    first Run does not wait for them."""
    global demo, image
    token = token or os.environ.get("PROGVLM_AGENT_TOKEN") or None
    EDGE.update(client=EdgeAgentClient(edge_url, token), vlm=vlm, mae=mae)
    EDGE["info"] = EDGE["client"].info()
    demo, image = build_page(EDGE["info"])
    consistency("a red circle", "a blue square")
    _layer_split()


def model_banner(info: dict) -> str:
    """Which VLM and MAE the page is running: the edge agent's own word for it."""
    if not info:
        return ""
    return (f"**VLM** `{info.get('vlm_id')}` · {info.get('tokens_per_block')} × "
            f"{info.get('token_dim')} visual tokens per image/tile · **MAE** "
            f"`{info.get('mae_fingerprint')}`, L = {info.get('num_layers')} · runtime "
            f"{info.get('runtime')}")


@functools.lru_cache(maxsize=1)
def _layer_split():
    """The same VLM and MAE as the agent, loaded here only to draw the layer picture."""
    from progvlm.split import load_split
    return load_split(EDGE["vlm"], EDGE["mae"])


# ---- formatting what the agent returns ------------------------------------------------------
def _title(record: dict) -> str:
    mode = record["mode"]
    if "k" in record:
        mode += f" · k={record['k']}"
    return mode


def card(record: dict | None, truth: str | None, reference: str | None, mode: str,
         live: dict | None = None) -> str:
    if live is not None:
        return (f"### {mode}\n**{live['answer']}**\n\n_refining: {live['layers']} of "
                f"{live.get('k', '?')} layers received_")
    if record is None:
        return f"### {mode}\n_not run_"
    lines = [f"### {_title(record)}", f"**{record['answer']}**", ""]
    if truth is not None:
        lines.append(f"ground truth: {truth} → {'✓ correct' if record['answer'] == truth else '✗ wrong'}  ")
    if reference is not None:
        lines.append(f"consistency: {consistency(record['answer'], reference):.3f}  ")
    lines.append(f"payload: **{record['payload_bytes']} bytes**  ")
    projected = " (projected)" if record["projected_stages"] else ""
    lines.append(f"end to end: **{record['total_ms']:.1f} ms**{projected}")
    if record.get("partial"):
        lines.append(f"\n⚠ {record.get('note', 'partial answer')}")
    if "auto" in record:
        a = record["auto"]
        lines.append(f"\nauto: predicted {a['predicted_chosen_ms']:.0f} ms, actual "
                     f"{a['actual_ms']:.0f} ms, budget {a['budget_ms']:.0f} ms"
                     + ("" if a["fits_budget"] else " (no k fits; sent k=1)"))
    return "\n".join(lines)


# The record's stages, grouped for the chart (a stacked bar stays readable with few colours)
STAGE_GROUPS = {"file_decode": "host: image file decode", "connect": "connect",
                "cloud_queue": "cloud: queue", "edge_preprocess": "edge: preprocess + vision", "edge_vision": "edge: preprocess + vision",
                "edge_language": "edge: language model", "mae_encode": "edge: encode (MAE / JPEG)",
                "serialize": "edge: encode (MAE / JPEG)", "uplink": "uplink",
                "cloud_image_decode": "cloud: decode + vision", "cloud_vision": "cloud: decode + vision",
                "cloud_mae_decode": "cloud: decode + vision", "cloud_prefill": "cloud: language model",
                "cloud_generation": "cloud: language model", "cloud_language": "cloud: language model",
                "cloud_earlier_layers": "cloud: earlier layers' answers", "downlink": "downlink",
                "overhead": "protocol overhead"}


def breakdown(records: dict) -> pd.DataFrame:
    rows = []
    for r in records.values():
        for stage, ms in r["stage_ms"].items():
            group = STAGE_GROUPS.get(stage, stage)
            if stage in r["projected_stages"]:
                group += " (projected)"
            rows.append({"mode": _title(r), "stage": group, "ms": ms})
    # every group appears for every mode (0 where absent): the chart fixes its colours from
    # the first data it is given, and the first update holds one mode only
    for r in records.values():
        for group in dict.fromkeys(STAGE_GROUPS.values()):
            rows.append({"mode": _title(r), "stage": group, "ms": 0.0})
    frame = pd.DataFrame(rows, columns=["mode", "stage", "ms"])
    return frame.groupby(["mode", "stage"], as_index=False, sort=False)["ms"].sum()


def suggested(image):
    """The picked example's own questions (with ground truth), or generic ones for an upload."""
    choices = GENERIC_QUESTIONS
    if image is not None:
        try:
            example = find_example(image, EXAMPLES)
        except ImageInputError:  # a bad upload: compare() will say so
            example = None
        if example:
            choices = [q["question"] for q in example["questions"]]
    return gr.update(choices=choices, value=None)


# ---- the comparison -----------------------------------------------------------------------
def compare(image, question: str, bandwidth_mbps: float, rtt_ms: float, k: int, modes: list[str],
            budget_ms: float, device: str | None = None, progress=gr.Progress()):
    """Every chosen mode for one image and question, over the edge agent. Yields the page as
    answers arrive (the progressive card refines layer by layer), then the ladder and map."""
    if image is None:
        raise gr.Error("Pick an example scene or upload an image first.")
    if not question or not question.strip():
        raise gr.Error("Type a question, or pick one of the suggested questions.")
    if not modes:
        raise gr.Error("Choose at least one mode to compare.")
    try:  # the reason for a bad upload, before any request (the agent would refuse it too)
        load_image(image)
    except ImageInputError as e:
        raise gr.Error(f"Cannot use this image: {e}") from None
    client = EDGE["client"]
    options = dict(bandwidth_mbps=float(bandwidth_mbps), rtt_ms=float(rtt_ms), device_profile=device)
    notes = []
    bundled = str(EDGE["info"].get("vlm_id", "progvlm-tiny")).startswith("progvlm-tiny")
    if bundled and unknown_words(question):
        notes.append(f"Words the bundled model has never seen: {', '.join(unknown_words(question))}. "
                     "It knows only its scene vocabulary (shapes, colours, sizes, counts, positions).")
    shown = EDGE["info"]["modes"]  # the page's cards, one per mode of the agent
    records, cards = {}, {m: card(None, None, None, m) for m in shown}

    def page(ladder=None, picture=None):  # the outputs, in the order run.click lists them
        return (*[cards[m] for m in shown], breakdown(records), ladder or [], picture,
                "\n\n".join(notes), list(records.values()))
    try:
        truth = ground_truth(image, question, EXAMPLES)
        progress(0.05, desc="asking the edge agent (every mode, one request)")
        reference, ladder, done = None, [], 0
        extra = {"progressive": {"k": int(k)}}  # (the page's k is progressive's)
        # one request: the agent sees, encodes and sends the frame once for every mode, and the
        # ladder comes from one progressive stream answered after each layer
        for event in client.compare_stream(image, question, modes, k=int(k), budget_ms=float(budget_ms),
                                           **options):
            if event["type"] == "reference":  # uncompressed tokens: the consistency reference
                reference = event["answer"]
            elif event["type"] == "refinement":
                mode = event["mode"]
                cards[mode] = card(None, None, None, mode, event | extra.get(mode, {}))
            elif event["type"] == "result":
                mode, record = event["mode"], event["record"]
                records[mode] = record
                cards[mode] = card(record, truth, reference, mode)
                note = record.get("domain_note")
                if note and f"⚠ {note}" not in notes:
                    notes.append(f"⚠ {note}")
                done += 1
                progress(0.1 + 0.7 * done / len(modes), desc=f"{mode} answered")
            elif event["type"] == "ladder":
                ladder = [[row["k"], row["payload_bytes"], row["answer"],
                           f"{consistency(row['answer'], reference):.3f}"] for row in event["rows"]]
            yield page(ladder)
        progress(0.95, desc="what each layer adds")
        from progvlm.eval.layer_map import layer_residuals, residual_strip
        residuals = layer_residuals(_layer_split(), image)
        picture = None if residuals is None else residual_strip(image, residuals)
    except (EdgeAgentError, ImageInputError) as e:  # the agent's (or Pillow's) reason, as said
        raise gr.Error(str(e)) from None
    yield page(ladder, picture)


# ---- a conversation about one frame ----------------------------------------------------------
def chat_turn(record: dict) -> str:
    """One answer in the chat, with what it cost: the bytes this turn sent, the layers the cloud
    used, the time, and why adaptive stopped."""
    a = record.get("adaptive", {})
    why = {"sure": "sure enough", "budget": "budget ran out: the best answer so far",
           "all layers": "every layer sent"}.get(a.get("stopped_because"), "")
    resumed = ("the cloud held this frame: no image bytes re-sent" if record.get("resumed")
               else "the frame's first layers sent")
    projected = " (projected)" if record["projected_stages"] else ""
    return (f"**{record['answer']}**  \n{record.get('bytes_sent_this_turn', record['payload_bytes'])} "
            f"bytes this turn · {record['layers_used']} layer(s) · {record['total_ms']:.0f} ms"
            f"{projected} · {resumed}" + (f" · {why}" if why else "")
            + (f"  \n⚠ {record['note']}" if record.get("note") else ""))


def converse(image, question: str, history: list | None, bandwidth_mbps: float, rtt_ms: float,
             budget_ms: float, device: str | None = None):
    """Ask about the picked frame again and again (adaptive mode, one conversation): the cloud
    keeps the layers it received, so a follow-up sends only its question, and more layers only
    when the answer is not sure enough."""
    if image is None:
        raise gr.Error("Pick an example scene or upload an image first.")
    if not question or not question.strip():
        raise gr.Error("Type a question about the picked image.")
    try:
        load_image(image)
        record = EDGE["client"].ask(image, question, mode="adaptive", conversation=True,
                                    new_conversation=not history,  # a fresh chat: a fresh frame
                                    bandwidth_mbps=float(bandwidth_mbps), rtt_ms=float(rtt_ms),
                                    budget_ms=float(budget_ms), device_profile=device)
    except (EdgeAgentError, ImageInputError) as e:
        raise gr.Error(str(e)) from None
    history = list(history or []) + [{"role": "user", "content": question},
                                     {"role": "assistant", "content": chat_turn(record)}]
    return history, "", record


def upload_as_is(preprocess):
    """Wrap gr.Image's preprocessing so that an upload reaches compare() as it is.

    gradio opens every upload with Pillow first, and a file Pillow cannot open (empty, not an
    image, a decompression bomb, a PNG whose text chunk inflates past Pillow's limit) failed
    there with gradio's generic error, before compare() could say why. With this such a file
    passes through as its path; compare() checks it with progvlm.images.load_image and shows
    the reason. (An instance attribute, not a gr.Image subclass: gradio writes a .pyi stub
    next to the module of every component class.)"""
    @functools.wraps(preprocess)
    def preprocess_or_pass(payload):
        try:
            return preprocess(payload)
        except Exception:  # noqa: BLE001 - compare() names the reason
            if payload is not None and payload.path:
                return str(payload.path)
            raise gr.Error("The uploaded image could not be received; upload it again.") from None
    return preprocess_or_pass


def build_page(info: dict) -> tuple[gr.Blocks, gr.Image]:
    """The page for the agent described by `info` (its GET /v1/info): a card and a choice per
    mode it runs, k up to its L, its device profiles; the link's and the budget's defaults and
    ranges are the request model's (edge_agent/request.py). Returns the page and its image input."""
    modes, L = info["modes"], info["num_layers"]
    with gr.Blocks(title="progvlm") as page:
        gr.Markdown(
            "# progvlm: progressive semantic communication for edge–cloud VLMs\n"
            "A camera device asks a vision–language model about a frame. Compare sending the JPEG "
            "(**full-cloud**), running everything on the device (**full-edge**), and sending k "
            "progressive MAE layers of the visual tokens (**progressive**, **auto**). Bytes really "
            "cross a link paced to your bandwidth and RTT; times are measured on this host, except "
            "the edge's under the *imx95-emulated* device, which are projected and marked so. The "
            "**Video** tab plays a clip or your webcam through the agent with standing questions.")
        banner = gr.Markdown(elem_id="model-banner")
        with gr.Tab("Still frame", elem_id="tab-still"):
            with gr.Row():
                with gr.Column(scale=2):
                    image = gr.Image(type="filepath", label="Camera frame (pick an example below or upload)")
                    image.preprocess = upload_as_is(image.preprocess)  # compare() says what is wrong
                    gr.Examples(examples=[[ex["path"]] for ex in EXAMPLES], inputs=[image],
                                label="Example scenes (ground truth known)")
                    question = gr.Textbox(label="Question", value="describe the scene .")
                    questions = gr.Radio(GENERIC_QUESTIONS, label="Suggested questions", value=None)
                with gr.Column(scale=1):
                    bandwidth = gr.Dropdown(BANDWIDTHS, value=FIELDS["bandwidth_mbps"]["default"],
                                            label="Uplink bandwidth (Mbps)")
                    rtt = gr.Number(value=FIELDS["rtt_ms"]["default"], minimum=FIELDS["rtt_ms"]["minimum"],
                                    maximum=FIELDS["rtt_ms"]["maximum"], label="RTT (ms)")
                    k = gr.Slider(1, L, value=L, step=1, label="Progressive layers k")  # default: all L
                    mode_choice = gr.CheckboxGroup(modes, value=modes, label="Modes to compare")
                    budget = gr.Number(value=FIELDS["budget_ms"]["default"],
                                       minimum=FIELDS["budget_ms"]["exclusiveMinimum"],
                                       label="auto: latency budget (ms)")
                    device = gr.Radio(info["device_profiles"], value=info["device_profile"], label="Device",
                                      info="imx95-emulated: the edge's times × an assumed Cortex-A55 "
                                           "factor (projected, marked so)")
                    run = gr.Button("Run", variant="primary")
            with gr.Row(equal_height=True):
                cards = [gr.Markdown(card(None, None, None, m), elem_id=f"card-{m}", container=True)
                         for m in modes]
            chart = gr.BarPlot(x="mode", y="ms", color="stage", title="Latency breakdown (stacked stages)",
                               y_title="ms", label="Latency breakdown")
            with gr.Row():
                ladder = gr.Dataframe(headers=["k", "bytes", "answer", "consistency"],
                                      label="Compression ladder (this image and question)", interactive=False)
                picture = gr.Image(label=f"What each layer leaves unreconstructed, k = 1 … {L} "
                                         "(bright: the next layer still has work there)", interactive=False,
                                   elem_id="layer-map")
            notes = gr.Markdown(elem_id="notes")
            with gr.Accordion("Raw records from the edge agent", open=False):
                raw = gr.JSON(label="records")
            with gr.Group():
                gr.Markdown("### A conversation about this frame (adaptive)\n"
                            "Ask follow-up questions: the cloud keeps the layers it has received, so a "
                            "follow-up sends no image bytes, and more layers only when the answer is not "
                            "sure enough. Uses the bandwidth, RTT, budget and device set above.")
                chat = gr.Chatbot(label="Conversation", elem_id="chat", height=320)
                with gr.Row():
                    follow_up = gr.Textbox(label="Ask about this frame", elem_id="chat-question", scale=4,
                                           placeholder="e.g. how many objects are there ?")
                    ask = gr.Button("Ask", elem_id="chat-ask", scale=1)
                last_turn = gr.JSON(visible=False)
        with gr.Tab("Video", elem_id="tab-video"):  # a camera that watches (app_video.py)
            video_tab(EDGE["client"], info, BANDWIDTHS)

        page.load(lambda: model_banner(EDGE["info"]), None, banner, api_name=False)
        image.change(suggested, image, questions, api_name=False)
        questions.change(lambda q: q or gr.update(), questions, question, api_name=False)
        inputs = [image, question, bandwidth, rtt, k, mode_choice, budget, device]
        run.click(compare, inputs, [*cards, chart, ladder, picture, notes, raw], api_name="compare")
        image.change(lambda: [], None, chat, api_name=False)  # a new frame, a new conversation
        chat_inputs = [image, follow_up, chat, bandwidth, rtt, budget, device]
        ask.click(converse, chat_inputs, [chat, follow_up, last_turn], api_name="converse")
        follow_up.submit(converse, chat_inputs, [chat, follow_up, last_turn], api_name=False)
    return page, image


def main():
    parser = argparse.ArgumentParser(description="progvlm demo")
    # defaults from gradio's own environment: a hosted Space sets GRADIO_SERVER_NAME=0.0.0.0
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve the page on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT", "7860"),
                        help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--edge-url", default=None,
                        help="a running edge agent, whose token is in $PROGVLM_AGENT_TOKEN (default: "
                             "start a cloud backend and an edge agent here)")
    parser.add_argument("--vlm", default=os.environ.get("PROGVLM_VLM"),
                        help="VLM: 'bundled', a model folder or a Hub id (default: $PROGVLM_VLM, else bundled)")
    parser.add_argument("--mae", default=os.environ.get("PROGVLM_MAE"),
                        help="MAE folder for that VLM (default: $PROGVLM_MAE, else the bundled MAE)")
    args = parser.parse_args()
    if args.edge_url:
        connect(args.edge_url, args.vlm, args.mae)
    else:
        from progvlm.serve.children import cloud_service, edge_service
        print("starting the cloud backend and the edge agent on loopback …", file=sys.stderr)
        # each child gets a fresh random token: nothing else on this host can use them
        cloud = cloud_service(vlm=args.vlm, mae=args.mae).start()
        edge = edge_service(cloud.url, cloud_token=cloud.token, vlm=args.vlm, mae=args.mae).start()
        connect(edge.url, args.vlm, args.mae, edge.token)
        print(f"cloud backend {cloud.url}, edge agent {edge.url}", file=sys.stderr)
    # SIGTERM ends the app like Ctrl-C does, so the children are stopped on the way out (atexit);
    # Ctrl-C is installed explicitly: a process started in the background by a shell inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        demo.launch(server_name=args.host, server_port=args.port)
    finally:
        # a signal that lands while launch() is still starting up leaves its server thread
        # running, which would keep the process (and, through atexit, its children) alive
        demo.close()


if __name__ == "__main__":
    main()
