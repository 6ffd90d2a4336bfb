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

from ..net.http_limits import add_allow_host


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
    p = sub.add_parser("train-mae", help="train the MAE for a VLM on its frozen visual tokens (resumable)",
                       description="Train the Meta AutoEncoder for a VLM, which is never updated: "
                       "reconstruction of its visual tokens + distillation through its frozen "
                       "language model. The bundled VLM trains on generated scenes and their "
                       "questions; any VLM trains on a folder of images (--images), the teacher "
                       "being the VLM's own greedy answers to a few prompts, cached once in the "
                       "working folder. Working and output folders are named after the VLM and "
                       "the MAE settings (runs/train-mae/<vlm>-<hash>, runs/mae/<vlm>-<hash>), so "
                       "a run resumes only its own checkpoint. Runs on Hugging Face Accelerate: "
                       "`accelerate launch -m progvlm train-mae ...` trains on every GPU, the plain "
                       "command on one CPU.")
    _add_vlm(p, mae=False)
    p.add_argument("--images", type=Path, default=None,
                   help="folder of training images, searched recursively (any VLM; without it, "
                        "the bundled VLM trains on generated scenes)")
    p.add_argument("--questions", type=Path, default=None,
                   help="with --images: the teacher's prompts, one per line (blank lines and # "
                        "comments ignored); default: 5 generic prompts")
    p.add_argument("--teacher-tokens", type=int, default=None,
                   help="with --images: the longest teacher answer, in tokens (default 24)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the trained MAE (default: runs/mae/<run>; --out assets/mae "
                        "replaces the bundled MAE)")
    p.add_argument("--workdir", type=Path, default=Path("runs/train-mae"),
                   help="parent of the run's working folder <vlm>-<hash> (teacher cache, "
                        "checkpoint) (default: %(default)s)")
    p.add_argument("--mixed-precision", default=None, metavar="{no,fp16,bf16}",
                   help="autocast for the MAE and the frozen LM (fp16 needs a GPU; default: "
                        "accelerate launch's --mixed_precision, else no)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32,
                   help="samples per step and process (a sample: a scene, or an image and a prompt)")
    p.add_argument("--scenes", type=int, default=None,
                   help="generated scenes (bundled VLM without --images; default 12000)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation loss")
    p.add_argument("--rate-lambda", default=None,
                   help="λ per stage, comma-separated (default 0.2,0.1,0.05,0.02): how much a bit "
                        "costs in the code assignment; lower spends more bytes on that layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if the run's checkpoint exists")
    p.add_argument("--json", action="store_true", help="print the training summary as JSON last")


def _add_eval_mae(sub):
    p = sub.add_parser("eval-mae", help="bytes, fidelity, accuracy and consistency for every k",
                       description="For each k = 1..L on fresh scenes: payload bytes (mean, max), "
                       "token reconstruction cosine, exact-match accuracy, and semantic consistency "
                       "against the answer from uncompressed tokens; with the baselines (raw fp16 "
                       "tokens, JPEG q10/50/90 at the model's input size, average-pooled tokens at "
                       "about each k's bytes) on the same scenes, and the edge timing. Generated "
                       "scenes (with ground truth) exist for the bundled VLM only; for any VLM pass "
                       "--images DIR: per k the wire bytes, exact agreement and semantic "
                       "consistency with the answer from uncompressed tokens, beside JPEG q90 at "
                       "camera size, JPEG q90 at the model's input size and raw fp16 tokens. "
                       "Both also give the adaptive row: layers sent until the answer's confidence "
                       "reaches the calibrated threshold (the MAE folder's adaptive.json, see "
                       "calibrate-adaptive), with its calibration (ECE).")
    p.add_argument("--questions", default=None, metavar="N|FILE",
                   help="generated scenes: how many questions (default 1000); with --images: a "
                        "file of questions, one per line, # starts a comment (default: a generic "
                        "set)")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="evaluate on the images in DIR (any VLM; no ground truth needed)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="with --images: the longest answer generated (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reliability-plot", type=Path, default=None, metavar="PNG",
                   help="write the adaptive rule's reliability diagram (confidence bins against "
                        "accuracy, or agreement with --images) to this file")
    _add_vlm(p)
    p.add_argument("--json", action="store_true")


def _add_calibrate_adaptive(sub):
    p = sub.add_parser("calibrate-adaptive", help="choose the adaptive stopping rule and threshold; "
                       "writes adaptive.json into the MAE folder",
                       description="Every question answered from k = 1..L layers; for each "
                       "confidence rule (min, mean or geometric-mean token probability, min margin "
                       "to the runner-up) and threshold, the adaptive policy's mean bytes and "
                       "accuracy. Chosen: within --budget × the mean bytes of k = 1, the most "
                       "accurate (ties: fewest bytes). The bundled VLM is calibrated on the "
                       "training stream (ground truth); any VLM with --images DIR, agreement with "
                       "its answers from uncompressed tokens in place of accuracy (use images you "
                       "do not evaluate on).")
    p.add_argument("--questions", default=None, metavar="N|FILE",
                   help="generated scenes: how many questions (default 4000); with --images: a "
                        "file of questions, one per line (default: a generic set)")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="calibrate on the images in DIR (any VLM; no ground truth needed)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="with --images: the longest answer generated (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training stream seed (generated scenes)")
    p.add_argument("--budget", type=float, default=None,
                   help="bytes allowed, in mean bytes of k = 1 (default: the goal's 1.3)")
    p.add_argument("--out", type=Path, default=None, metavar="FOLDER",
                   help="where adaptive.json goes (default: the MAE folder)")
    p.add_argument("--dry-run", action="store_true", help="report the choice, write nothing")
    p.add_argument("--reliability-plot", type=Path, default=None, metavar="PNG",
                   help="write the chosen rule's reliability diagram on the calibration data")
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
                       "Bearer <token>'. The model runs one request at a time (a lock). The "
                       "WebSocket carries many requests on one kept-open socket (the edge agent's "
                       "session); browser pages may open it only from an --allow-origin.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    _add_vlm(p)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--allow-open", action="store_true",
                   help="serve beyond loopback without PROGVLM_CLOUD_TOKEN (anyone who reaches the port can use it)")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads (default 1: the demo shares this host with the edge agent)")
    p.add_argument("--batching", action="store_true",
                   help="run concurrent requests as batches (MAE decode, prefill, decoding "
                        "together; a lone request waits for nothing); default: one at a time")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (scheme://host[:port]) whose pages may open the "
                        "WebSocket; repeatable (default: none; clients that send no Origin, "
                        "like the edge agent, are always served)")
    add_allow_host(p)


def _add_serve_cloud_ray(sub):
    from ..serve.batching import MAX_BATCH, MAX_WAIT_MS
    p = sub.add_parser("serve-cloud-ray", help="the cloud backend on Ray Serve: replicas, "
                       "request batching, autoscaling (pip install 'ray[serve]')",
                       description="The serve-cloud HTTP contract (the same FastAPI app, WebSocket "
                       "included) served by Ray Serve replicas, each batching concurrent requests "
                       "with @serve.batch. PROGVLM_CLOUD_TOKEN as for serve-cloud.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    _add_vlm(p)
    p.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    add_allow_host(p)
    p.add_argument("--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="scale between MIN and MAX replicas instead (aiming at one full batch "
                        "in flight per replica)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="requests per batch at most")
    p.add_argument("--batch-wait-ms", type=float, default=MAX_WAIT_MS,
                   help="how long a batch waits to fill after its first request")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0,
                   help="Ray GPUs per replica (0.5: two replicas share a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local one)")


def cmd_serve_cloud_ray(a) -> int:
    import os
    from ..serve.cloud import TOKEN_ENV
    try:
        from ..serve.ray_serve import serve_ray
        import ray.serve  # noqa: F401
    except ImportError:
        print("error: serve-cloud-ray needs Ray Serve: pip install 'ray[serve]' (see "
              "requirements.txt for the tested version)", file=sys.stderr)
        return 2
    serve_ray(a.host, a.port, a.ray_address, vlm=a.vlm, mae=a.mae,
              token=os.environ.get(TOKEN_ENV) or None, max_body_bytes=a.max_body_bytes,
              replicas=a.replicas, autoscale=tuple(a.autoscale) if a.autoscale else None,
              max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, threads=a.threads,
              num_cpus=a.num_cpus, num_gpus=a.num_gpus, allowed_hosts=a.allow_host)
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="the paper-style experiment (bundled VLM), or the cost "
                       "profile of any VLM on your images (--images)",
                       description="Bundled VLM: one seeded run: rate–accuracy of progressive k "
                       "against JPEG (model and camera size), raw tokens and pooling; every mode's "
                       "latency at 0.1–50 Mbps through the agent's emulated link, and at 1 Mbps "
                       "through a kernel-shaped link (network namespace, veth, tc) where the machine "
                       "allows it, asked of an edge agent and a cloud backend in child processes "
                       "(full-cloud at camera size, model size and equal accuracy); the 1 Mbps "
                       "breakdown and headline ratios with their spread; cloud load with 1/4/16 clients; the scene-graph information floor. "
                       "Writes CSV/JSON, PNG plots and summary.md. Default run ≈ 5 min on 2 cores "
                       "(at most 15); --quick ≈ 2 min. With --images DIR (any VLM, e.g. --vlm "
                       "FOLDER --mae FOLDER): the cost profile measured on this host: edge vision "
                       "ms, LM ms per token, MAE share, wire bytes per k, JPEG bytes at camera and "
                       "model size, end-to-end times of full-edge / full-cloud / progressive "
                       "computed from the measured stages for the host and the projected i.MX95 "
                       "profiles (imx95-emulated, imx95-npu-projected) and the bandwidths where "
                       "the fastest mode changes; writes results.json and summary.md.")
    p.add_argument("--quick", action="store_true", help="fewer questions, qualities, bandwidths and samples (CI)")
    p.add_argument("--link", choices=("both", "kernel", "emulated"), default="both",
                   help="the latency sweep's link: emulated by the agent (paced bytes, slept RTT), "
                        "kernel (network namespace + veth shaped by tc; needs root) or both, and their "
                        "gap (default; the kernel link is skipped with a note where it cannot be made)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="measure the cost profile on the images in DIR (any VLM)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="with --images: tokens generated per timed answer (default %(default)s)")
    p.add_argument("--cloud-device", default=None,
                   help="with --images: measure the cloud's VLM stages on this torch device "
                        "(e.g. cuda); default: this CPU stands in for the server")
    _add_vlm(p)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: docs/bench; runs/bench-quick with --quick; "
                        "runs/bench-cost with --images)")
    p.add_argument("--json", action="store_true")


def _add_make_random_vlm(sub):
    from ..backends.random_hf import NOTE, PRESETS
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
    for add in (_add_train_vlm, _add_eval_vlm, _add_train_mae, _add_eval_mae,
                _add_calibrate_adaptive, _add_ask,
                _add_make_examples, _add_serve_cloud, _add_serve_cloud_ray, _add_bench,
                _add_make_random_vlm):
        add(sub)
    return parser


def _load_backend(spec: str | None):
    from ..backends import load_vlm
    return load_vlm(spec)


def _emit(result: dict, as_json: bool, lines: list[str]):
    for line in lines:
        print(line)
    if as_json:
        print(json.dumps(result))


def cmd_train_vlm(a) -> int:
    from ..training.train_vlm import train_vlm
    summary = train_vlm(a.out, a.workdir, steps=a.steps, num_scenes=a.scenes, batch=a.batch,
                        lr=a.lr, seed=a.seed, eval_every=a.eval_every, resume=not a.no_resume,
                        log=lambda m: print(m, file=sys.stderr))
    t = summary["training"]
    _emit(summary, a.json, [f"trained {t['parameters']:,} parameters in {t['train_seconds']:.0f} s; "
                            f"weights in {a.out}"])
    return 0


def _time_halves(backend, repeats: int = 20) -> dict:
    """Median wall time of the edge half and the cloud half, one image at a time."""
    from ..eval.evaluate import median_ms
    from ..toyworld.scenes import generate_scene, render_scene
    img = render_scene(generate_scene(7))
    q = "describe the scene ."
    edge, cloud = median_ms(lambda: backend.edge_half(img), lambda t: backend.cloud_half(t, q),
                            repeats)
    return {"edge_half_ms": round(edge, 2), "cloud_half_ms": round(cloud, 2),
            "threads": torch.get_num_threads(), "note": "host CPU, measured, batch 1, "
            "'describe' question (longest answer)"}


def cmd_eval_vlm(a) -> int:
    from tqdm import tqdm
    from ..eval.evaluate import evaluate_backend
    if a.questions < 1:
        print("error: --questions must be at least 1", file=sys.stderr)
        return 2
    backend = _load_backend(a.vlm)
    if getattr(backend, "family", None) != "bundled":
        print(f"error: eval-vlm scores exact answers on generated scenes in the bundled model's "
              f"vocabulary; {backend.model_id} answers in its own words. Measure it against its "
              "own uncompressed answers with `eval-mae --vlm SPEC --mae FOLDER --images DIR`",
              file=sys.stderr)
        return 2
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
    from ..backends.tiny import TinyVLMBackend
    from ..models.mae import MAEConfig
    from ..training import train_mae as tm

    def fail(message) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    # what no run can do is refused before a model loads
    if a.images is not None and a.scenes is not None:
        return fail("--scenes counts generated scenes; it does not apply with --images")
    if a.images is None:
        for flag, value in (("--questions", a.questions), ("--teacher-tokens", a.teacher_tokens)):
            if value is not None:
                return fail(f"{flag} applies to training on --images (generated scenes come with "
                            "their own questions)")
    if a.mixed_precision not in (None, "no", "fp16", "bf16"):
        return fail(f"--mixed-precision must be no, fp16 or bf16, got {a.mixed_precision!r}")
    if a.scenes is not None and a.scenes < 1:
        return fail(f"--scenes must be at least 1, got {a.scenes}")
    lambdas = None
    if a.rate_lambda is not None:
        try:
            lambdas = [float(x) for x in a.rate_lambda.split(",")]
        except ValueError:
            return fail(f"--rate-lambda takes numbers separated by commas, got {a.rate_lambda!r}")
        if not all(lam >= 0 for lam in lambdas):
            return fail(f"--rate-lambda takes λ ≥ 0, got {a.rate_lambda!r}")
    log = lambda m: print(m, file=sys.stderr)
    try:
        tm.check_options(a.steps, a.batch, a.distill, a.lr)
        prompts = tm.read_prompts(a.questions) if a.questions is not None else None
        if a.images is not None:
            tm.list_images(a.images)  # a missing or empty folder, before the model loads
        backend = _load_backend(a.vlm)
        cfg = MAEConfig.for_tokens(backend.tokens_per_block, backend.token_dim)
        if lambdas is not None:
            cfg.rate_lambda = lambdas  # the count is checked against the stages
        common = dict(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, distill=a.distill,
                      cfg=cfg, resume=not a.no_resume, mixed_precision=a.mixed_precision,
                      work_root=a.workdir, log=log)
        if a.images is None:
            if not isinstance(backend, TinyVLMBackend):
                return fail(f"{backend.model_id} has no generated scenes"
                            + (" (--scenes is for the bundled VLM)" if a.scenes else "")
                            + ": train it on a folder of images with --images DIR")
            scenes = 12000 if a.scenes is None else a.scenes
            summary = tm.train_mae(backend, a.out, None, num_scenes=scenes, **common)
        else:
            teacher_tokens = 24 if a.teacher_tokens is None else a.teacher_tokens
            summary = tm.train_mae_on_images(backend, a.images, a.out, None, prompts=prompts,
                                             teacher_tokens=teacher_tokens, **common)
    except (tm.TrainMAEError, FileNotFoundError) as e:
        return fail(e)
    from accelerate import PartialState
    if not PartialState().is_main_process:  # under `accelerate launch`: one report
        return 0
    _emit(summary, a.json, [f"MAE {summary['fingerprint']} ({summary['parameters']:,} parameters) "
                            f"for {summary['mae']['vlm_id']} written to {summary['out']} "
                            f"(working folder {summary['workdir']})"])
    return 0


def cmd_eval_mae(a) -> int:
    from tqdm import tqdm
    from ..backends import load_vlm
    from ..split import load_split
    vlm = load_vlm(a.vlm)
    if a.images is not None:
        return _eval_mae_on_images(a, load_split(vlm, a.mae))
    if getattr(vlm, "family", None) != "bundled":
        print(f"error: generated scenes with ground truth exist only for the bundled model, not "
              f"for {vlm.model_id}: pass --images DIR to evaluate this VLM on a folder of images "
              "(agreement and consistency with its answers from uncompressed tokens)",
              file=sys.stderr)
        return 2
    try:
        count = 1000 if a.questions is None else int(a.questions)
    except ValueError:
        print(f"error: --questions takes a number of generated questions here; a questions file "
              f"({a.questions}) goes with --images DIR", file=sys.stderr)
        return 2
    if count < 1:
        print("error: --questions must be at least 1", file=sys.stderr)
        return 2
    from ..eval.evaluate import evaluate_mae
    split = load_split(vlm, a.mae)
    t0 = time.time()
    with tqdm(desc="eval-mae", unit="scene", file=sys.stderr) as bar:
        rep = evaluate_mae(split, a.seed, count, progress=bar.update)
    rep["seconds"] = round(time.time() - t0, 1)
    lines = [f"MAE {rep['mae_fingerprint']}, L={rep['L']}, seed {a.seed}, {rep['questions']} "
             f"questions on {rep['scenes']} scenes; uncompressed accuracy "
             f"{rep['uncompressed']['accuracy']:.4f}",
             f"{'':>12} {'bytes mean':>10} {'max':>5} {'tok cos':>8} {'accuracy':>9} {'consist.':>9}"]
    for r in rep["per_k"]:
        lines.append(f"{'k=' + str(r['k']):>12} {r['bytes_mean']:>10.1f} {r['bytes_max']:>5} "
                     f"{r['token_cosine']:>8.4f} {r['accuracy']:>9.4f} {r['consistency']:>9.4f}")
    ad = rep["adaptive"]
    lines.append(f"{'adaptive':>12} {ad['bytes_mean']:>10.1f} {'':>5} {'':>8} {ad['accuracy']:>9.4f} "
                 f"{ad['consistency']:>9.4f}")
    for name, r in rep["baselines"].items():
        lines.append(f"{name:>12} {r['bytes_mean']:>10.1f} {'':>5} {'':>8} {r['accuracy']:>9.4f} "
                     f"{r['consistency']:>9.4f}")
    lines += _adaptive_lines(ad, split, a.reliability_plot)
    t = rep["timing"]
    lines.append(f"edge half {t['edge_half_ms']} ms, MAE compress {t['mae_compress_ms']} ms "
                 f"({100 * t['mae_share_of_edge_half']:.1f}% of the edge half; host CPU, measured)")
    _emit(rep, a.json, lines)
    return 0


def _eval_mae_on_images(a, split) -> int:
    """eval-mae --images DIR: any VLM, no ground truth (evaluate_mae_on_images)."""
    from tqdm import tqdm
    from ..eval.evaluate import evaluate_mae_on_images
    got = _images_and_questions(a)
    if got is None:
        return 2
    paths, questions = got
    t0 = time.time()
    try:
        with tqdm(total=len(paths), desc="eval-mae", unit="image", file=sys.stderr) as bar:
            rep = evaluate_mae_on_images(split, paths, questions, progress=bar.update,
                                         max_new_tokens=a.max_new_tokens)
    except ValueError as e:  # no readable image in the folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep["seconds"] = round(time.time() - t0, 1)
    lines = [f"VLM {rep['vlm_id']}, MAE {rep['mae_fingerprint']}, L={rep['L']}: {rep['images']} "
             f"images × {len(questions)} questions; no ground truth, so agreement and consistency "
             "are against the answer from uncompressed tokens",
             f"{'':>16} {'bytes mean':>10} {'max':>7} {'tok cos':>8} {'agreement':>9} {'consist.':>9}"]
    for r in rep["per_k"]:
        lines.append(f"{'k=' + str(r['k']):>16} {r['bytes_mean']:>10.1f} {r['bytes_max']:>7} "
                     f"{r['token_cosine']:>8.4f} {r['agreement']:>9.4f} {r['consistency']:>9.4f}")
    ad = rep["adaptive"]
    lines.append(f"{'adaptive':>16} {ad['bytes_mean']:>10.1f} {'':>7} {'':>8} "
                 f"{ad['agreement']:>9.4f} {ad['consistency']:>9.4f}")
    for name, r in rep["baselines"].items():
        lines.append(f"{name:>16} {r['bytes_mean']:>10.1f} {r['bytes_max']:>7} {'':>8} "
                     f"{r['agreement']:>9.4f} {r['consistency']:>9.4f}")
    lines += _adaptive_lines(ad, split, a.reliability_plot)
    lines += [f"skipped {s}" for s in rep["skipped"]]
    _emit(rep, a.json, lines)
    return 0


def _adaptive_lines(ad: dict, split, plot: Path | None) -> list[str]:
    """The adaptive row's details under the eval-mae table; writes the reliability plot."""
    from ..adaptive import plot_reliability
    target, L = ad["target"], len(ad["layers_histogram"])
    _, source = split.adaptive_threshold()
    hist = ", ".join(f"k={k}: {n}" for k, n in ad["layers_histogram"].items())
    lines = [f"adaptive: {ad['rule']} ≥ {ad['threshold']:.4g} ({source}); mean layers "
             f"{ad['mean_layers']:.3f} ({hist}); bytes {ad['bytes_ratio_to_k1']:.3f}× k=1's "
             f"{ad['k1_bytes_mean']:.1f} (per question); {target} {ad[target]:.4f} vs k={L}'s "
             f"{ad[f'k{L}_{target}']:.4f}",
             f"goal ({target} of k={L} at ≤ {ad['budget']}× the bytes of k=1): "
             + ("met" if ad["goal_met"] else "NOT met")
             + f"; calibration: ECE {ad['reliability']['ece']:.4f} over all "
               f"{ad['reliability']['answers']} answers (k=1..{L}), "
               f"{ad['reliability_k1']['ece']:.4f} at k=1"]
    if plot is not None:
        title = (f"{ad['rule']} confidence vs {target}, k=1..{L} "
                 f"(ECE {ad['reliability']['ece']:.3f})")
        lines.append(f"reliability plot: {plot_reliability(ad['reliability'], plot, title)}")
    return lines


def _images_and_questions(a):
    """--images DIR and --questions FILE → (image paths, questions); prints the error and
    returns None for bad ones."""
    from ..eval.evaluate import default_questions, read_questions
    if not a.images.is_dir():
        print(f"error: --images {a.images} is not a folder", file=sys.stderr)
        return None
    paths = sorted(p for p in a.images.iterdir() if p.is_file() and not p.name.startswith("."))
    try:
        questions = default_questions() if a.questions is None else read_questions(a.questions)
    except (OSError, ValueError) as e:
        print(f"error: --questions with --images takes a file of questions: {e}", file=sys.stderr)
        return None
    return paths, questions


def cmd_calibrate_adaptive(a) -> int:
    from tqdm import tqdm
    from .. import adaptive
    from ..eval import evaluate
    from ..split import load_split
    budget = adaptive.BYTES_BUDGET if a.budget is None else a.budget
    if not 1.0 <= budget <= 100.0:
        print(f"error: --budget must be in 1..100 (mean bytes of k = 1), got {budget}",
              file=sys.stderr)
        return 2
    split = load_split(a.vlm, a.mae)
    t0 = time.time()
    if a.images is not None:
        got = _images_and_questions(a)
        if got is None:
            return 2
        paths, questions = got
        try:
            with tqdm(total=len(paths), desc="calibrate", unit="image", file=sys.stderr) as bar:
                choice, ladder = evaluate.calibrate_on_images(split, paths, questions, bar.update,
                                                              a.max_new_tokens, budget)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        if getattr(split.vlm, "family", None) != "bundled":
            print(f"error: generated scenes with ground truth exist only for the bundled model, "
                  f"not for {split.vlm.model_id}: pass --images DIR", file=sys.stderr)
            return 2
        try:
            count = 4000 if a.questions is None else int(a.questions)
        except ValueError:
            count = 0
        if count < 1:
            print(f"error: --questions must be a number of questions ≥ 1 (a questions file goes "
                  f"with --images DIR), got {a.questions}", file=sys.stderr)
            return 2
        with tqdm(desc="calibrate", unit="scene", file=sys.stderr) as bar:
            choice, ladder = evaluate.calibrate_on_scenes(split, count, a.seed, progress=bar.update,
                                                          budget=budget)
    choice["seconds"] = round(time.time() - t0, 1)
    target, L = choice["target"], split.num_layers
    lines = [f"calibration on {choice['calibrated_on']}",
             "fixed k: " + ", ".join(f"k={r['k']} {r['bytes_mean']:.1f} B {target} {r[target]:.4f}"
                                     for r in choice["fixed_k"]),
             f"each rule's best threshold within {budget}× the bytes of k=1:",
             f"{'rule':>14} {'threshold':>10} {'bytes/k=1':>10} {target:>9} {f'vs k={L}':>8} "
             f"{'layers':>7}"]
    for r in choice["per_rule"]:
        lines.append(f"{r['rule']:>14} {r['threshold']:>10.4g} {r['bytes_ratio']:>10.3f} "
                     f"{r[target]:>9.4f} {r[f'{target}_vs_k{L}']:>+8.4f} {r['mean_layers']:>7.3f}")
    lines.append(f"chosen: {choice['rule']} ≥ {choice['threshold']:.4g}; goal ({target} of k={L} "
                 f"at ≤ {budget}× the bytes of k=1) " + ("met" if choice["goal_met"] else "NOT met")
                 + " on the calibration data")
    if a.reliability_plot is not None:
        rel = adaptive.reliability(ladder.confidence(choice["rule"]), ladder.correct())
        title = (f"{choice['rule']} confidence vs {target}, k=1..{L}, calibration data "
                 f"(ECE {rel['ece']:.3f})")
        lines.append(f"reliability plot (ECE {rel['ece']:.4f}): "
                     f"{adaptive.plot_reliability(rel, a.reliability_plot, title)}")
    if not a.dry_run:
        try:
            lines.append(f"written: {evaluate.save_calibration(split, choice, ladder, a.out)}")
        except (OSError, ValueError) as e:
            print(f"error: cannot write adaptive.json: {e}", file=sys.stderr)
            return 2
    _emit(choice, a.json, lines)
    return 0


def cmd_ask(a) -> int:
    from ..images import ImageInputError, load_image
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
    from ..toyworld.examples import write_examples
    for item in write_examples(count=a.count):
        print(f"{item['file']}: {item['description']}")
    return 0


def cmd_serve_cloud(a) -> int:
    import os
    from ..serve import cloud
    from ..net.http_limits import OpenBindError, check_bind
    token = os.environ.get(cloud.TOKEN_ENV) or None
    try:
        check_bind(a.host, token, a.allow_open, cloud.TOKEN_ENV)
    except OpenBindError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if token is None:
        print(cloud.open_access_warning(a.host), file=sys.stderr, flush=True)
    model_class = None
    if a.batching:
        from ..serve.batching import BatchingCloudModel
        model_class = BatchingCloudModel
    cloud.serve(a.host, a.port, token, a.vlm, a.mae, a.max_body_bytes, a.threads,
                        allowed_origins=a.allow_origin, model_class=model_class,
                        allowed_hosts=a.allow_host)
    return 0


def cmd_bench(a) -> int:
    from ..backends import BUNDLED, default_vlm_spec
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if a.images is not None:
        return _bench_cost_profile(a, log)
    if (a.vlm or default_vlm_spec()) != BUNDLED or a.mae is not None:
        print(f"error: the paper-style bench runs the bundled model on generated scenes; for "
              f"{a.vlm or default_vlm_spec()} pass --images DIR to measure its cost profile "
              "(with --vlm and --mae)", file=sys.stderr)
        return 2
    from ..bench.experiment import run_bench
    out = a.out or Path("runs/bench-quick" if a.quick else "docs/bench")
    headline = run_bench(out, seed=a.seed, quick=a.quick, link=a.link, log=log)
    _emit(headline, a.json, [
        f"results in {out}/ (summary.md, results.json, CSV, PNG); {headline['bench_seconds']:.0f} s",
        f"k* = {headline['k_star']} (consistency {headline['k_star_consistency']:.3f}), "
        f"{headline['k_star_bytes_mean']:.1f} bytes = {100 * headline['bytes_vs_jpeg_q90_model']:.2f}% of "
        f"JPEG q90 at model size, {100 * headline['bytes_vs_raw_fp16']:.3f}% of raw fp16 tokens",
        f"1 Mbps, {headline['link']} link: progressive k={headline['k_star']} against"]
        + [f"  {name}: {v['ratio']:.2f}x [{v['low']:.2f}-{v['high']:.2f}]"
           for name, v in headline["progressive_vs"].items()])
    return 0


def _bench_cost_profile(a, log) -> int:
    """bench --images DIR: the cost profile of any VLM (progvlm.bench.experiment.run_cost_profile)."""
    from ..bench.experiment import describe_interval, run_cost_profile
    from ..split import load_split
    # the device profiles are the edge agent's; the CLI hands them to the bench, which itself
    # imports nothing from edge_agent
    from edge_agent.profiles import get_profile, npu_profile
    if not a.images.is_dir():
        print(f"error: --images {a.images} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(p for p in a.images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        print(f"error: no images in {a.images}", file=sys.stderr)
        return 2
    split = load_split(a.vlm, a.mae)
    cloud_split = None
    if a.cloud_device:
        from ..backends import load_vlm
        cloud_split = load_split(load_vlm(a.vlm, device=a.cloud_device), split.mae)
    out = a.out or Path("runs/bench-cost")
    profiles = [get_profile("host"), get_profile("imx95-emulated"), npu_profile()]
    try:
        r = run_cost_profile(split, paths, out, profiles, vlm_spec=a.vlm, log=log,
                             max_new_tokens=a.max_new_tokens, cloud_split=cloud_split)
    except ValueError as e:  # no readable image in the folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    headline = {key: r[key] for key in ("kind", "note", "images", "skipped", "edge_vision_ms",
                                        "lm_ms_per_token",
                                        "mae_encode_share_of_edge", "vision_macs", "bytes_per_k",
                                        "jpeg_bytes", "crossover", "crossover_ideal_cloud")}
    headline.update(vlm_id=r["vlm"]["vlm_id"], out=str(out),
                    end_to_end_1mbps_ms={d: {m: v["total_ms"] for m, v in modes.items()}
                                         for d, modes in r["end_to_end_1mbps_ms"].items()})
    L = r["vlm"]["num_layers"]
    lines = [f"results in {out}/ (summary.md, results.json); {r['note']}",
             f"edge vision {r['edge_vision_ms']:.0f} ms (host, 1 thread), "
             f"{r['profiles'][profiles[-1].name]['edge_vision_ms']:.0f} ms ({profiles[-1].name}); "
             f"LM {r['lm_ms_per_token']['cloud']:.1f} ms/token (cloud); MAE "
             f"{100 * r['mae_encode_share_of_edge']:.2f}% of the edge",
             "bytes per k: " + ", ".join(f"{k}: {b:.0f}" for k, b in r["bytes_per_k"].items())
             + f"; JPEG q90 camera {r['jpeg_bytes']['camera']:.0f}, model size "
             f"{r['jpeg_bytes']['model_input']:.0f}"]
    for device, by_k in r["crossover"].items():
        lines.append(f"{device}, k={L}: " + "; ".join(describe_interval(iv) for iv in by_k[f"k={L}"])
                     + "; with an ideal cloud: " + "; ".join(
                         describe_interval(iv) for iv in r["crossover_ideal_cloud"][device][f"k={L}"]))
    _emit(headline, a.json, lines)
    return 0


def cmd_make_random_vlm(a) -> int:
    from ..backends.random_hf import NOTE, NOTE_FILE, write_random_vlm
    out = write_random_vlm(a.out, a.preset, seed=a.seed)
    note = json.loads((out / NOTE_FILE).read_text())
    print(f"{out}: {a.preset}, N x D = {note['visual_tokens']} x {note['token_dim']} visual "
          f"tokens, {note['parameters']:,} parameters ({NOTE})")
    print(f"use it with --vlm {out}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    from ..backends import VLMSpecError
    from ..split import SplitError
    try:
        return _COMMANDS[a.command](a)
    except (VLMSpecError, SplitError) as e:  # a VLM or MAE that cannot be loaded: say why
        print(f"error: {e}", file=sys.stderr)
        return 2


_COMMANDS = {"train-vlm": cmd_train_vlm, "eval-vlm": cmd_eval_vlm, "train-mae": cmd_train_mae,
            "eval-mae": cmd_eval_mae, "calibrate-adaptive": cmd_calibrate_adaptive, "ask": cmd_ask,
            "make-examples": cmd_make_examples, "serve-cloud": cmd_serve_cloud,
            "bench": cmd_bench, "make-random-vlm": cmd_make_random_vlm,
            "serve-cloud-ray": cmd_serve_cloud_ray}
