"""`python -m progvlm <command>`: one entry for training, evaluation and tools.

Evaluation commands take --seed and --json; with --json the last line printed is one JSON object
with the figures. Progress bars go to stderr, so stdout stays clean for the results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch



def _add_train_vlm(sub):
    p = sub.add_parser("train-vlm", help="train the bundled default VLM on generated scenes (resumable)",
                       description="Train the bundled VLM on procedurally generated scenes. "
                       "Renders a training set once (cached in --workdir), then trains with a "
                       "progress bar; checkpoints to --workdir and resumes from there.")
    p.add_argument("--out", type=Path, default=Path("assets/tiny_vlm"),
                   help="folder for model.safetensors + config.json (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("runs/train-vlm"),
                   help="cache of rendered frames and the resumable checkpoint")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--scenes", type=int, default=30000, help="size of the pre-rendered set")
    p.add_argument("--batch", type=int, default=32, help="images per step (7 questions each)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--json", action="store_true", help="print the training summary as JSON last")


def _add_eval_vlm(sub):
    p = sub.add_parser("eval-vlm", help="exact-match accuracy on fresh scenes, per question type, and timing",
                       description="Exact-match accuracy against ground truth on freshly "
                       "generated scenes of the evaluation seed stream (never the training "
                       "scenes), overall and per question type, with uncompressed visual "
                       "tokens; plus the time of the edge half and the cloud half.")
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--weights", type=Path, default=None, help="model folder (default: bundled)")
    p.add_argument("--json", action="store_true")


def _add_ask(sub):
    p = sub.add_parser("ask", help="answer one question about one image with the whole VLM",
                       description="Run the whole VLM on one image and one question.")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--question", required=True)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--json", action="store_true")


def _add_make_examples(sub):
    p = sub.add_parser("make-examples", help="regenerate the example scenes in assets/examples")
    p.add_argument("--count", type=int, default=6)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m progvlm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="progvlm: progressive semantic communication for edge-cloud VLMs.",
        epilog="Run `python -m progvlm <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in (_add_train_vlm, _add_eval_vlm, _add_ask, _add_make_examples):
        add(sub)
    return parser


def _load_backend(weights: Path | None):
    from .backends.tiny import DEFAULT_WEIGHTS, TinyVLMBackend
    return TinyVLMBackend.load(weights or DEFAULT_WEIGHTS)


def _emit(result: dict, as_json: bool, lines: list[str]):
    for line in lines:
        print(line)
    if as_json:
        print(json.dumps(result))


def cmd_train_vlm(a) -> int:
    from .training.train_vlm import train_vlm
    summary = train_vlm(a.out, a.workdir, steps=a.steps, num_scenes=a.scenes, batch=a.batch,
                        lr=a.lr, seed=a.seed, eval_every=a.eval_every, resume=not a.no_resume,
                        log=lambda m: print(m, file=sys.stderr))
    t = summary["training"]
    _emit(summary, a.json, [f"trained {t['parameters']:,} parameters in {t['train_seconds']:.0f} s; "
                            f"weights in {a.out}"])
    return 0


def _time_halves(backend, repeats: int = 20) -> dict:
    """Median wall time of the edge half and the cloud half, one image at a time."""
    from .scenes import generate_scene, render_scene
    torch.set_num_threads(torch.get_num_threads())
    img = render_scene(generate_scene(7))
    q = "describe the scene ."
    edge, cloud = [], []
    tokens = backend.edge_half(img)
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = backend.edge_half(img)
        t1 = time.perf_counter()
        backend.cloud_half(tokens, q)
        t2 = time.perf_counter()
        edge.append(t1 - t0)
        cloud.append(t2 - t1)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1000
    return {"edge_half_ms": round(med(edge), 2), "cloud_half_ms": round(med(cloud), 2),
            "threads": torch.get_num_threads(), "note": "host CPU, measured, batch 1, "
            "'describe' question (longest answer)"}


def cmd_eval_vlm(a) -> int:
    from tqdm import tqdm
    from .evaluate import evaluate_backend
    if a.questions < 1:
        print("error: --questions must be at least 1", file=sys.stderr)
        return 2
    backend = _load_backend(a.weights)
    t0 = time.time()
    with tqdm(desc="eval-vlm", unit="scene", file=sys.stderr) as bar:
        rep = evaluate_backend(backend, a.seed, a.questions, progress=bar.update)
    rep.update(model=backend.model_id, seed=a.seed, seconds=round(time.time() - t0, 1),
               timing=_time_halves(backend))
    lines = [f"model {rep['model']}  seed {a.seed}  {rep['questions']} questions",
             f"overall accuracy  {rep['overall']:.4f}"]
    lines += [f"  {t:<9} {v:.4f}  (n={rep['per_type_count'][t]})" for t, v in rep["per_type"].items()]
    lines.append(f"edge half {rep['timing']['edge_half_ms']} ms, cloud half "
                 f"{rep['timing']['cloud_half_ms']} ms (host CPU, measured)")
    _emit(rep, a.json, lines)
    return 0


def cmd_ask(a) -> int:
    from .images import ImageInputError, load_image
    try:
        image = load_image(a.image)
    except ImageInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = _load_backend(a.weights)
    ans = backend.answer(image, a.question)
    _emit({"question": a.question, "answer": ans.text, "model": backend.model_id}, a.json,
          [] if a.json else [ans.text])
    return 0


def cmd_make_examples(a) -> int:
    from .examples import write_examples
    for item in write_examples(count=a.count):
        print(f"{item['file']}: {item['description']}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    return {"train-vlm": cmd_train_vlm, "eval-vlm": cmd_eval_vlm, "ask": cmd_ask,
            "make-examples": cmd_make_examples}[a.command](a)
