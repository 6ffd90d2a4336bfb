"""progvlm demo (UI only): one question about one camera frame, answered in every mode side by side.

`python app.py` starts the cloud backend and the edge agent as child processes on loopback and
talks to the agent over real HTTP (the agent talks to the cloud through the shaped link);
`--edge-url` uses a running agent instead. Model, link and service code live in progvlm/ and
edge_agent/.
"""
from __future__ import annotations

import argparse
import signal
import sys

import gradio as gr

from edge_agent.client import EdgeAgentClient, EdgeAgentError
from progvlm.examples import ground_truth, load_examples
from progvlm.images import ImageInputError
from progvlm.metrics import SemanticConsistency
from progvlm.questions import unknown_words

EXAMPLES = load_examples()
MODES = ["full-cloud", "full-edge", "progressive", "auto"]
BANDWIDTHS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 50, 100]
NUM_LAYERS = 4
EDGE = {"client": None}  # set by connect(): the agent this page talks to
consistency = SemanticConsistency()


def connect(edge_url: str):
    EDGE["client"] = EdgeAgentClient(edge_url)


def _row(record: dict, truth: str | None, reference: str | None) -> list:
    name = record["mode"] + (f" k={record['k']}" if "k" in record else "")
    if record.get("partial"):
        name += f" (cut: {record['layers_used']} layers)"
    correct = "n/a" if truth is None else ("✓" if record["answer"] == truth else "✗")
    cons = "" if reference is None else f"{consistency(record['answer'], reference):.3f}"
    projected = " (projected)" if record["projected_stages"] else ""
    return [name, record["answer"], correct, cons, record["payload_bytes"],
            f"{record['total_ms']:.1f}{projected}"]


def compare(image, question: str, bandwidth_mbps: float, rtt_ms: float, k: int, modes: list[str],
            budget_ms: float):
    """Every chosen mode for one image and question. Yields the table as answers arrive (the
    progressive row refines layer by layer), then the compression ladder."""
    if image is None:
        raise gr.Error("Pick an example scene or upload an image first.")
    if not question or not question.strip():
        raise gr.Error("Type a question, or click one of the example questions.")
    if not modes:
        raise gr.Error("Choose at least one mode to compare.")
    client = EDGE["client"]
    options = dict(bandwidth_mbps=float(bandwidth_mbps), rtt_ms=float(rtt_ms))
    notes = []
    if unknown_words(question):
        notes.append(f"Words the bundled model has never seen: {', '.join(unknown_words(question))}.")
    try:
        truth = ground_truth(image, question, EXAMPLES)
        # the answer from uncompressed visual tokens: the reference for semantic consistency
        reference = client.ask(image, question, mode="full-edge")["answer"]
        rows, records = [], {}
        for mode in modes:
            extra = {"k": int(k)} if mode == "progressive" else {"budget_ms": float(budget_ms)} if mode == "auto" else {}
            for item in client.ask_stream(image, question, mode=mode, **options, **extra):
                if item["type"] == "refinement":
                    live = [f"{mode} ({item['layers']} layers so far)", item["answer"], "", "", "", ""]
                    yield rows + [live], [], "\n".join(notes)
                else:
                    records[mode] = item["record"]
                    rows.append(_row(item["record"], truth, reference))
                    yield rows, [], "\n".join(notes)
        ladder = []
        for j in range(1, NUM_LAYERS + 1):
            r = client.ask(image, question, mode="progressive", k=j, **options)
            ladder.append([j, r["payload_bytes"], r["answer"], f"{consistency(r['answer'], reference):.3f}"])
    except (EdgeAgentError, ImageInputError) as e:
        raise gr.Error(str(e)) from None
    if "auto" in records:
        a = records["auto"]["auto"]
        notes.append(f"auto chose k={a['chosen_k']}: predicted {a['predicted_chosen_ms']:.0f} ms, "
                     f"actual {a['actual_ms']:.0f} ms (budget {a['budget_ms']:.0f} ms).")
    yield rows, ladder, "\n".join(notes)


with gr.Blocks(title="progvlm") as demo:
    gr.Markdown("# progvlm: progressive semantic communication for edge–cloud VLMs\n"
                "A camera device asks a vision–language model about a frame. Compare sending the "
                "JPEG (full-cloud), running everything on the device (full-edge), and sending "
                "k progressive MAE layers of the visual tokens (progressive, auto). Times are "
                "measured on this host through a shaped link; the imx95-emulated profile's are "
                "projected and marked so.")
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Camera frame")
            question = gr.Textbox(label="Question", value="describe the scene .")
            with gr.Row():
                bandwidth = gr.Dropdown(BANDWIDTHS, value=1, label="Uplink bandwidth (Mbps)")
                rtt = gr.Number(value=20, minimum=0, maximum=2000, label="RTT (ms)")
            k = gr.Slider(1, NUM_LAYERS, value=2, step=1, label="Progressive layers k")
            modes = gr.CheckboxGroup(MODES, value=MODES, label="Modes to compare")
            budget = gr.Number(value=300, minimum=1, label="auto: latency budget (ms)")
            run = gr.Button("Run", variant="primary")
        with gr.Column():
            table = gr.Dataframe(headers=["mode", "answer", "correct", "consistency",
                                          "payload bytes", "end-to-end ms"],
                                 label="Side by side", interactive=False)
            ladder = gr.Dataframe(headers=["k", "bytes", "answer", "consistency"],
                                  label="Compression ladder", interactive=False)
            notes = gr.Markdown()
    gr.Examples(examples=[[ex["path"], q["question"]] for ex in EXAMPLES for q in ex["questions"][:2]],
                inputs=[image, question], label="Example scenes and questions")
    inputs = [image, question, bandwidth, rtt, k, modes, budget]
    run.click(compare, inputs, [table, ladder, notes], api_name="compare")


def main():
    parser = argparse.ArgumentParser(description="progvlm demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--edge-url", default=None,
                        help="a running edge agent (default: start a cloud backend and an edge agent here)")
    args = parser.parse_args()
    if args.edge_url:
        connect(args.edge_url)
    else:
        from progvlm.services import cloud_service, edge_service
        print("starting the cloud backend and the edge agent on loopback …", file=sys.stderr)
        cloud = cloud_service().start()
        edge = edge_service(cloud.url).start()
        connect(edge.url)
        print(f"cloud backend {cloud.url}, edge agent {edge.url}", file=sys.stderr)
    # SIGTERM ends the app like Ctrl-C does, so the children are stopped on the way out (atexit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
