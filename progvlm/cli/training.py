"""train-vlm and train-mae: the bundled VLM on generated scenes, the MAE for any VLM."""
from __future__ import annotations

from pathlib import Path

from .options import add_vlm_options, emit, fail, load_backend, log


def add_train_vlm(sub):
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
    p.set_defaults(run=cmd_train_vlm)


def add_train_mae(sub):
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
    add_vlm_options(p, mae=False)
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
    p.set_defaults(run=cmd_train_mae)


def cmd_train_vlm(a) -> int:
    from ..training.train_vlm import train_vlm
    summary = train_vlm(a.out, a.workdir, steps=a.steps, num_scenes=a.scenes, batch=a.batch,
                        lr=a.lr, seed=a.seed, eval_every=a.eval_every, resume=not a.no_resume,
                        log=log)
    t = summary["training"]
    emit(summary, a.json, [f"trained {t['parameters']:,} parameters in {t['train_seconds']:.0f} s; "
                            f"weights in {a.out}"])
    return 0


def cmd_train_mae(a) -> int:
    from ..backends.tiny import TinyVLMBackend
    from ..models.mae import MAEConfig
    from ..training import train_mae as tm

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
    try:
        tm.check_options(a.steps, a.batch, a.distill, a.lr)
        prompts = tm.read_prompts(a.questions) if a.questions is not None else None
        if a.images is not None:
            tm.list_images(a.images)  # a missing or empty folder, before the model loads
        backend = load_backend(a.vlm)
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
    emit(summary, a.json, [f"MAE {summary['fingerprint']} ({summary['parameters']:,} parameters) "
                            f"for {summary['mae']['vlm_id']} written to {summary['out']} "
                            f"(working folder {summary['workdir']})"])
    return 0
