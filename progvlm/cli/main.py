"""`python -m progvlm <command>`: one entry for training, evaluation and tools.

Evaluation commands take --seed and --json; with --json the last line printed is one JSON object
with the figures. Progress bars go to stderr, so stdout stays clean for the results. Each
command group lives in its own module (training, evaluation, tools, serve, bench), whose
`add_*(sub)` defines a command's options and sets its `run`; this module only assembles them.
"""
from __future__ import annotations

import argparse

from . import bench, evaluation, serve, tools, training
from .options import fail

#: every command, in the order `--help` lists them
COMMAND_PARSERS = (training.add_train_vlm, evaluation.add_eval_vlm, training.add_train_mae,
                   evaluation.add_eval_mae, evaluation.add_calibrate_adaptive, evaluation.add_eval_video, tools.add_ask,
                   tools.add_make_examples, serve.add_serve_cloud, serve.add_serve_cloud_ray,
                   bench.add_bench, tools.add_make_random_vlm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m progvlm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="progvlm: progressive semantic communication for edge-cloud VLMs.",
        epilog="Run `python -m progvlm <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in COMMAND_PARSERS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    from ..backends import VLMSpecError
    from ..split import SplitError
    try:
        return a.run(a)
    except (VLMSpecError, SplitError) as e:  # a VLM or MAE that cannot be loaded: say why
        return fail(e)
