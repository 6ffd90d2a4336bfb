"""The cloud backend: the VLM's language half and the MAE decoder behind HTTP (FastAPI).

    GET  /healthz                  liveness (open, no token)
    GET  /v1/info                  VLM id, MAE fingerprint, L, N, D (the agent checks them at start)
    POST /v1/full?question=…       body: an image (JPEG from the edge) → the whole VLM
    POST /v1/progressive?question= body: a bitstream (layers 1..k, or a prefix of it) → MAE decode
                                   with the complete layers present → language half
    WS   /v1/progressive/stream    the same, answered again after every layer as it arrives

Every answer carries the cloud-side stage times (ms). Bodies are bounded (413); with a token
configured, /v1/* needs `Authorization: Bearer <token>` (401); bad input gets a 4xx with the
reason, anything unexpected a 500 with a one-line message (the traceback stays in the log).

Concurrency: requests are received concurrently; the model runs one request at a time under a
lock (first come, first served). A CPU model gains little from running requests side by side,
and one at a time keeps every stage time honest.
"""
from __future__ import annotations

import asyncio
import hmac
import io
import logging
import threading
import time

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .bitstream import BitstreamError, TruncatedStream
from .images import ImageInputError, load_image
from .split import Split

log = logging.getLogger("progvlm.cloud")

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 12-MP JPEG fits; a bitstream is ~100 bytes
TOKEN_ENV = "PROGVLM_CLOUD_TOKEN"
MAX_QUESTION_CHARS = 500
SILENT_CUT_S = 0.5  # an unrefined stream with layers still to come, silent this long: cut


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

    def _answer(self, stages: dict, fn, *args) -> str:
        try:
            answer = fn(*args)
        except ValueError as e:  # e.g. a question longer than the model reads
            raise RequestError(400, str(e)) from None
        stages.update({k: round(v, 3) for k, v in answer.stage_ms.items()})
        return answer.text

    def full(self, image_bytes: bytes, question: str) -> dict:
        with self._lock:
            t0 = time.perf_counter()
            try:
                image = load_image(image_bytes)
            except ImageInputError as e:
                raise RequestError(400, f"bad image: {e}") from None
            t1 = time.perf_counter()
            tokens, grid = self.split.vlm.edge_half_with_grid(image)
            stages = {"image_decode_ms": _ms(t0, t1), "vision_ms": _ms(t1, time.perf_counter())}
            text = self._answer(stages, self.split.language, tokens, question, grid)
            return {"answer": text, "stage_ms": stages}

    def progressive(self, data: bytes, question: str) -> dict:
        with self._lock:
            try:
                frame = self.split.unpack(data)
            except BitstreamError as e:
                raise RequestError(400, f"bad bitstream: {e}") from None
            stages: dict = {}
            try:
                text = self._answer(stages, self.split.cloud, frame, question)
            except BitstreamError as e:
                raise RequestError(400, f"bad bitstream: {e}") from None
            return {"answer": text, "stage_ms": stages, "layers_used": frame.k,
                    "layers_announced": frame.layers_announced, "partial": frame.partial}


def _check_question(question: str | None) -> str:
    if question is None or not question.strip():
        raise RequestError(422, "a question is required (query parameter `question`)")
    if len(question) > MAX_QUESTION_CHARS:
        raise RequestError(422, f"question too long: {len(question)} characters, at most "
                                f"{MAX_QUESTION_CHARS}")
    return question


def _authorised(header: str | None, token: str | None) -> bool:
    if not token:
        return True
    return header is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


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


def create_app(split: Split, token: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    model = CloudModel(split)
    app = FastAPI(title="progvlm cloud backend", version="1")
    app.state.model = model

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):
        log.exception("unexpected error")
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not _authorised(
                request.headers.get("authorization"), token):
            return JSONResponse({"detail": "missing or wrong access token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/info")
    def info():
        return model.info()

    async def answer_body(request: Request, question: str | None, compute) -> dict:
        question = _check_question(question)
        body, receive_ms = await _read_body(request, max_body_bytes)
        return await run_in_threadpool(compute, body, question) | {
            "received_bytes": len(body), "receive_ms": receive_ms}

    @app.post("/v1/full")
    async def full(request: Request, question: str | None = Query(None)):
        return await answer_body(request, question, model.full)

    @app.post("/v1/progressive")
    async def progressive(request: Request, question: str | None = Query(None)):
        return await answer_body(request, question, model.progressive)

    @app.websocket("/v1/progressive/stream")
    async def progressive_stream(ws: WebSocket):
        """Text message {"question": …, "refine": true|false}; then the bitstream in binary messages, as the link
        delivers it; then {"end": true}. With refine (the default), after each newly complete
        layer the server sends
        {"type": "refinement", "layers": j, "answer", "stage_ms", "received_ms" (first byte to
        layer j complete), "t_ms"}; without, one such message for the newest layer once all
        announced layers are in, the stream ends, or the uplink stays silent SILENT_CUT_S; at the end
        {"type": "final", …, "partial"}; on bad input {"type": "error", "status", "detail"}."""
        await ws.accept()
        if not _authorised(ws.headers.get("authorization"), token):
            await ws.send_json({"type": "error", "status": 401, "detail": "missing or wrong access token"})
            await ws.close(code=4401)
            return
        try:
            await _stream_session(ws, model, max_body_bytes)
        except WebSocketDisconnect:
            pass  # the edge went away (a cut link): nothing left to answer to
        except RequestError as e:
            await ws.send_json({"type": "error", "status": e.status, "detail": e.detail})
            await ws.close(code=4000 + e.status)

    return app


async def _stream_session(ws: WebSocket, model: CloudModel, limit: int):
    first = await ws.receive_json()
    question = _check_question(first.get("question") if isinstance(first, dict) else None)
    # refine (default): answer every layer as it completes. Without it, answer once: when all
    # the announced layers are in, at the end of the stream, or when the uplink has been silent
    # for SILENT_CUT_S with layers unanswered (a cut link) - earlier answers would only delay it.
    refine = bool(first.get("refine", True))
    # A reader task stamps every message as it arrives, so that answering layer j (in a worker
    # thread) neither delays reading layer j+1 nor inflates its measured arrival time.
    inbox: asyncio.Queue = asyncio.Queue()

    async def read():
        while True:
            message = await ws.receive()
            await inbox.put((time.perf_counter(), message))
            if message["type"] == "websocket.disconnect" or message.get("bytes") is None:
                return
    reader = asyncio.create_task(read())
    buffer, answered, t_first, last, pending = bytearray(), 0, None, None, None

    async def answer(state):
        nonlocal answered, pending
        data, layers, arrived = state
        reply = await run_in_threadpool(model.progressive, data, question)
        answered, pending = layers, None
        await ws.send_json({"type": "refinement", "layers": layers, "answer": reply["answer"],
                            "stage_ms": reply["stage_ms"], "received_ms": _ms(t_first, arrived),
                            "t_ms": _ms(t_first, time.perf_counter())})
        return reply
    try:
        while True:
            try:
                wait = SILENT_CUT_S if pending and not refine else None
                arrived, message = await asyncio.wait_for(inbox.get(), wait)
            except asyncio.TimeoutError:
                last = await answer(pending)
                continue
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is None:  # a text message: the end of the stream
                if pending:
                    last = await answer(pending)
                break
            t_first = t_first or arrived
            buffer += message["bytes"]
            if len(buffer) > limit:
                raise RequestError(413, f"stream over the limit of {limit} bytes")
            try:
                stream = _parse_prefix(bytes(buffer), model)
            except TruncatedStream:
                continue
            layers = stream.k
            if layers > answered:
                pending = (bytes(buffer), layers, arrived)
                if refine or layers == stream.layers_announced:
                    last = await answer(pending)
    finally:
        reader.cancel()
    if last is None:
        raise RequestError(400, "bad bitstream: the stream ended before layer 1 was complete")
    await ws.send_json({"type": "final", "layers": answered, "answer": last["answer"],
                        "layers_announced": last["layers_announced"],
                        "partial": answered < last["layers_announced"], "received_bytes": len(buffer)})
    await ws.close()


def _parse_prefix(data: bytes, model: CloudModel):
    try:
        return model.split.unpack(data)
    except TruncatedStream:
        raise
    except BitstreamError as e:
        raise RequestError(400, f"bad bitstream: {e}") from None


def serve(host: str, port: int, token: str | None = None, vlm=None, mae=None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, threads: int = 1, log_level: str = "warning"):
    """Run the service for a VLM spec and an MAE folder (progvlm.split.load_split). One compute
    thread by default: on a host shared with the edge (the demo, the tests, the benchmark)
    more threads only steal the edge's core."""
    import torch
    import uvicorn
    from .split import load_split
    torch.set_num_threads(threads)
    app = create_app(load_split(vlm, mae), token, max_body_bytes)
    app.state.model.warm_up()
    uvicorn.run(app, host=host, port=port, log_level=log_level)
