"""full-edge: the whole VLM on the device; nothing crosses the link."""
from __future__ import annotations

from .base import Mode


class FullEdge(Mode):
    name = "full-edge"
    needs_cloud = False

    def on_device(self, context):
        tokens, grid = context.see()
        question = context.request.question
        return context.step(f"edge_language {question}", context.runtime.language, tokens, question,
                            grid, stage="edge_language")

    def run(self, context):
        context.record.update(answer=context.seen, payload_bytes=0)
