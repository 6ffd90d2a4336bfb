"""What every command group shares: the --vlm/--mae options, printing results, refusing input.

Torch-free, so that any entry point (edge_agent/__main__.py included) can take its options
from here."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_vlm_options(p, mae: bool = True):
    """--vlm SPEC and --mae FOLDER: the same two options on every entry point."""
    p.add_argument("--vlm", "--weights", dest="vlm", default=None,
                   help="VLM: 'bundled', a model folder or a Hugging Face Hub id "
                        "(default: $PROGVLM_VLM, else bundled)")
    if mae:
        p.add_argument("--mae", type=Path, default=None,
                       help="MAE folder made by train-mae for that VLM (default: $PROGVLM_MAE, "
                            "else the bundled MAE when it belongs to the VLM)")


def emit(result: dict, as_json: bool, lines: list[str]):
    """The human lines, then (with --json) the one JSON object as the last line."""
    for line in lines:
        print(line)
    if as_json:
        print(json.dumps(result))


def fail(message) -> int:
    """Say why on stderr; the exit status of a refused command."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def log(message: str):
    """Progress notes go to stderr, so that stdout stays clean for the results."""
    print(message, file=sys.stderr, flush=True)


def load_backend(spec: str | None):
    from ..backends import load_vlm
    return load_vlm(spec)
