"""What an exported edge costs in accuracy: the same questions through the float32 PyTorch
edge and through an exported one (LiteRT int8 or float32, ONNX), the cloud half PyTorch's.

Per k: accuracy against ground truth, consistency with the float32 edge's answer at the same k,
and the fraction of the tokens' codes (stages 1..k) that differ from the float32 edge's. Scenes
and questions are eval-mae's (progvlm.eval.evaluate.eval_questions, the evaluation stream).

    python -m edge_agent.runtime_eval --runtime litert --model-dir DIR --questions 300 --seed 0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from progvlm.eval.evaluate import accuracy_report, eval_questions
from progvlm.toyworld.scenes import render_scene

from .runtime import PyTorchRuntime


def _answers(split, codec, latents, items, k) -> list[str]:
    """The cloud half's answers to every item from the k-layer codes of its scene's latent."""
    tokens = [split.mae.decompress(codec.encode_layers(lat, k), len(lat))
              for lat in latents]
    return [a.text for a in split.vlm.cloud_half_batch([tokens[s] for s, _ in items],
                                                       [qa.question for _, qa in items])]


def compare(runtime, seed: int, count: int) -> dict:
    """runtime (an exported EdgeRuntime) against the float32 PyTorch edge of the same models."""
    reference = PyTorchRuntime.load()
    split, codec = reference.split, reference.split.mae.edge_codec()
    if runtime.mae_fingerprint != split.fingerprint or runtime.model_id != split.vlm.model_id:
        raise SystemExit("error: the export is of other models than the bundled ones")
    torch.set_num_threads(1)
    runtime.set_threads(1)
    scenes, items = eval_questions(seed, count)
    float_latents, latents = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for scene in scenes:
            x = runtime.preprocess(render_scene(scene))  # the same input for both edges
            tokens = reference.vision(x)[0]
            float_latents.append(split.mae.encode_latent(tokens).numpy())
            latents.append(runtime.latent(runtime.vision(x)[0]) if hasattr(runtime, "latent")
                           else _onnx_latent(runtime, runtime.vision(x)[0]))
        L = split.num_layers
        a = np.stack([codec.indices(lat, L) for lat in float_latents])  # (scenes, L, N)
        b = np.stack([codec.indices(lat, L) for lat in latents])
        per_k = {}
        for k in range(1, L + 1):
            ref = _answers(split, codec, float_latents, items, k)
            got = _answers(split, codec, latents, items, k)
            per_k[k] = {"accuracy": accuracy_report(items, got)["overall"],
                        "accuracy_float32_edge": accuracy_report(items, ref)["overall"],
                        "consistency": float(np.mean([x == y for x, y in zip(got, ref)])),
                        "codes_changed": float((a[:, :k] != b[:, :k]).mean()),
                        "tokens_with_a_code_changed": float((a[:, :k] != b[:, :k]).any(1).mean())}
        for k, row in per_k.items():
            row["accuracy_gap"] = row["accuracy_float32_edge"] - row["accuracy"]
    latent_err = [float(np.abs(x - y).max()) for x, y in zip(float_latents, latents)]
    return {"edge_runtime": runtime.name, "int8": bool(getattr(runtime, "int8", False)),
            "delegate": runtime.delegate, "questions": len(items), "scenes": len(scenes),
            "seed": seed, "L": split.num_layers, "per_k": per_k,
            "latent_max_abs_error_median": float(np.median(latent_err)),
            "seconds": round(time.perf_counter() - t0, 1)}


def _onnx_latent(runtime, tokens):
    return runtime.sessions["mae_encoder"].run(None, {"tokens": np.asarray(tokens, np.float32)})[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_agent.runtime_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=("litert", "onnx"), default="litert")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", action="store_true", help="litert: add each model's op coverage")
    a = p.parse_args(argv)
    from .__main__ import make_runtime
    runtime = make_runtime(a.runtime, a.model_dir)
    out = compare(runtime, a.seed, a.questions)
    if a.ops and a.runtime == "litert":
        from .litert_export import export_coverage
        out["op_coverage"] = export_coverage(a.model_dir)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
