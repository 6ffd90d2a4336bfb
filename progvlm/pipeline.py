"""One image + question through every path the demo compares, in-process.

(The distributed path, edge agent → shaped link → cloud service, builds on these calls.)"""
from __future__ import annotations

from .images import load_image


def compression_ladder(backend, mae, image, question: str) -> dict:
    """The whole model's answer, and for each k = 1..L the bytes sent and the answer from
    the decoded tokens."""
    tokens = backend.edge_half(load_image(image))
    reference = backend.cloud_half(tokens, question).text
    rows = []
    for k in range(1, mae.cfg.num_layers + 1):
        data = mae.compress(tokens, k)
        decoded, _ = mae.decompress(data)
        rows.append({"k": k, "bytes": len(data), "answer": backend.cloud_half(decoded, question).text})
    return {"answer": reference, "raw_fp16_bytes": tokens.numel() * 2, "ladder": rows}
