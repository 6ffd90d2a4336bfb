"""`python -m edge_agent <command>`: the camera device's side of progvlm.

    ask     one question about one image, in one mode, through the shaped link → JSON record
    serve   the agent as an HTTP service (what the demo calls)
    export  the edge half + MAE encoder (+ language half, for full-edge) as ONNX, for a board
    encode  image → bitstream file (no cloud)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path

from progvlm.images import ImageInputError
from progvlm.cli.options import add_vlm_options
from progvlm.net.http_limits import add_allow_host

from .watch_cli import add_watch_parser, cmd_watch
from .modes import MODES
from .profiles import PROFILES
from .request import AskRequest

TOKEN_ENV = "PROGVLM_CLOUD_TOKEN"  # the cloud's token, which this agent sends
AGENT_TOKEN_ENV = "PROGVLM_AGENT_TOKEN"  # this agent's own, which its clients must send
# After SIGTERM, in-flight requests get this long before they are cancelled: shutdown never
# waits on a long paced request
SHUTDOWN_GRACE_S = 1.0


EXPORTED_RUNTIMES = ("onnx", "litert")  # read from an export folder (--model-dir), no PyTorch


def make_runtime(kind: str, model_dir: Path | None, vlm: str | None = None, mae: Path | None = None):
    if kind == "pytorch":
        from .runtime import PyTorchRuntime
        return PyTorchRuntime.load(vlm, mae)
    if kind in EXPORTED_RUNTIMES:
        if model_dir is None:
            raise SystemExit(f"error: --runtime {kind} needs --model-dir (made by "
                             f"`python -m edge_agent export --runtime {kind}`)")
        if vlm is not None or mae is not None:
            raise SystemExit(f"error: --runtime {kind} reads its models from --model-dir; --vlm and "
                             "--mae apply to the export (`python -m edge_agent export --vlm … --mae …`)")
        if kind == "litert":
            import importlib.util
            if importlib.util.find_spec("ai_edge_litert") is None:
                raise SystemExit("error: --runtime litert needs the LiteRT interpreter: "
                                 "pip install \".[edge-litert]\"")
            from .litert_runtime import LiteRTRuntime
            return LiteRTRuntime.load(model_dir)
        from .onnx_runtime import OnnxRuntime
        return OnnxRuntime.load(model_dir)
    raise SystemExit(f"error: unknown runtime {kind!r}")


def _add_device_options(p):
    add_vlm_options(p)
    p.add_argument("--runtime", choices=("pytorch",) + EXPORTED_RUNTIMES, default="pytorch",
                   help="pytorch (host), onnx (ONNX Runtime) or litert (LiteRT: the edge half only, "
                        "progressive modes); onnx and litert need no PyTorch")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="export folder (--runtime onnx or litert)")
    p.add_argument("--profile", choices=PROFILES, default=PROFILES[0],
                   help="host: measured times; imx95-emulated: host times × a speed factor (PROJECTED)")


# AskRequest's fields that `ask` takes otherwise: the device is --profile, a conversation is
# --question-more, and the record is printed whole
NOT_ASK_OPTIONS = ("device_profile", "conversation", "new_conversation", "stream")


def _scalar(annotation):
    """The Python type of a request field's values (its None and validators aside)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _add_request_options(p):
    """One option per AskRequest field (edge_agent/request.py): its type, meaning and default
    are the model's; an option not given is not sent, so the model's default applies."""
    for name, field in AskRequest.model_fields.items():
        if name in NOT_ASK_OPTIONS:
            continue
        kind, extra = _scalar(field.annotation), field.json_schema_extra or {}
        span = f" ({extra['minimum']:g}..{extra['maximum']:g})" if {"minimum", "maximum"} <= set(extra) else ""
        default = "" if field.is_required() or field.default is None else f" (default: {field.default})"
        options = dict(default=None, help=(field.description or "") + span + default)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            choices = list(MODES) if name == "mode" else extra.get("enum")
            options.update(type=kind, choices=choices, required=field.is_required())
        p.add_argument("--" + name.replace("_", "-"), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge_agent",
                                     description="The edge (camera device) side of progvlm.")
    sub = parser.add_subparsers(dest="command", metavar="command")

    ask = sub.add_parser("ask", help="answer one question about one image in one mode (JSON record)",
                         description="Runs the device's stages here and talks to the cloud through "
                         "the shaped link. Without --cloud-url it starts a cloud backend on "
                         "loopback for the request. Prints one JSON record: answer, mode, k, "
                         "payload bytes, every stage time and their sum.")
    ask.add_argument("--image", required=True, type=Path)
    _add_request_options(ask)
    ask.add_argument("--question-more", action="append", default=[], metavar="QUESTION",
                     help="a follow-up question about the same image (repeatable): the questions "
                          "are a conversation, the frame's bytes sent once; one record per question")
    ask.add_argument("--cloud-url", default=None, help="a running cloud backend (default: start one)")
    _add_device_options(ask)

    serve = sub.add_parser("serve", help="run the edge agent service (POST /v1/ask)",
                           description="The HTTP service the demo calls. Its clients send "
                           f"'Authorization: Bearer <token>' with the token in {AGENT_TOKEN_ENV} "
                           f"(/healthz is open); it sends the cloud the token in {TOKEN_ENV}. "
                           "Without a token it serves on loopback only, unless --allow-open.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (beyond loopback: needs a token or --allow-open)")
    serve.add_argument("--port", type=int, default=8700)
    serve.add_argument("--allow-open", action="store_true",
                       help=f"serve beyond loopback without {AGENT_TOKEN_ENV}: anyone who reaches "
                            "the port can use the agent (and its cloud)")
    serve.add_argument("--cloud-url", default=None, help="the cloud backend (without it: full-edge only)")
    add_allow_host(serve)
    _add_device_options(serve)

    export = sub.add_parser("export", help="export the device's models to ONNX for a board",
                            description="Writes vision.onnx, mae_encoder.onnx, language.onnx, the "
                            "MAE's coding tables and a manifest with checksums. Copy the folder to "
                            "the board and run `python -m edge_agent serve --runtime onnx "
                            "--model-dir FOLDER` there (no PyTorch needed).")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--runtime", choices=EXPORTED_RUNTIMES, default="onnx",
                        help="onnx (default) or litert: vision.tflite and mae_encoder.tflite, "
                             "converted by litert-torch (needs PyTorch and `pip install "
                             "progvlm[litert]` on the host that exports)")
    export.add_argument("--int8", action="store_true",
                        help="litert: full-integer int8, calibrated on frames of the bundled scenes")
    add_vlm_options(export)

    prof = sub.add_parser("profile", help="the edge half's stage times from camera frames (JSON)",
                          description="Time the device's stages on raw camera frames (the images' "
                          "pixels, no file decoding): preprocess, vision, MAE encode for k = 1 and "
                          "k = L; medians over the images of the best of several runs each, one "
                          "thread; and the MAE's share of the edge half. Host CPU, measured.")
    prof.add_argument("--images", required=True, type=Path, nargs="+", help="image files or folders")
    prof.add_argument("--repeats", type=int, default=7, help="runs per stage and image (best taken)")
    _add_device_options(prof)

    enc = sub.add_parser("encode", help="image → progressive bitstream of k layers",
                         description="Run the VLM's edge half and the MAE encoder on one image "
                         "and write the first k layers as a bitstream; prints sizes and stage "
                         "times (host CPU, measured) as JSON.")
    enc.add_argument("--image", required=True, type=Path)
    enc.add_argument("--k", type=int, default=None, help="layers to send (default: all)")
    enc.add_argument("--out", type=Path, required=True, help="where to write the bitstream")
    add_vlm_options(enc)
    add_watch_parser(sub, _add_device_options)
    return parser


def cmd_ask(a) -> int:
    from progvlm.serve.children import cloud_service
    from .agent import AskError, CloudError, DeadlineError, EdgeAgent, PairingError
    from .profiles import get_profile
    token = os.environ.get(TOKEN_ENV) or None
    child = None
    cloud_url = a.cloud_url
    fields = {name: getattr(a, name) for name in AskRequest.model_fields
              if name not in NOT_ASK_OPTIONS + ("question",) and getattr(a, name) is not None}
    conversation = {"conversation": True} if a.question_more else {}
    try:
        runtime = make_runtime(a.runtime, a.model_dir, a.vlm, a.mae)
        mode = MODES[fields.get("mode", AskRequest.model_fields["mode"].default)]
        if cloud_url is None and mode.needs_cloud:
            # the same models as this device; an ONNX export names the VLM, not its folder;
            # a fresh random token unless one is set
            child = cloud_service(token=token, vlm=a.vlm, mae=a.mae)
            print(f"starting a cloud backend at {child.url} for this request …", file=sys.stderr)
            child.start()
            cloud_url, token = child.url, child.token
        agent = EdgeAgent(runtime, cloud_url, token, get_profile(a.profile))
        records = [agent.ask(a.image, question, client="command line", **fields, **conversation)
                   for question in [a.question] + a.question_more]
    except (ImageInputError, AskError, CloudError, PairingError, DeadlineError, ValueError,
            RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if child:
            child.stop()
    print(json.dumps(records if conversation else records[0], indent=1))
    return 0


def cmd_serve(a) -> int:
    import uvicorn
    from progvlm.net.http_limits import HeadDeadline, OpenBindError, bind_names, check_bind
    from progvlm.net.transport import CloudError
    from .agent import EdgeAgent, PairingError
    from .profiles import get_profile
    from .service import create_app
    token = os.environ.get(AGENT_TOKEN_ENV) or None
    try:  # before loading anything: a refused address costs nothing
        check_bind(a.host, token, a.allow_open, AGENT_TOKEN_ENV)
        agent = EdgeAgent(make_runtime(a.runtime, a.model_dir, a.vlm, a.mae), a.cloud_url,
                          os.environ.get(TOKEN_ENV) or None, get_profile(a.profile))
    except (OpenBindError, PairingError, CloudError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(agent, token=token, allowed_hosts=bind_names(a.host, a.allow_host)),
                host=a.host, port=a.port, log_level="warning", http=HeadDeadline,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0


def cmd_export(a) -> int:
    if a.int8 and a.runtime != "litert":
        print("error: --int8 applies to --runtime litert", file=sys.stderr)
        return 2
    try:
        if a.runtime == "litert":
            from .litert_export import export_litert
            manifest = export_litert(a.out, a.vlm, a.mae, int8=a.int8)
        else:
            from .onnx_export import export_onnx
            manifest = export_onnx(a.out, a.vlm, a.mae)
        print(json.dumps(manifest, indent=1))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_encode(a) -> int:
    from progvlm.images import load_image
    from progvlm.split import load_split
    try:
        split = load_split(a.vlm, a.mae)
        frame = split.edge(load_image(a.image), a.k)
    except (ImageInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = split.pack(frame)
    a.out.write_bytes(data)
    print(json.dumps({"out": str(a.out), "bytes": len(data), "k": frame.k, "vlm_id": split.vlm.model_id,
                      "layer_payload_bytes": [len(p) for p in frame.layers], "grid": frame.grid,
                      "stage_ms": frame.stage_ms, "timing": "host CPU, measured"}))
    return 0


def cmd_profile(a) -> int:
    import statistics
    import time

    import numpy as np

    from progvlm.images import load_image, raw_frame
    runtime = make_runtime(a.runtime, a.model_dir, a.vlm, a.mae)
    runtime.set_threads(1)
    paths = [p for arg in a.images for p in (sorted(arg.iterdir()) if arg.is_dir() else [arg])]
    frames = []
    for p in paths:
        try:  # the camera's pixels: decoding the file is not the device's work
            frames.append(np.asarray(load_image(p)))
        except ImageInputError as e:
            print(f"skipping {p}: {e}", file=sys.stderr)
    if not frames:
        print("error: no readable images", file=sys.stderr)
        return 2
    L = runtime.num_layers

    def best_ms(fn, *args):
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        return out, min(times)
    rows = []
    for pixels in [frames[0]] + frames:  # the first pass warms up
        r = {}
        x, r["edge_preprocess_ms"] = best_ms(lambda: runtime.preprocess(raw_frame(pixels)))
        (tokens, grid), r["edge_vision_ms"] = best_ms(runtime.vision, x)
        for k in (1, L):
            _, r[f"mae_encode_k{k}_ms"] = best_ms(runtime.mae_encode, tokens, k)
        rows.append(r)
    med = {key: round(statistics.median(r[key] for r in rows[1:]), 4) for key in rows[0]}
    # the spread behind each median: the fastest and slowest image (each its best of repeats)
    ranges = {key: [round(min(r[key] for r in rows[1:]), 4), round(max(r[key] for r in rows[1:]), 4)]
              for key in rows[0]}
    for k in (1, L):
        med[f"mae_share_of_edge_k{k}"] = round(med[f"mae_encode_k{k}_ms"] / (
            med["edge_preprocess_ms"] + med["edge_vision_ms"] + med[f"mae_encode_k{k}_ms"]), 4)
    print(json.dumps({"runtime": runtime.name, "int8": bool(getattr(runtime, "int8", False)),
                      "vlm_id": runtime.model_id, "frames": len(frames),
                      "L": L, "threads": 1, "timing": "host CPU, measured; raw frames, best of "
                      f"{a.repeats} per image, median over images (ranges: min and max over "
                      "images)", **med, "ranges": ranges}))
    return 0


COMMANDS = {"ask": cmd_ask, "serve": cmd_serve, "export": cmd_export, "encode": cmd_encode,
            "profile": cmd_profile, "watch": lambda a: cmd_watch(a, make_runtime, TOKEN_ENV)}


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    command = COMMANDS.get(a.command)
    if command is None:
        parser.print_help()
        return 2
    return command(a)


if __name__ == "__main__":
    raise SystemExit(main())
