"""The cloud backend: the VLM's language half and the MAE decoder behind HTTP (FastAPI).

    GET  /healthz                  liveness (open, no token)
    GET  /v1/info                  VLM id, MAE fingerprint, L, N, D (the agent checks them at start)
    POST /v1/full?question=…       body: an image (JPEG from the edge) → the whole VLM
    POST /v1/progressive?question= body: a bitstream (layers 1..k, or a prefix of it) → MAE decode
                                   with the complete layers present → language half
    WS   /v1/progressive/stream    a session: requests in sequence on one socket, progressive
                                   (answered again after every layer as it arrives) or full, in
                                   progvlm.net.protocol's messages (progvlm.serve.stream)
    WS   /v1/watch                 a camera's stream of frames (key/delta layers, JPEG or H.264),
                                   its standing questions answered per frame, changed answers
                                   pushed as events (progvlm.serve.watch)

Every answer carries the cloud-side stage times (ms). Bodies are bounded (413, by
http_limits.BoundedBody); with a token configured, /v1/* needs `Authorization: Bearer <token>`
(401, http_limits.RequireToken; the WebSocket checks it with http_limits.bearer_ok); bad
input gets a 4xx with the reason as a string `detail` (the OpenAPI document says so for every
status), anything unexpected a 500 with a one-line message (the traceback stays in the log). A
client that goes away is no error: one debug line.

The WebSocket refuses a browser page from an origin not in `allowed_origins` (403; clients that
send no Origin, like the edge agent, are not browsers). It bounds what one request may cost:
at most `max_body_bytes` and `max_stream_messages` messages, and no silence longer than
`idle_timeout_s` between its messages, nor longer than `request_timeout_s` in all (the edge's
link-time bound and a minute of compute: protocol.REQUEST_TIMEOUT_S); a kept-open socket idle for
`session_idle_s` between requests is closed (code 1000), and the client reconnects. Over HTTP,
a request's line and headers must arrive within http_limits.HEAD_TIMEOUT_S (HeadDeadline).

Concurrency: requests are received concurrently. By default (`CloudModel`, progvlm.serve.model)
the model runs one request at a time under a lock, first come first served: every stage time
is one request's. With `--batching` (`progvlm.serve.batching.BatchingCloudModel`) concurrent
requests run as one batch (MAE decode, prefill and greedy decoding together, after a wait of a
few ms at most, and none for a lone request); each answer then says its batch size and its `queue` time. Beyond one
process, `serve-cloud-ray` serves this same app on Ray Serve replicas (progvlm/serve/ray_serve.py).
"""
from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from ..net.frame_cache import FrameCache
from ..net.http_limits import READ_TIMEOUT_S, HeadDeadline, add_basics, add_guards, bind_names
from ..net.protocol import (FULL_PATH, INFO_PATH, MAX_QUESTION_CHARS, PROGRESSIVE_PATH,
                            REQUEST_TIMEOUT_S, STREAM_PATH, WATCH_IDLE_S, WATCH_PATH, Answered,
                            RequestError, check_question, to_ms)
from ..split import Split
from .model import CloudModel
from .stream import (IDLE_TIMEOUT_S, MAX_STREAM_MESSAGES, SESSION_IDLE_S, StreamLimits,
                     normal_origin, serve_stream)
from .watch import StreamCount, WatchCompute, serve_watch

__all__ = ["CloudModel", "RequestError", "create_app", "serve"]

log = logging.getLogger("progvlm.cloud")

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 12-MP JPEG fits; a bitstream is ~100 bytes
TOKEN_ENV = "PROGVLM_CLOUD_TOKEN"


# ---- the HTTP contract, as the OpenAPI document states it --------------------------------------
class ErrorBody(BaseModel):
    detail: str  # the reason, one line (every error status, validation included)


class FullAnswer(Answered):
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


async def _read_body(request: Request) -> tuple[bytes, float]:
    """The body (its size bounded by http_limits.BoundedBody while it arrives), and the ms from
    its first byte to its last as this side saw them: the sender cannot tell when a shaped link
    (or a kernel buffer in front of one) has delivered."""
    body = bytearray()
    t_first = None
    async for chunk in request.stream():
        if chunk and t_first is None:
            t_first = time.perf_counter()
        body += chunk
    if not body:
        raise RequestError(400, "empty body")
    return bytes(body), to_ms(time.perf_counter() - t_first)


def create_app(split: Split, token: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_origins=(),
               idle_timeout_s: float = IDLE_TIMEOUT_S, session_idle_s: float = SESSION_IDLE_S,
               max_stream_messages: int = MAX_STREAM_MESSAGES, model=None,
               read_timeout_s: float = READ_TIMEOUT_S, frame_cache: FrameCache | None = None,
               allowed_hosts=frozenset(), request_timeout_s: float = REQUEST_TIMEOUT_S,
               watch_idle_s: float = WATCH_IDLE_S) -> FastAPI:
    """The service. `allowed_origins`: browser origins (scheme://host[:port]) whose pages may
    open the WebSocket; none by default. `allowed_hosts`: names it answers to besides its
    addresses and localhost (http_limits.TrustedHost; bind_names() makes them). `frame_cache`:
    where conversations keep their frames (progvlm.net.frame_cache's bounds by default).
    `model`: the compute (CloudModel by default, or a progvlm.serve.batching.BatchingCloudModel)."""
    model = model or CloudModel(split)
    app = FastAPI(title="progvlm cloud backend", version="1")
    app.state.model = model
    app.state.frame_cache = frame_cache if frame_cache is not None else FrameCache()
    app.state.stream_connections = 0  # sockets accepted on the stream (a session reuses one)
    limits = StreamLimits(max_body_bytes, max_stream_messages, idle_timeout_s, session_idle_s,
                          request_timeout_s)
    allowed = frozenset(normal_origin(o) for o in allowed_origins)
    # (WebSocket messages have their own limits: StreamLimits)
    add_guards(app, token=token, max_body_bytes=max_body_bytes, read_timeout_s=read_timeout_s,
               allowed_hosts=allowed_hosts, log=log)

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    add_basics(app, _validation_detail)

    @app.get(INFO_PATH, responses=_responses(Info, 401, 403, 500))
    def info():
        cache = app.state.frame_cache.stats()
        return {**model.info(), "adaptive": adaptive_threshold(split),
                "frame_cache": {key: cache[key] for key in
                                ("ttl_s", "max_frames_per_client", "max_total_bytes")}}

    async def answer_body(request: Request, question: str, compute) -> dict:
        question = _check_question(question)
        try:
            body, receive_ms = await _read_body(request)
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
        await serve_stream(ws, app.state, limits, token, allowed)

    app.state.watch_compute = WatchCompute(model)
    app.state.watch_streams = StreamCount()

    @app.websocket(WATCH_PATH)
    async def watch(ws: WebSocket):
        await serve_watch(ws, app.state, token, allowed, max_body_bytes, watch_idle_s)

    return app


def adaptive_threshold(split: Split) -> dict:
    """The confidence above which the edge's adaptive mode stops sending layers: the split's
    calibrated one (adaptive.json in the MAE folder), or progvlm.adaptive's documented default.
    {"threshold", "source"}."""
    threshold, source = split.adaptive_threshold()
    return {"threshold": threshold, "source": source}


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
