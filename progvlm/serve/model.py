"""The cloud's compute behind its routes: decode what arrives, run the VLM, time every stage.

`CloudModel` runs one request at a time under a lock, first come first served, so every stage
time is one request's; progvlm.serve.batching.BatchingCloudModel runs concurrent requests as
batches behind the same interface (full, progressive, info, warm_up, split). Both refuse bad
input with protocol.RequestError (400) saying why.
"""
from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager

from ..codec.bitstream import BitstreamError
from ..images import ImageInputError, load_image
from ..net.protocol import RequestError, to_ms
from ..split import Frame, Split


@contextmanager
def refused_as_400():
    """A bad stream, or input the model cannot take (e.g. a question longer than it reads),
    raised inside the block → RequestError(400) with the reason."""
    try:
        yield
    except BitstreamError as e:
        raise RequestError(400, f"bad bitstream: {e}") from None
    except ValueError as e:
        raise RequestError(400, str(e)) from None


def parse_frame(split: Split, data: bytes) -> Frame:
    """A bitstream (or a prefix of one) → Frame; RequestError (400) saying why not."""
    with refused_as_400():
        return split.unpack(data)


def said(answer, stages: dict) -> dict:
    """{"answer", "confidence"} of a backend's Answer (confidence None where the backend cannot
    tell); its stage times go into `stages`."""
    stages.update({k: round(v, 3) for k, v in answer.stage_ms.items()})
    return {"answer": answer.text, "confidence": getattr(answer, "confidence", None)}


class CloudModel:
    """The server's compute, one request at a time under a lock."""

    def __init__(self, split: Split):
        self.split = split
        self._lock = threading.Lock()

    def exclusive(self):
        """The lock one computation holds (a watched stream's frame takes it too)."""
        return self._lock

    def warm_up(self):
        """One blank frame through every path: first calls pay for lazy initialisation."""
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, "PNG")
        self.full(buf.getvalue(), "describe the scene .")
        self.progressive(self.split.pack(self.split.edge(Image.new("RGB", (64, 64)))),
                         "describe the scene .")

    def info(self) -> dict:
        return {**self.split.info(),
                "concurrency": "one request at a time under a lock, first come first served"}

    def _see(self, image_bytes: bytes):
        """A frame sent whole → its visual tokens, tile grid and the decode and vision times."""
        t0 = time.perf_counter()
        try:
            image = load_image(image_bytes)
        except ImageInputError as e:
            raise RequestError(400, f"bad image: {e}") from None
        t1 = time.perf_counter()
        tokens, grid = self.split.vlm.edge_half_with_grid(image)
        return tokens, grid, {"image_decode_ms": to_ms(t1 - t0), "vision_ms": to_ms(time.perf_counter() - t1)}

    def full(self, image_bytes: bytes, question: str) -> dict:
        """An image → the whole VLM's answer: {"answer", "confidence", "stage_ms"}."""
        with self._lock:
            tokens, grid, stages = self._see(image_bytes)
            with refused_as_400():
                return {**said(self.split.language(tokens, question, grid), stages), "stage_ms": stages}

    def progressive(self, stream: bytes | Frame, question: str) -> dict:
        """A bitstream → the answer from its complete layers: {"answer", "confidence",
        "stage_ms", "layers_used", "layers_announced", "partial"}. `stream`: the bytes (an
        HTTP body, parsed here) or the Frame already parsed from them (the WebSocket parses
        as layers arrive, progvlm.serve.stream): each stream is parsed once."""
        frame = stream if isinstance(stream, Frame) else parse_frame(self.split, stream)
        stages: dict = {}
        answer = self._cloud_half(stages, frame, question)
        return {**answer, "stage_ms": stages, "layers_used": frame.k,
                "layers_announced": frame.layers_announced, "partial": frame.partial}

    def _cloud_half(self, stages: dict, frame: Frame, question: str) -> dict:
        """MAE decode and the language half → said(...) (BatchingCloudModel: in a batch)."""
        with self._lock, refused_as_400():
            return said(self.split.cloud(frame, question), stages)
