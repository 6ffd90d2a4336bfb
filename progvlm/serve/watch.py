"""The cloud's side of a camera that watches (protocol.WATCH_PATH): a stream of frames, each
answered for every standing question, only changed answers sent back.

    edge → cloud   WatchStart {"questions": [...], "codec": "layers"|"jpeg"|"h264", "refines"}
                   (text), then one binary message per frame, {"end": true} to finish
    cloud → edge   Watching once; per frame a FrameAck {"index", "kind", "layers",
                   "received_bytes", "events", "stage_ms", "t_ms"} or, for a delta frame the
                   cloud cannot decode against what it holds, a Resync {"index", "detail"} (the
                   edge sends the frame again as a key frame); Error and close for anything else

One upload of the tokens serves every question: the frame is decoded once (MAE decode, or the
vision half for JPEG/H.264 frames) and the language half answers all standing questions as one
batch (Split.language_batch). A stream whose edge refines (adaptive: it may send layer 2 of a
frame while an answer is unsure) has its answers from layer 1 probed (Split.probe_codes), as a
single request's are. What the stream holds is bounded: one reference (the codes of
the last frame, progvlm.codec.temporal.Reference) or one H.264 decoder, the questions' last
answers, and at most MAX_STREAMS_PER_CLIENT streams per client address; a stream idle for
WATCH_IDLE_S is closed (4408).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool

from ..adaptive_probe import PROBE_LAYER
from ..codec import temporal
from ..codec.bitstream import BitstreamError, parse_header
from ..images import ImageInputError, load_image
from ..net.protocol import (MAX_STREAMS_PER_CLIENT, WATCH_IDLE_S, Event, FrameAck, RequestError,
                            Resync, Watching, check_end, parse_watch_start, to_ms)
from ..split import Split
from .stream import check_socket, closing_on_error



@dataclass
class WatchedStream:
    """What the cloud holds of one stream."""
    questions: list[str]
    codec: str
    refines: bool = False  # the edge may send layer 2 of a frame (WatchStart.refines): probe layer 1
    reference: temporal.Reference | None = None
    decoder: object = None  # the H.264 decoder (codec "h264")
    last_answers: list | None = None  # the last frame's Answers, and its k: an unchanged frame
    last_k: int | None = None  # (a one-byte delta at that k) is answered with them again
    index: int = 0  # frames decoded so far
    t_first: float | None = None

    @property
    def answers(self) -> list[str | None]:
        """Each question's latest answer text (None before the first frame)."""
        if self.last_answers is None:
            return [None] * len(self.questions)
        return [a.text for a in self.last_answers]


class WatchCompute:
    """One frame of a stream → its events, under the cloud model's lock (one computation at a
    time with every other request)."""

    def __init__(self, model):
        self.model = model
        self.split: Split = model.split
        self.tables = self.split.mae.edge_codec()

    def _tokens(self, stream: WatchedStream, data: bytes, stages: dict):
        """The frame → (visual tokens, grid, kind, layers). Raises temporal.NoReference for a
        delta the stream cannot take, RequestError for bad data."""
        t0 = time.perf_counter()
        if stream.codec == "layers":
            header = None
            if not temporal.is_delta(data):
                try:
                    header = parse_header(data, self.split.fingerprint)
                    self.split.check_header(header)
                except BitstreamError as e:
                    raise RequestError(400, f"bad key frame: {e}") from None
            try:
                reference, k, kind = temporal.apply(data, self.tables, stream.reference,
                                                    self.split.fingerprint, header)
            except temporal.NoReference:
                raise
            except BitstreamError as e:
                raise RequestError(400, f"bad frame: {e}") from None
            tokens = self.split.decode_latent(reference.latent(self.tables, k), k)
            stages["mae_decode_ms"] = to_ms(time.perf_counter() - t0)
            stream.reference = reference
            return tokens, reference.grid, kind, k
        if stream.codec == "h264":
            from ..video.h264 import H264Decoder
            from ..video.reader import VideoError
            if stream.decoder is None:
                stream.decoder = H264Decoder()
            try:
                image = stream.decoder.decode(data)
            except VideoError as e:
                raise RequestError(400, f"bad H.264 packet: {e}") from None
            if image is None:
                raise RequestError(400, "the H.264 packet decoded to no picture")
        else:
            try:
                image = load_image(data)
            except ImageInputError as e:
                raise RequestError(400, f"bad image: {e}") from None
        t1 = time.perf_counter()
        stages["image_decode_ms"] = to_ms(t1 - t0)
        tokens, grid = self.split.vlm.edge_half_with_grid(image)
        stages["vision_ms"] = to_ms(time.perf_counter() - t1)
        return tokens, grid, stream.codec, None

    @staticmethod
    def _unchanged(stream: WatchedStream, data: bytes) -> bool:
        """A one-byte delta (no token changed) at the k of the last frame: the decoder would
        see exactly the last frame's latent, so every answer is the last one (exact, not a
        guess: the language half is deterministic)."""
        return (stream.codec == "layers" and stream.reference is not None
                and stream.last_answers is not None and temporal.unchanged_k(data) == stream.last_k)

    def frame(self, stream: WatchedStream, data: bytes, arrived: float) -> FrameAck | Resync:
        stages: dict = {}
        if self._unchanged(stream, data):  # the same tokens as the last frame: the same answers
            t0 = time.perf_counter()
            answers, kind, layers = stream.last_answers, temporal.DELTA_KIND, stream.last_k
            stages["answers_reused_ms"] = to_ms(time.perf_counter() - t0)
        else:
            with self.model.exclusive():
                try:
                    tokens, grid, kind, layers = self._tokens(stream, data, stages)
                except temporal.NoReference as e:
                    return Resync(index=stream.index, detail=str(e))
                t0 = time.perf_counter()
                try:
                    answers = self.split.language_batch([(tokens, q, grid) for q in stream.questions])
                except ValueError as e:
                    raise RequestError(400, str(e)) from None
                stages["language_ms"] = to_ms(time.perf_counter() - t0)
                if stream.refines and layers == PROBE_LAYER:  # a sure answer may yet be unsure
                    t0 = time.perf_counter()
                    self.split.probe_codes(stream.reference.indices[0], stream.reference.grid,
                                           stream.questions, answers)
                    stages["probe_ms"] = to_ms(time.perf_counter() - t0)
        previous = stream.answers
        stream.last_answers, stream.last_k = answers, layers
        events = [Event(question=q, answer=a.text, previous=p, confidence=a.confidence)
                  for q, a, p in zip(stream.questions, answers, previous) if a.text != p]
        stream.t_first = stream.t_first or arrived
        sure = [a.confidence for a in answers if a.confidence is not None]
        ack = FrameAck(index=stream.index, kind=kind, layers=layers, received_bytes=len(data),
                       events=events, confidence_min=min(sure) if sure else None, stage_ms=stages,
                       t_ms=to_ms(arrived - stream.t_first))
        stream.index += 1
        return ack


class StreamCount:
    """Watch sockets open per client address, at most MAX_STREAMS_PER_CLIENT each."""

    def __init__(self, limit: int = MAX_STREAMS_PER_CLIENT):
        self.limit, self._open, self._lock = limit, Counter(), threading.Lock()

    def enter(self, client: str):
        with self._lock:
            if self._open[client] >= self.limit:
                raise RequestError(429, f"this client has {self._open[client]} streams open, at "
                                        f"most {self.limit}: close one first")
            self._open[client] += 1

    def leave(self, client: str):
        with self._lock:
            self._open[client] -= 1
            if self._open[client] <= 0:
                del self._open[client]

    def open_streams(self) -> int:
        with self._lock:
            return sum(self._open.values())


async def serve_watch(ws: WebSocket, state, token: str | None, allowed_origins: frozenset[str],
                      max_frame_bytes: int, idle_s: float = WATCH_IDLE_S):
    """One watch socket: its token and Origin checked, its start, then its frames in order."""
    await ws.accept()
    client = ws.client.host if ws.client else "unknown"
    counted = False
    async with closing_on_error(ws, "a watched stream"):
        try:
            check_socket(ws, token, allowed_origins)
            state.watch_streams.enter(client)
            counted = True
            await _watch(ws, state.watch_compute, max_frame_bytes, idle_s)
        finally:
            if counted:
                state.watch_streams.leave(client)


async def _receive(ws: WebSocket, timeout: float, what: str) -> dict:
    try:
        message = await asyncio.wait_for(ws.receive(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"no {what} for {timeout:g} s: the stream is closed") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message


async def _watch(ws: WebSocket, compute: WatchCompute, max_frame_bytes: int, idle_s: float):
    start = parse_watch_start((await _receive(ws, idle_s, "start message")).get("text"))
    stream = WatchedStream(start.questions, start.codec, start.refines and start.codec == "layers")
    await ws.send_json(Watching(questions=len(start.questions),
                                adaptive_threshold=compute.split.adaptive_threshold()[0]).model_dump())
    while True:
        message = await _receive(ws, idle_s, "frame")
        arrived = time.perf_counter()
        data = message.get("bytes")
        if data is None:
            check_end(message.get("text"))
            await ws.close()
            return
        if not data:
            raise RequestError(400, "an empty frame")
        if len(data) > max_frame_bytes:
            raise RequestError(413, f"a frame of {len(data):,} bytes, at most {max_frame_bytes:,}")
        reply = await run_in_threadpool(compute.frame, stream, data, arrived)
        await ws.send_json(reply.model_dump())
