"""progvlm demo (UI only): ask the bundled VLM about a scene, see what each layer buys.

This page answers one question about one image from the uncompressed visual tokens and from
every prefix of the MAE's layers (bytes and answer per k). The side-by-side comparison of
full-cloud, full-edge and progressive modes over a shaped link builds on it. All model code
lives in progvlm/.
"""
from __future__ import annotations

import argparse
import functools

import gradio as gr

from progvlm.backends.tiny import TinyVLMBackend
from progvlm.examples import load_examples
from progvlm.images import ImageInputError
from progvlm.models.mae import DEFAULT_MAE, load_mae
from progvlm.pipeline import compression_ladder
from progvlm.questions import unknown_words

EXAMPLES = load_examples()


@functools.lru_cache(maxsize=1)
def models():
    return TinyVLMBackend.load(), load_mae(DEFAULT_MAE)


def answer(image, question: str):
    """Image + question → (answer, ladder rows, notes). Errors reach the page as messages."""
    if image is None:
        raise gr.Error("Pick an example scene or upload an image first.")
    if not question or not question.strip():
        raise gr.Error("Type a question, or click one of the suggested questions.")
    try:
        result = compression_ladder(*models(), image, question)
    except ImageInputError as e:
        raise gr.Error(str(e)) from None
    rows = [[r["k"], r["bytes"], f"{100 * r['bytes'] / result['raw_fp16_bytes']:.2f}%",
             r["answer"], "✓" if r["answer"] == result["answer"] else "✗"]
            for r in result["ladder"]]
    notes = []
    unknown = unknown_words(question)
    if unknown:
        notes.append(f"Words the bundled model has never seen: {', '.join(unknown)}. It knows "
                     "only its scene vocabulary (shapes, colours, sizes, counts, positions).")
    return result["answer"], rows, "\n".join(notes)


with gr.Blocks(title="progvlm") as demo:
    gr.Markdown("# progvlm: ask a vision–language model about a scene\n"
                "The bundled default VLM (trained on generated scenes, runs on this CPU) "
                "answers questions about shapes, colours, sizes, counts and positions.")
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Camera frame")
            question = gr.Textbox(label="Question", value="describe the scene .")
            run = gr.Button("Ask", variant="primary")
        with gr.Column():
            out = gr.Textbox(label="Answer from uncompressed visual tokens")
            ladder = gr.Dataframe(headers=["k layers", "bytes sent", "of raw fp16 tokens",
                                           "answer from k layers", "same answer"],
                                  label="Compression ladder: the MAE's progressive layers",
                                  interactive=False)
            notes = gr.Markdown()
    gr.Examples(examples=[[ex["path"], q["question"]] for ex in EXAMPLES for q in ex["questions"][:2]],
                inputs=[image, question], label="Example scenes and questions")
    run.click(answer, [image, question], [out, ladder, notes], api_name="answer")
    question.submit(answer, [image, question], [out, ladder, notes], api_name=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="progvlm demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    demo.launch(server_name=args.host, server_port=args.port)
