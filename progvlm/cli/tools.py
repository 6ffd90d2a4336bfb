"""ask, make-examples and make-random-vlm: one answer, the example scenes, a stand-in VLM."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import add_vlm_options, emit, fail, load_backend


def add_ask(sub):
    p = sub.add_parser("ask", help="answer one question about one image with the whole VLM",
                       description="Run the whole VLM on one image and one question.")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--question", required=True)
    add_vlm_options(p, mae=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_ask)


def add_make_examples(sub):
    p = sub.add_parser("make-examples", help="regenerate the example scenes in assets/examples")
    p.add_argument("--count", type=int, default=6)
    p.set_defaults(run=cmd_make_examples)


def add_make_random_vlm(sub):
    from ..backends.random_hf import NOTE, PRESETS
    p = sub.add_parser("make-random-vlm", help="write a random-weight transformers VLM folder "
                       "(a stand-in for a Hub checkpoint, offline)",
                       description="Write a transformers VLM folder with random weights that "
                       "loads like a downloaded checkpoint (--vlm FOLDER); " + NOTE + ". Presets: "
                       + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ".")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="same preset + seed = same weights")
    p.set_defaults(run=cmd_make_random_vlm)


def cmd_ask(a) -> int:
    from ..images import ImageInputError, load_image
    try:
        image = load_image(a.image)
    except ImageInputError as e:
        return fail(e)
    backend = load_backend(a.vlm)
    ans = backend.answer(image, a.question)
    note = backend.domain_note(image)
    result = {"question": a.question, "answer": ans.text, "model": backend.model_id}
    if note:  # e.g. a photograph given to the bundled model, which knows generated scenes only
        result["domain_note"] = note
        print(f"note: {note}", file=sys.stderr)
    emit(result, a.json, [] if a.json else [ans.text])
    return 0


def cmd_make_examples(a) -> int:
    from ..toyworld.examples import write_examples
    for item in write_examples(count=a.count):
        print(f"{item['file']}: {item['description']}")
    return 0


def cmd_make_random_vlm(a) -> int:
    from ..backends.random_hf import NOTE, NOTE_FILE, write_random_vlm
    out = write_random_vlm(a.out, a.preset, seed=a.seed)
    note = json.loads((out / NOTE_FILE).read_text())
    print(f"{out}: {a.preset}, N x D = {note['visual_tokens']} x {note['token_dim']} visual "
          f"tokens, {note['parameters']:,} parameters ({NOTE})")
    print(f"use it with --vlm {out}")
    return 0
