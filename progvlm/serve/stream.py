"""The cloud's WebSocket stream (protocol.STREAM_PATH): a session of requests in sequence on one
socket, in the messages of progvlm.net.protocol. Each request:

    Start (text): {"question": str, "refine": bool = true, "kind": "progressive"|"full" =
        "progressive", "keep_open": bool = false, "frame_id": str = none, "resume": bool = false}
    the body in binary messages, as the link delivers it
    END (text): {"end": true}

A progressive request is answered after each newly complete layer with a Refinement
{"type": "refinement", "layers": j, "answer", "confidence", "stage_ms", "received_ms" (first
byte to layer j complete), "t_ms"}; without refine, once: for the newest layer when all
announced layers are in, the stream ends, or the uplink stays silent SILENT_CUT_S. Then a
ProgressiveFinal {"type": "final", "layers", "answer", "confidence", "layers_announced",
"partial", "received_bytes", "resumed"}. A full request (an image) gets a FullFinal {"type":
"final", "answer", "confidence", "stage_ms", "received_bytes", "receive_ms", "resumed"}. After
the final message the socket closes, unless the request said keep_open: then it waits for the
next request. Bad input: an Error {"type": "error", "status", "detail"} and the socket closes
with protocol.close_code(status) (4000 + status; 1011 for an internal error).

Receiver-driven refinement (the edge's adaptive mode) needs nothing more: the edge sends a
layer, reads its refinement (with its confidence), and then sends the next layer or the end.

Conversations: a request with a `frame_id` leaves the frame's bytes (a stream's complete
layers, or the image) in the cloud's bounded cache (progvlm.net.frame_cache), for this peer
only. A request with "resume": true asks for them first, and the cloud answers at once with one of
    Resumed {"type": "resumed", "frame_id", "layers": j, "received_bytes"}  then, progressive:
        the refinement from those j layers (whatever refine says) and the request goes on as
        any other from byte `received_bytes` of the stream (more layers, or the end); full:
        the final answer, and the request is over (no body, no end)
    Missing {"type": "missing", "frame_id", "detail"}  (evicted, expired, a restarted cloud,
        or never sent): the edge sends the frame from its start, as without resume.

Bounds on what one request may cost (StreamLimits): its bytes and messages, the silence between
its messages, and its whole time; a kept-open socket idle between requests is closed (1000).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool

from ..codec.bitstream import MAX_HEADER_BYTES, BitstreamError, TruncatedStream, parse_header
from ..net.frame_cache import CachedFrame, FrameCache
from ..net.http_limits import bearer_ok
from ..net.protocol import (Error, FullFinal, Missing, ProgressiveFinal, Refinement, RequestError,
                            Resumed, Start, check_end, close_code, parse_start, to_ms)
from ..split import Frame, Split
from .model import parse_frame

log = logging.getLogger("progvlm.cloud")

SILENT_CUT_S = 0.5  # an unrefined stream with layers still to come, silent this long: cut
IDLE_TIMEOUT_S = 10.0  # the most silence inside a request, or before a new socket's first message
SESSION_IDLE_S = 60.0  # a kept-open socket with no request for this long is closed
# messages per request: the default body limit in the link's 1000-byte chunks fits twice over
MAX_STREAM_MESSAGES = 16_384


@dataclass(frozen=True)
class StreamLimits:
    max_bytes: int  # one request's body
    max_messages: int  # one request's binary messages
    idle_s: float  # the most silence inside a request, or before a new socket's first message
    session_idle_s: float  # between requests on a kept-open socket
    request_s: float  # one request's whole time


def normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


async def serve_stream(ws: WebSocket, state, limits: StreamLimits, token: str | None,
                       allowed_origins: frozenset[str]):
    """One accepted socket: its token and Origin checked, then its requests (`state`: the app's,
    with the model, the frame cache and the count of sockets accepted)."""
    await ws.accept()
    async with closing_on_error(ws, "the stream"):
        check_socket(ws, token, allowed_origins)
        state.stream_connections += 1
        # conversations' frames are this peer's alone (progvlm.net.frame_cache)
        client = ws.client.host if ws.client else "unknown"
        await _StreamSession(ws, state.model, limits, state.frame_cache, client).run()


@asynccontextmanager
async def closing_on_error(ws: WebSocket, what: str):
    """An accepted socket's work: a refusal (RequestError) is sent as an Error and closes it
    with its code, a client that went away is no error, anything else is a 500 (logged)."""
    try:
        yield
    except RequestError as e:
        await _close_with_error(ws, e.status, e.detail)
    except WebSocketDisconnect:
        log.debug("client went away from %s", what)
    except Exception as e:
        log.exception("unexpected error in %s", what)
        await _close_with_error(ws, 500, f"internal error: {type(e).__name__}: {e}")


def check_socket(ws: WebSocket, token: str | None, allowed_origins: frozenset[str]):
    """RequestError unless the socket carries the token (when one is set) and comes from no
    browser page, or from an allowed origin's."""
    if not bearer_ok(ws.headers.get("authorization"), token):
        raise RequestError(401, "missing or wrong access token")
    origin = ws.headers.get("origin")
    if origin is not None and normal_origin(origin) not in allowed_origins:
        raise RequestError(403, f"a page from origin {origin} may not use this backend "
                                "(allow it with --allow-origin)")


async def _close_with_error(ws: WebSocket, status: int, detail: str):
    try:
        await ws.send_json(Error(status=status, detail=detail).model_dump())
        await ws.close(code=close_code(status))
    except (WebSocketDisconnect, OSError, RuntimeError):  # it went away meanwhile
        log.debug("client went away before its error (%d) was sent", status)


class _Idle(Exception):
    pass


class _StreamSession:
    """One socket's requests, in sequence. A reader task stamps every message as it arrives,
    so that answering layer j (in a worker thread) neither delays reading layer j+1 nor
    inflates its measured arrival time; its queue is bounded, so a flood waits in the socket."""

    INBOX_MESSAGES = 256

    def __init__(self, ws: WebSocket, model, limits: StreamLimits, cache: FrameCache, client: str):
        self.ws, self.model, self.limits = ws, model, limits
        self.cache, self.client = cache, client
        self.inbox: asyncio.Queue = asyncio.Queue(self.INBOX_MESSAGES)
        self.request_deadline = time.monotonic() + limits.request_s  # the current request's

    async def _read(self):
        while True:
            message = await self.ws.receive()
            await self.inbox.put((time.perf_counter(), message))
            if message["type"] == "websocket.disconnect":
                return

    async def _next(self, timeout: float) -> tuple[float, dict]:
        try:
            arrived, message = await asyncio.wait_for(self.inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise _Idle from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return arrived, message

    async def _next_in_request(self) -> tuple[float, dict]:
        """The request's next message: none within idle_s, or none before the request's whole
        time (request_s) is up, is a 408."""
        left = self.request_deadline - time.monotonic()
        try:
            return await self._next(max(0.0, min(self.limits.idle_s, left)))
        except _Idle:
            if left < self.limits.idle_s:
                raise RequestError(408, f"the request took over {self.limits.request_s:g} s: "
                                        "abandoned") from None
            raise RequestError(408, f"no message for {self.limits.idle_s:g} s inside a request: "
                                    "abandoned") from None

    async def run(self):
        reader = asyncio.create_task(self._read())
        try:
            wait, first = self.limits.idle_s, True
            while True:
                try:
                    _, message = await self._next(wait)
                except _Idle:
                    if first:
                        raise RequestError(408, f"no start message within {wait:g} s") from None
                    await self.ws.close(code=1000, reason=f"idle for {wait:g} s")
                    return
                start = parse_start(message.get("text"))
                self.request_deadline = time.monotonic() + self.limits.request_s
                if start.kind == "full":
                    await self._full(start)
                else:
                    await self._progressive(start)
                if not start.keep_open:
                    await self.ws.close()
                    return
                wait, first = self.limits.session_idle_s, False
        finally:
            reader.cancel()

    def _count(self, messages: int, nbytes: int):
        if messages > self.limits.max_messages:
            raise RequestError(413, f"more than {self.limits.max_messages} messages in one request")
        if nbytes > self.limits.max_bytes:
            raise RequestError(413, f"stream over the limit of {self.limits.max_bytes} bytes")

    async def _send(self, message):
        await self.ws.send_json(message.model_dump())

    async def _held(self, start: Start) -> CachedFrame | None:
        """For a request that asks to resume: the frame the cache holds for it, announced to the
        edge as Resumed, or None, announced as Missing."""
        held = self.cache.get(self.client, start.frame_id)
        if held is not None and held.kind == start.kind:
            await self._send(Resumed(frame_id=start.frame_id, layers=held.layers,
                                     received_bytes=len(held.data)))
            return held
        await self._send(Missing(frame_id=start.frame_id))
        return None

    async def _full(self, start: Start):
        question = start.question
        held = await self._held(start) if start.resume else None
        if held is not None:
            reply = await run_in_threadpool(self.model.full, held.data, question)
            await self._send(FullFinal(**reply, received_bytes=0, receive_ms=0.0, resumed=True))
            return
        body, messages, t_first, t_last = bytearray(), 0, None, None
        while (received := await self._next_in_request())[1].get("bytes") is not None:
            arrived, message = received
            messages += 1
            self._count(messages, len(body) + len(message["bytes"]))
            body += message["bytes"]
            t_first, t_last = t_first or arrived, arrived
        check_end(received[1].get("text"))
        if not body:
            raise RequestError(400, "empty body")
        reply = await run_in_threadpool(self.model.full, bytes(body), question)
        if start.frame_id:
            self.cache.put(self.client, start.frame_id, CachedFrame("full", bytes(body)))
        await self._send(FullFinal(**reply, received_bytes=len(body),
                                   receive_ms=to_ms(t_last - t_first), resumed=False))

    async def _progressive(self, start: Start):
        question, refine = start.question, start.refine
        # refine: answer every layer as it completes. Without it, answer once: when all the
        # announced layers are in, at the end of the stream, or when the uplink has been silent
        # for SILENT_CUT_S with layers unanswered (a cut link) - earlier answers would only delay it.
        stream = _ArrivingStream(self.model.split)
        answered, t_first, last, pending, messages = 0, None, None, None, 0

        async def answer(frame: Frame, arrived: float) -> dict:
            nonlocal answered, pending
            reply = await run_in_threadpool(self.model.progressive, frame, question)
            answered, pending = frame.k, None
            if start.frame_id:  # kept before the answer leaves: a follow-up may come at once
                self.cache.put(self.client, start.frame_id, CachedFrame(
                    "progressive", stream.complete_layers(), layers=stream.complete))
            await self._send(Refinement(layers=frame.k, answer=reply["answer"],
                                        confidence=reply.get("confidence"), stage_ms=reply["stage_ms"],
                                        received_ms=to_ms(arrived - t_first),
                                        t_ms=to_ms(time.perf_counter() - t_first)))
            return reply

        held = await self._held(start) if start.resume else None
        if held is not None:  # answered at once from the layers already here
            t_first = time.perf_counter()
            last = await answer(stream.feed(held.data), t_first)

        while True:
            cut_watch = pending is not None and not refine
            try:
                arrived, message = await (self._next(SILENT_CUT_S) if cut_watch
                                          else self._next_in_request())
            except _Idle:
                last = await answer(*pending)
                continue
            if message.get("bytes") is None:
                check_end(message.get("text"))
                if pending:
                    last = await answer(*pending)
                break
            messages += 1
            self._count(messages, stream.size + len(message["bytes"]))
            t_first = t_first or arrived
            frame = stream.feed(message["bytes"])
            if frame is not None and frame.k > answered:
                pending = (frame, arrived)
                if refine or frame.k == frame.layers_announced:
                    last = await answer(*pending)
        if last is None:
            raise RequestError(400, "bad bitstream: the stream ended before layer 1 was complete")
        await self._send(ProgressiveFinal(
            layers=answered, answer=last["answer"], confidence=last.get("confidence"),
            layers_announced=last["layers_announced"], partial=answered < last["layers_announced"],
            received_bytes=stream.size, resumed=held is not None))


class _ArrivingStream:
    """A bitstream as it arrives, parsed at a cost linear in its length: the header once it is
    complete, then the whole stream only when a message completes a layer (at most k times) or
    runs past the last one; the Frame parsed then is what the model answers from (nothing
    parses it again). The answers and errors are those of parsing the whole buffer after
    every message, which is what a client sending one byte per message used to cost."""

    def __init__(self, split: Split):
        self.split, self.buffer = split, bytearray()
        self.ends: list[int] | None = None  # where each announced layer ends, once the header is in
        self.complete = 0  # layers complete so far

    @property
    def size(self) -> int:
        return len(self.buffer)

    def complete_layers(self) -> bytes:
        """The header and the complete layers: what a conversation keeps of the stream."""
        return bytes(self.buffer[:self.ends[self.complete - 1]]) if self.complete else b""

    def feed(self, chunk: bytes) -> Frame | None:
        """The stream parsed, when this chunk completed a layer; None otherwise."""
        self.buffer += chunk
        if self.ends is None:
            try:  # the header alone: a bounded slice, whatever the buffer's size
                header = parse_header(bytes(self.buffer[:MAX_HEADER_BYTES]), self.split.fingerprint)
                self.split.check_header(header)
            except TruncatedStream:
                return None
            except BitstreamError as e:
                raise RequestError(400, f"bad bitstream: {e}") from None
            self.ends = header.layer_ends()
        more = self.complete < len(self.ends) and self.size >= self.ends[self.complete]
        if not more and self.size <= self.ends[-1]:
            return None
        frame = parse_frame(self.split, bytes(self.buffer))
        self.complete = frame.k
        return frame

