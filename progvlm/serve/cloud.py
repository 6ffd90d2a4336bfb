"""The cloud backend: the VLM's language half and the MAE decoder behind HTTP (FastAPI).

    GET  /healthz                  liveness (open, no token)
    GET  /v1/info                  VLM id, MAE fingerprint, L, N, D (the agent checks them at start)
    POST /v1/full?question=…       body: an image (JPEG from the edge) → the whole VLM
    POST /v1/progressive?question= body: a bitstream (layers 1..k, or a prefix of it) → MAE decode
                                   with the complete layers present → language half
    WS   /v1/progressive/stream    a session: requests in sequence on one socket, progressive
                                   (answered again after every layer as it arrives) or full

Every answer carries the cloud-side stage times (ms). Bodies are bounded (413); with a token
configured, /v1/* needs `Authorization: Bearer <token>` (401); bad input gets a 4xx with the
reason as a string `detail` (the OpenAPI document says so for every status), anything
unexpected a 500 with a one-line message (the traceback stays in the log). A client that goes
away is no error: one debug line.

The WebSocket refuses a browser page from an origin not in `allowed_origins` (403; clients that
send no Origin, like the edge agent, are not browsers). It bounds what one request may cost:
at most `max_body_bytes` and `max_stream_messages` messages, and no silence longer than
`idle_timeout_s` between its messages, nor longer than `request_timeout_s` in all (the edge's
link-time bound and a minute of compute: protocol.REQUEST_TIMEOUT_S); a kept-open socket idle for
`session_idle_s` between requests is closed (code 1000), and the client reconnects. Over HTTP,
a request's line and headers must arrive within http_limits.HEAD_TIMEOUT_S (HeadDeadline).

Concurrency: requests are received concurrently. By default (`CloudModel`) the model runs one
request at a time under a lock, first come first served: every stage time is one request's.
With `--batching` (`progvlm.serve.batching.BatchingCloudModel`) concurrent requests run as one batch
(MAE decode, prefill and greedy decoding together, after a wait of a few ms at most, and none
for a lone request); each answer then says its batch size and its `queue` time. Beyond one
process, `serve-cloud-ray` serves this same app on Ray Serve replicas (progvlm/serve/ray_serve.py).
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from ..codec.bitstream import MAX_HEADER_BYTES, BitstreamError, TruncatedStream, parse_header
from ..net.frame_cache import CachedFrame, FrameCache, check_frame_id
from ..net.http_limits import (READ_TIMEOUT_S, BoundedBody, CatchErrors, HeadDeadline, RequireToken,
                          TrustedHost, bearer_ok, bind_names)
from ..images import ImageInputError, load_image
from ..net.protocol import (FULL_PATH, INFO_PATH, KINDS, MAX_QUESTION_CHARS, PROGRESSIVE_PATH,
                       REQUEST_TIMEOUT_S, STREAM_PATH, check_question)
from ..split import Frame, Split

log = logging.getLogger("progvlm.cloud")

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 12-MP JPEG fits; a bitstream is ~100 bytes
TOKEN_ENV = "PROGVLM_CLOUD_TOKEN"
SILENT_CUT_S = 0.5  # an unrefined stream with layers still to come, silent this long: cut
IDLE_TIMEOUT_S = 10.0  # the most silence inside a request, or before a new socket's first message
SESSION_IDLE_S = 60.0  # a kept-open socket with no request for this long is closed
# messages per request: the default body limit in the link's 1000-byte chunks fits twice over
MAX_STREAM_MESSAGES = 16_384
MAX_CONTROL_CHARS = 4096  # a start or end message is a few dozen characters


class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1e3, 3)


class CloudModel:
    """The server's compute: decode what arrives, run the VLM, time every stage."""

    def __init__(self, split: Split):
        self.split = split
        self.fingerprint = split.fingerprint
        self._lock = threading.Lock()

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

    def _answer(self, stages: dict, fn, *args) -> dict:
        """{"answer", "confidence"}: the language half's text and how sure it was (None where
        the backend cannot tell)."""
        try:
            answer = fn(*args)
        except ValueError as e:  # e.g. a question longer than the model reads
            raise RequestError(400, str(e)) from None
        stages.update({k: round(v, 3) for k, v in answer.stage_ms.items()})
        return {"answer": answer.text, "confidence": getattr(answer, "confidence", None)}

    def _see(self, image_bytes: bytes):
        """A frame sent whole → its visual tokens, tile grid and the decode and vision times."""
        t0 = time.perf_counter()
        try:
            image = load_image(image_bytes)
        except ImageInputError as e:
            raise RequestError(400, f"bad image: {e}") from None
        t1 = time.perf_counter()
        tokens, grid = self.split.vlm.edge_half_with_grid(image)
        return tokens, grid, {"image_decode_ms": _ms(t0, t1), "vision_ms": _ms(t1, time.perf_counter())}

    def full(self, image_bytes: bytes, question: str) -> dict:
        with self._lock:
            tokens, grid, stages = self._see(image_bytes)
            said = self._answer(stages, self.split.language, tokens, question, grid)
            return {**said, "stage_ms": stages}

    def progressive(self, data: bytes, question: str) -> dict:
        with self._lock:
            try:
                frame = self.split.unpack(data)
            except BitstreamError as e:
                raise RequestError(400, f"bad bitstream: {e}") from None
            stages: dict = {}
            try:
                said = self._answer(stages, self.split.cloud, frame, question)
            except BitstreamError as e:
                raise RequestError(400, f"bad bitstream: {e}") from None
            return {**said, "stage_ms": stages, "layers_used": frame.k,
                    "layers_announced": frame.layers_announced, "partial": frame.partial}


# ---- the HTTP contract, as the OpenAPI document states it --------------------------------------
class ErrorBody(BaseModel):
    detail: str  # the reason, one line (every error status, validation included)


class FullAnswer(BaseModel):
    answer: str
    # how sure the language half was of its answer, in [0, 1] (null: the backend cannot tell)
    confidence: float | None = None
    stage_ms: dict[str, float]
    received_bytes: int
    receive_ms: float  # first byte to last as the cloud saw them


class ProgressiveAnswer(FullAnswer):
    layers_used: int
    layers_announced: int
    partial: bool


class Info(BaseModel):
    model_config = ConfigDict(extra="allow")  # the backend's own description rides along
    vlm_id: str
    mae_fingerprint: str
    num_layers: int
    num_tokens: int
    token_dim: int
    concurrency: str


_ERRORS = {
    400: "bad input: an unreadable image, a corrupt, foreign or truncated bitstream, an empty "
         "body, a question the model cannot read",
    401: "missing or wrong access token",
    403: "a request from a web page of another origin, or a Host that does not name this service",
    408: "the body stalled (no bytes for a read timeout) or took too long in all",
    413: "body over the limit",
    422: "no question, or one over the length limit",
    500: "unexpected error (the traceback is in the server's log)",
}


def _responses(ok: type[BaseModel], *statuses: int) -> dict:
    return {200: {"model": ok}, **{s: {"model": ErrorBody, "description": _ERRORS[s]} for s in statuses}}


def _binary_body(what: str) -> dict:
    return {"requestBody": {"required": True, "description": what, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


QUESTION = Query(description=f"the question (1–{MAX_QUESTION_CHARS} characters)",
                 min_length=1, max_length=MAX_QUESTION_CHARS)


def _validation_detail(errors) -> str:
    """FastAPI's list of validation errors as one line, so every 4xx has a string detail."""
    parts = []
    for e in errors:
        where, name = (e["loc"][0], e["loc"][-1]) if len(e["loc"]) > 1 else ("request", e["loc"][0])
        what = f"{where} parameter `{name}`"
        parts.append(f"{what} is required" if e["type"] == "missing" else f"{what}: {e['msg']}")
    return "; ".join(parts)


def _check_question(question, where: str = "query parameter `question`") -> str:
    try:
        return check_question(question, where)
    except ValueError as e:
        raise RequestError(422, str(e)) from None


async def _read_body(request: Request, limit: int) -> tuple[bytes, float]:
    """The body, and the ms from its first byte to its last as this side saw them: the sender
    cannot tell when a shaped link (or a kernel buffer in front of one) has delivered."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    t_first = None
    async for chunk in request.stream():
        if chunk and t_first is None:
            t_first = time.perf_counter()
        body += chunk
        if len(body) > limit:  # chunked uploads declare no length: count as they come
            raise RequestError(413, f"body over the limit of {limit} bytes")
    if not body:
        raise RequestError(400, "empty body")
    return bytes(body), _ms(t_first, time.perf_counter())


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def create_app(split: Split, token: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_origins=(),
               idle_timeout_s: float = IDLE_TIMEOUT_S, session_idle_s: float = SESSION_IDLE_S,
               max_stream_messages: int = MAX_STREAM_MESSAGES, model=None,
               read_timeout_s: float = READ_TIMEOUT_S, frame_cache: FrameCache | None = None,
               allowed_hosts=frozenset(), request_timeout_s: float = REQUEST_TIMEOUT_S) -> FastAPI:
    """The service. `allowed_origins`: browser origins (scheme://host[:port]) whose pages may
    open the WebSocket; none by default. `allowed_hosts`: names it answers to besides its
    addresses and localhost (http_limits.TrustedHost; bind_names() makes them). `frame_cache`: where conversations keep their frames
    (progvlm.net.frame_cache's bounds by default)."""
    model = model or CloudModel(split)  # or a progvlm.serve.batching.BatchingCloudModel
    app = FastAPI(title="progvlm cloud backend", version="1")
    app.state.model = model
    app.state.frame_cache = frame_cache if frame_cache is not None else FrameCache()
    app.state.stream_connections = 0  # sockets accepted on the stream (a session reuses one)
    limits = _StreamLimits(max_body_bytes, max_stream_messages, idle_timeout_s, session_idle_s,
                           request_timeout_s)
    allowed = {_normal_origin(o) for o in allowed_origins}
    # a body that stalls or crawls is cut with 408, one over the limit with 413 as it streams
    # (WebSocket messages have their own limits, below)
    app.add_middleware(BoundedBody, max_body_bytes=max_body_bytes, read_timeout_s=read_timeout_s)
    # (wrapped outside-in from the last added: the Host first, then the token and the Origin, both
    # before any body byte is read)
    app.add_middleware(RequireToken, token=token)
    app.add_middleware(TrustedHost, names=allowed_hosts)
    app.add_middleware(CatchErrors, log=log)

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):
        return JSONResponse({"detail": _validation_detail(e.errors())}, status_code=422)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get(INFO_PATH, responses=_responses(Info, 401, 403, 500))
    def info():
        cache = app.state.frame_cache.stats()
        return {**model.info(), "adaptive": adaptive_threshold(split),
                "frame_cache": {key: cache[key] for key in
                                ("ttl_s", "max_frames_per_client", "max_total_bytes")}}

    async def answer_body(request: Request, question: str, compute) -> dict:
        question = _check_question(question)
        try:
            body, receive_ms = await _read_body(request, max_body_bytes)
        except ClientDisconnect:
            log.debug("client went away before its body was complete (%s)", request.url.path)
            raise RequestError(400, "the client went away before its body was complete") from None
        return await run_in_threadpool(compute, body, question) | {
            "received_bytes": len(body), "receive_ms": receive_ms}

    @app.post(FULL_PATH, responses=_responses(FullAnswer, 400, 401, 403, 408, 413, 422, 500),
              openapi_extra=_binary_body("an image (JPEG, PNG, WebP, …): the whole VLM answers"))
    async def full(request: Request, question: str = QUESTION):
        return await answer_body(request, question, model.full)

    @app.post(PROGRESSIVE_PATH, responses=_responses(ProgressiveAnswer, 400, 401, 403, 408, 413, 422, 500),
              openapi_extra=_binary_body("a progvlm bitstream, or any prefix of one: the MAE "
                                         "decodes the complete layers present"))
    async def progressive(request: Request, question: str = QUESTION):
        return await answer_body(request, question, model.progressive)

    @app.websocket(STREAM_PATH)
    async def stream(ws: WebSocket):
        """A session of requests in sequence, each:
            {"question": str, "refine": bool = true, "kind": "progressive"|"full" = "progressive",
             "keep_open": bool = false, "frame_id": str = none, "resume": bool = false}  (text)
            the body in binary messages, as the link delivers it
            {"end": true}                 (text)
        A progressive request is answered after each newly complete layer with
        {"type": "refinement", "layers": j, "answer", "confidence", "stage_ms", "received_ms"
        (first byte to layer j complete), "t_ms"}; without refine, once: for the newest layer
        when all announced layers are in, the stream ends, or the uplink stays silent
        SILENT_CUT_S. Then {"type": "final", "layers", "answer", "confidence",
        "layers_announced", "partial", "received_bytes", "resumed"}. A full request (an image)
        gets {"type": "final", "answer", "confidence", "stage_ms", "received_bytes",
        "receive_ms", "resumed"}. After the final message the socket closes, unless the
        request said keep_open: then it waits for the next request. Bad input: {"type":
        "error", "status", "detail"} and the socket closes with code 4000 + status.

        Receiver-driven refinement (the edge's adaptive mode) needs nothing more: the edge
        sends a layer, reads its refinement (with its confidence), and then sends the next
        layer or the end.

        Conversations: a request with a `frame_id` leaves the frame's bytes (a stream's
        complete layers, or the image) in the cloud's bounded cache (progvlm.net.frame_cache),
        for this peer only. A request with "resume": true asks for them first, and the cloud
        answers at once with one of
            {"type": "resumed", "frame_id", "layers": j, "received_bytes"}  then, progressive:
                the refinement from those j layers (whatever refine says) and the request goes
                on as any other from byte `received_bytes` of the stream (more layers, or the
                end); full: the final answer, and the request is over (no body, no end)
            {"type": "missing", "frame_id", "detail"}  (evicted, expired, a restarted cloud,
                or never sent): the edge sends the frame from its start, as without resume."""
        await ws.accept()
        try:
            if not bearer_ok(ws.headers.get("authorization"), token):
                raise RequestError(401, "missing or wrong access token")
            origin = ws.headers.get("origin")
            if origin is not None and _normal_origin(origin) not in allowed:
                raise RequestError(403, f"a page from origin {origin} may not use this backend "
                                        "(allow it with --allow-origin)")
            app.state.stream_connections += 1
            # conversations' frames are this peer's alone (progvlm.net.frame_cache)
            client = ws.client.host if ws.client else "unknown"
            await _StreamSession(ws, model, limits, app.state.frame_cache, client).run()
        except RequestError as e:
            await _close_with_error(ws, e.status, e.detail, 4000 + e.status)
        except WebSocketDisconnect:
            log.debug("client went away from the stream")
        except Exception as e:
            log.exception("unexpected error in the stream")
            await _close_with_error(ws, 500, f"internal error: {type(e).__name__}: {e}", 1011)

    return app


async def _close_with_error(ws: WebSocket, status: int, detail: str, code: int):
    try:
        await ws.send_json({"type": "error", "status": status, "detail": detail})
        await ws.close(code=code)
    except (WebSocketDisconnect, OSError, RuntimeError):  # it went away meanwhile
        log.debug("client went away before its error (%d) was sent", status)


class _StreamLimits:
    def __init__(self, max_bytes: int, max_messages: int, idle_s: float, session_idle_s: float,
                 request_s: float):
        self.max_bytes, self.max_messages = max_bytes, max_messages
        self.idle_s, self.session_idle_s, self.request_s = idle_s, session_idle_s, request_s


class _Idle(Exception):
    pass


class _StreamSession:
    """One socket's requests, in sequence. A reader task stamps every message as it arrives,
    so that answering layer j (in a worker thread) neither delays reading layer j+1 nor
    inflates its measured arrival time; its queue is bounded, so a flood waits in the socket."""

    INBOX_MESSAGES = 256

    def __init__(self, ws: WebSocket, model: CloudModel, limits: _StreamLimits,
                 cache: FrameCache, client: str):
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
                start = _parse_start(message)
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

    async def _held(self, start: "_Start") -> CachedFrame | None:
        """For a request that asks to resume: the frame the cache holds for it, announced to the
        edge as resumed, or None, announced as missing."""
        held = self.cache.get(self.client, start.frame_id)
        if held is not None and held.kind == start.kind:
            await self.ws.send_json({"type": "resumed", "frame_id": start.frame_id,
                                     "layers": held.layers, "received_bytes": len(held.data)})
            return held
        await self.ws.send_json({"type": "missing", "frame_id": start.frame_id,
                                 "detail": "this cloud holds no such frame for this client "
                                           "(never sent, expired, evicted, or the cloud restarted): "
                                           "send it from its start"})
        return None

    async def _full(self, start: "_Start"):
        question = start.question
        held = await self._held(start) if start.resume else None
        if held is not None:
            reply = await run_in_threadpool(self.model.full, held.data, question)
            await self.ws.send_json({"type": "final", **reply, "received_bytes": 0,
                                     "receive_ms": 0.0, "resumed": True})
            return
        body, messages, t_first, t_last = bytearray(), 0, None, None
        while (received := await self._next_in_request())[1].get("bytes") is not None:
            arrived, message = received
            messages += 1
            self._count(messages, len(body) + len(message["bytes"]))
            body += message["bytes"]
            t_first, t_last = t_first or arrived, arrived
        _expect_end(received[1])
        if not body:
            raise RequestError(400, "empty body")
        reply = await run_in_threadpool(self.model.full, bytes(body), question)
        if start.frame_id:
            self.cache.put(self.client, start.frame_id, CachedFrame("full", bytes(body)))
        await self.ws.send_json({"type": "final", **reply, "received_bytes": len(body),
                                 "receive_ms": _ms(t_first, t_last), "resumed": False})

    async def _progressive(self, start: "_Start"):
        question, refine = start.question, start.refine
        # refine: answer every layer as it completes. Without it, answer once: when all the
        # announced layers are in, at the end of the stream, or when the uplink has been silent
        # for SILENT_CUT_S with layers unanswered (a cut link) - earlier answers would only delay it.
        stream = _ArrivingStream(self.model.split)
        answered, t_first, last, pending, messages = 0, None, None, None, 0

        async def answer(state):
            nonlocal answered, pending
            data, layers, arrived = state
            reply = await run_in_threadpool(self.model.progressive, data, question)
            answered, pending = layers, None
            if start.frame_id:  # kept before the answer leaves: a follow-up may come at once
                self.cache.put(self.client, start.frame_id, CachedFrame(
                    "progressive", stream.complete_layers(), layers=stream.complete))
            await self.ws.send_json({"type": "refinement", "layers": layers, "answer": reply["answer"],
                                     "confidence": reply.get("confidence"),
                                     "stage_ms": reply["stage_ms"], "received_ms": _ms(t_first, arrived),
                                     "t_ms": _ms(t_first, time.perf_counter())})
            return reply

        held = await self._held(start) if start.resume else None
        if held is not None:  # answered at once from the layers already here
            t_first = time.perf_counter()
            frame = stream.feed(held.data)
            last = await answer((stream.data(), frame.k, t_first))

        while True:
            cut_watch = pending is not None and not refine
            try:
                arrived, message = await (self._next(SILENT_CUT_S) if cut_watch
                                          else self._next_in_request())
            except _Idle:
                last = await answer(pending)
                continue
            if message.get("bytes") is None:
                _expect_end(message)
                if pending:
                    last = await answer(pending)
                break
            messages += 1
            self._count(messages, stream.size + len(message["bytes"]))
            t_first = t_first or arrived
            frame = stream.feed(message["bytes"])
            if frame is not None and frame.k > answered:
                pending = (stream.data(), frame.k, arrived)
                if refine or frame.k == frame.layers_announced:
                    last = await answer(pending)
        if last is None:
            raise RequestError(400, "bad bitstream: the stream ended before layer 1 was complete")
        await self.ws.send_json({"type": "final", "layers": answered, "answer": last["answer"],
                                 "confidence": last.get("confidence"),
                                 "layers_announced": last["layers_announced"],
                                 "partial": answered < last["layers_announced"],
                                 "received_bytes": stream.size, "resumed": held is not None})


class _ArrivingStream:
    """A bitstream as it arrives, parsed at a cost linear in its length: the header once it is
    complete, then the whole stream only when a message completes a layer (at most k times) or
    runs past the last one. The answers and errors are those of parsing the whole buffer after
    every message, which is what a client sending one byte per message used to cost."""

    def __init__(self, split: Split):
        self.split, self.buffer = split, bytearray()
        self.ends: list[int] | None = None  # where each announced layer ends, once the header is in
        self.complete = 0  # layers complete so far

    @property
    def size(self) -> int:
        return len(self.buffer)

    def data(self) -> bytes:
        return bytes(self.buffer)

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
        try:
            frame = self.split.unpack(self.data())
        except BitstreamError as e:
            raise RequestError(400, f"bad bitstream: {e}") from None
        self.complete = frame.k
        return frame


@dataclass
class _Start:
    kind: str
    question: str
    refine: bool
    keep_open: bool
    frame_id: str | None
    resume: bool


def _parse_start(message: dict) -> _Start:
    """A request's first message → _Start; RequestError if bad."""
    text = message.get("text")
    if text is None:
        raise RequestError(400, 'expected a JSON start message {"question": …} first, got binary data')
    if len(text) > MAX_CONTROL_CHARS:
        raise RequestError(413, f"start message of {len(text)} characters, at most {MAX_CONTROL_CHARS}")
    try:
        start = _control_json(text)
    except ValueError as e:
        raise RequestError(400, f"the start message is not JSON: {e}") from None
    if not isinstance(start, dict):
        raise RequestError(422, 'the start message must be a JSON object {"question": …}')
    question = _check_question(start.get("question"), "field `question`")
    flags = {}
    for name, default in (("refine", True), ("keep_open", False), ("resume", False)):
        flags[name] = start.get(name, default)
        if not isinstance(flags[name], bool):
            raise RequestError(422, f"{name} must be true or false (a JSON boolean), got "
                                    f"{flags[name]!r}")
    kind = start.get("kind", "progressive")
    if kind not in KINDS:
        raise RequestError(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    frame_id = start.get("frame_id")
    if frame_id is not None:
        try:
            check_frame_id(frame_id)
        except ValueError as e:
            raise RequestError(422, str(e)) from None
    if flags["resume"] and frame_id is None:
        raise RequestError(422, "resume needs the frame_id of the frame to resume")
    return _Start(kind, question, flags["refine"], flags["keep_open"], frame_id, flags["resume"])


def adaptive_threshold(split: Split) -> dict:
    """The confidence above which the edge's adaptive mode stops sending layers: the split's
    calibrated one (adaptive.json in the MAE folder), or progvlm.adaptive's documented default.
    {"threshold", "source"}."""
    threshold, source = split.adaptive_threshold()
    return {"threshold": threshold, "source": source}


def _control_json(text: str):
    """A control message's JSON, or ValueError: unparsable, or nested so deep that the parser
    would exhaust the stack (`[` × 2000 fits in MAX_CONTROL_CHARS)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _expect_end(message: dict):
    text = message.get("text") or ""
    try:
        end = len(text) <= MAX_CONTROL_CHARS and _control_json(text) == {"end": True}
    except ValueError:
        end = False
    if not end:
        raise RequestError(400, 'inside a request, expected binary data or {"end": true}, got '
                                f"{text[:80]!r}")


def open_access_warning(host: str) -> str:
    """What to tell whoever starts the service without a token."""
    local = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    who = ("any process on this machine" if local else
           "anyone who can reach this host on any of its addresses" if host in ("0.0.0.0", "::", "")
           else f"anyone who can reach this host at {host}")
    return (f"warning: {TOKEN_ENV} is not set: {who} can use this backend without a token; set "
            f"{TOKEN_ENV} (and give the edge agent the same) to require one")


def serve(host: str, port: int, token: str | None = None, vlm=None, mae=None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, threads: int = 1, log_level: str = "warning",
          allowed_origins=(), model_class=None, allowed_hosts=()):
    """Run the service for a VLM spec and an MAE folder (progvlm.split.load_split). One compute
    thread by default: on a host shared with the edge (the demo, the tests, the benchmark)
    more threads only steal the edge's core. `model_class`: CloudModel (default: one request at
    a time) or progvlm.serve.batching.BatchingCloudModel (concurrent requests as batches)."""
    import torch
    import uvicorn
    from ..split import load_split
    torch.set_num_threads(threads)
    split = load_split(vlm, mae)
    app = create_app(split, token, max_body_bytes, allowed_origins,
                     model=(model_class or CloudModel)(split),
                     allowed_hosts=bind_names(host, allowed_hosts))
    app.state.model.warm_up()
    # no single WebSocket message may be larger than a whole request may be
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=max_body_bytes + 1,
                http=HeadDeadline)
