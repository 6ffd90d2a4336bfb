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


def _add_vlm(p, mae: bool = True):
    """--vlm SPEC and --mae FOLDER: the same two options on every entry point."""
    p.add_argument("--vlm", "--weights", dest="vlm", default=None,
                   help="VLM: 'bundled', a model folder or a Hugging Face Hub id "
                        "(default: $PROGVLM_VLM, else bundled)")
    if mae:
        p.add_argument("--mae", type=Path, default=None,
                       help="MAE folder made by train-mae for that VLM (default: $PROGVLM_MAE, "
                            "else the bundled MAE when it belongs to the VLM)")



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
    _add_vlm(p, mae=False)
    p.add_argument("--json", action="store_true")


def _add_train_mae(sub):
    p = sub.add_parser("train-mae", help="train the MAE on the frozen VLM's visual tokens (resumable)",
                       description="Train the Meta AutoEncoder for a VLM: on generated scenes for "
                       "the bundled VLM (reconstruction + distillation through the frozen LM), "
                       "or on a folder of images for a transformers VLM (reconstruction). The VLM "
                       "is never updated. Checkpoints to --workdir and resumes from there.")
    p.add_argument("--out", type=Path, default=Path("assets/mae"))
    p.add_argument("--workdir", type=Path, default=Path("runs/train-mae"))
    p.add_argument("--vlm", default="bundled",
                   help="'bundled', or a transformers model id/folder (then --images is needed)")
    p.add_argument("--images", type=Path, default=None, help="folder of training images (HF VLMs)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--scenes", type=int, default=12000, help="generated scenes (bundled VLM)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation loss")
    p.add_argument("--rate-lambda", default=None,
                   help="λ per stage, comma-separated (default 0.2,0.1,0.05,0.02): how much a bit "
                        "costs in the code assignment; lower spends more bytes on that layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--json", action="store_true")


def _add_eval_mae(sub):
    p = sub.add_parser("eval-mae", help="bytes, fidelity, accuracy and consistency for every k",
                       description="For each k = 1..L on fresh scenes: payload bytes (mean, max), "
                       "token reconstruction cosine, exact-match accuracy, and semantic consistency "
                       "against the answer from uncompressed tokens; with the baselines (raw fp16 "
                       "tokens, JPEG q10/50/90 at the model's input size, average-pooled tokens at "
                       "about each k's bytes) on the same scenes, and the edge timing.")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    _add_vlm(p)
    p.add_argument("--json", action="store_true")


def _add_ask(sub):
    p = sub.add_parser("ask", help="answer one question about one image with the whole VLM",
                       description="Run the whole VLM on one image and one question.")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--question", required=True)
    _add_vlm(p, mae=False)
    p.add_argument("--json", action="store_true")


def _add_make_examples(sub):
    p = sub.add_parser("make-examples", help="regenerate the example scenes in assets/examples")
    p.add_argument("--count", type=int, default=6)


def _add_serve_cloud(sub):
    p = sub.add_parser("serve-cloud", help="run the cloud backend (FastAPI): full and progressive answers",
                       description="The GPU-server side: /healthz, /v1/info, POST /v1/full (image + "
                       "question), POST /v1/progressive and WS /v1/progressive/stream (bitstream + "
                       "question). With PROGVLM_CLOUD_TOKEN set, /v1/* needs 'Authorization: "
                       "Bearer <token>'. The model runs one request at a time (a lock).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    _add_vlm(p)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads (default 1: the demo shares this host with the edge agent)")


def _add_bench(sub):
    p = sub.add_parser("bench", help="the paper-style experiment: rate–accuracy, latency vs "
                       "bandwidth, headline ratios, load, information floor",
                       description="One seeded run: rate–accuracy of progressive k against JPEG "
                       "(model and camera size), raw tokens and pooling; every mode's latency at "
                       "0.1–50 Mbps through the real shaped link to a cloud backend child process; "
                       "the 1 Mbps breakdown and headline ratios; cloud load with 1/4/16 clients; "
                       "the scene-graph information floor. Writes CSV/JSON, PNG plots and "
                       "summary.md. Default run ≈ 5 min on 2 cores (at most 15); --quick ≈ 1–2 min.")
    p.add_argument("--quick", action="store_true", help="fewer questions, qualities and images (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: docs/bench; runs/bench-quick with --quick)")
    p.add_argument("--json", action="store_true")


def _add_make_random_vlm(sub):
    from .backends.random_hf import NOTE, PRESETS
    p = sub.add_parser("make-random-vlm", help="write a random-weight transformers VLM folder "
                       "(a stand-in for a Hub checkpoint, offline)",
                       description="Write a transformers VLM folder with random weights that "
                       "loads like a downloaded checkpoint (--vlm FOLDER); " + NOTE + ". Presets: "
                       + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ".")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="same preset + seed = same weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m progvlm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="progvlm: progressive semantic communication for edge-cloud VLMs.",
        epilog="Run `python -m progvlm <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in (_add_train_vlm, _add_eval_vlm, _add_train_mae, _add_eval_mae, _add_ask,
                _add_make_examples, _add_serve_cloud, _add_bench, _add_make_random_vlm):
        add(sub)
    return parser


def _load_backend(spec: str | None):
    from .backends import load_vlm
    return load_vlm(spec)


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
    from .evaluate import median_ms
    from .scenes import generate_scene, render_scene
    img = render_scene(generate_scene(7))
    q = "describe the scene ."
    edge, cloud = median_ms(lambda: backend.edge_half(img), lambda t: backend.cloud_half(t, q),
                            repeats)
    return {"edge_half_ms": round(edge, 2), "cloud_half_ms": round(cloud, 2),
            "threads": torch.get_num_threads(), "note": "host CPU, measured, batch 1, "
            "'describe' question (longest answer)"}


def cmd_eval_vlm(a) -> int:
    from tqdm import tqdm
    from .evaluate import evaluate_backend
    if a.questions < 1:
        print("error: --questions must be at least 1", file=sys.stderr)
        return 2
    backend = _load_backend(a.vlm)
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


def cmd_train_mae(a) -> int:
    from .models.mae import MAEConfig
    log = lambda m: print(m, file=sys.stderr)
    cfg = MAEConfig()
    if a.rate_lambda:
        try:
            cfg.rate_lambda = [float(x) for x in a.rate_lambda.split(",")]
        except ValueError:
            print(f"error: --rate-lambda takes numbers separated by commas, got {a.rate_lambda!r}",
                  file=sys.stderr)
            return 2
    if a.vlm == "bundled":
        from .training.train_mae import train_mae
        summary = train_mae(_load_backend(None), a.out, a.workdir, steps=a.steps, batch=a.batch,
                            num_scenes=a.scenes, lr=a.lr, seed=a.seed, distill=a.distill,
                            cfg=cfg, resume=not a.no_resume, log=log)
    else:
        from .backends.hf import HFVLMBackend
        from .training.train_mae import train_mae_on_images
        if a.images is None or not a.images.is_dir():
            print("error: a transformers VLM needs --images FOLDER of training images", file=sys.stderr)
            return 2
        summary = train_mae_on_images(HFVLMBackend.load(a.vlm), a.images, a.out, a.workdir,
                                      steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                                      cfg=cfg, resume=not a.no_resume, log=log)
    _emit(summary, a.json, [f"MAE {summary['fingerprint']} ({summary['parameters']:,} parameters) "
                            f"for {summary['mae']['vlm_id']} in {a.out}"])
    return 0


def cmd_eval_mae(a) -> int:
    from tqdm import tqdm
    from .evaluate import evaluate_mae
    from .split import load_split
    if a.questions < 1:
        print("error: --questions must be at least 1", file=sys.stderr)
        return 2
    split = load_split(a.vlm, a.mae)
    backend, mae = split.vlm, split.mae
    t0 = time.time()
    with tqdm(desc="eval-mae", unit="scene", file=sys.stderr) as bar:
        rep = evaluate_mae(split, a.seed, a.questions, progress=bar.update)
    rep["seconds"] = round(time.time() - t0, 1)
    lines = [f"MAE {rep['mae_fingerprint']}, L={rep['L']}, seed {a.seed}, {rep['questions']} "
             f"questions on {rep['scenes']} scenes; uncompressed accuracy "
             f"{rep['uncompressed']['accuracy']:.4f}",
             f"{'':>12} {'bytes mean':>10} {'max':>5} {'tok cos':>8} {'accuracy':>9} {'consist.':>9}"]
    for r in rep["per_k"]:
        lines.append(f"{'k=' + str(r['k']):>12} {r['bytes_mean']:>10.1f} {r['bytes_max']:>5} "
                     f"{r['token_cosine']:>8.4f} {r['accuracy']:>9.4f} {r['consistency']:>9.4f}")
    for name, r in rep["baselines"].items():
        lines.append(f"{name:>12} {r['bytes_mean']:>10.1f} {'':>5} {'':>8} {r['accuracy']:>9.4f} "
                     f"{r['consistency']:>9.4f}")
    t = rep["timing"]
    lines.append(f"edge half {t['edge_half_ms']} ms, MAE compress {t['mae_compress_ms']} ms "
                 f"({100 * t['mae_share_of_edge_half']:.1f}% of the edge half; host CPU, measured)")
    _emit(rep, a.json, lines)
    return 0


def cmd_ask(a) -> int:
    from .images import ImageInputError, load_image
    try:
        image = load_image(a.image)
    except ImageInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = _load_backend(a.vlm)
    ans = backend.answer(image, a.question)
    note = backend.domain_note(image)
    result = {"question": a.question, "answer": ans.text, "model": backend.model_id}
    if note:  # e.g. a photograph given to the bundled model, which knows generated scenes only
        result["domain_note"] = note
        print(f"note: {note}", file=sys.stderr)
    _emit(result, a.json, [] if a.json else [ans.text])
    return 0


def cmd_make_examples(a) -> int:
    from .examples import write_examples
    for item in write_examples(count=a.count):
        print(f"{item['file']}: {item['description']}")
    return 0


def cmd_serve_cloud(a) -> int:
    import os
    from .cloud_service import TOKEN_ENV, serve
    serve(a.host, a.port, os.environ.get(TOKEN_ENV) or None, a.vlm, a.mae, a.max_body_bytes, a.threads)
    return 0


def cmd_bench(a) -> int:
    from .bench import run_bench
    out = a.out or Path("runs/bench-quick" if a.quick else "docs/bench")
    headline = run_bench(out, seed=a.seed, quick=a.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
    t = headline["time_1mbps_ms"]
    _emit(headline, a.json, [
        f"results in {out}/ (summary.md, results.json, CSV, PNG)",
        f"k* = {headline['k_star']} (consistency {headline['k_star_consistency']:.3f}), "
        f"{headline['k_star_bytes_mean']:.1f} bytes = {100 * headline['bytes_vs_jpeg_q90_model']:.2f}% of "
        f"JPEG q90, {100 * headline['bytes_vs_raw_fp16']:.3f}% of raw fp16 tokens",
        f"1 Mbps: progressive {t['progressive']:.0f} ms, full-cloud {t['full_cloud']:.0f} ms, "
        f"full-edge {t['full_edge_host']:.0f} ms (host), {t['full_edge_imx95_projected']:.0f} ms "
        "(imx95, projected)"])
    return 0


def cmd_make_random_vlm(a) -> int:
    from .backends.random_hf import NOTE, NOTE_FILE, backend_kwargs, write_random_vlm
    out = write_random_vlm(a.out, a.preset, seed=a.seed)
    note = json.loads((out / NOTE_FILE).read_text())
    print(f"{out}: {a.preset}, N x D = {note['visual_tokens']} x {note['token_dim']} visual "
          f"tokens, {note['parameters']:,} parameters ({NOTE})")
    if backend_kwargs(a.preset):
        print(f"load it with HFVLMBackend.load(folder, **{backend_kwargs(a.preset)})")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    from .backends import VLMSpecError
    from .split import SplitError
    try:
        return _COMMANDS[a.command](a)
    except (VLMSpecError, SplitError) as e:  # a VLM or MAE that cannot be loaded: say why
        print(f"error: {e}", file=sys.stderr)
        return 2


_COMMANDS = {"train-vlm": cmd_train_vlm, "eval-vlm": cmd_eval_vlm, "train-mae": cmd_train_mae,
            "eval-mae": cmd_eval_mae, "ask": cmd_ask,
            "make-examples": cmd_make_examples, "serve-cloud": cmd_serve_cloud,
            "bench": cmd_bench, "make-random-vlm": cmd_make_random_vlm}
