"""The edge agent as an HTTP service (FastAPI): what the demo's UI calls.

    GET  /healthz   open
    GET  /v1/info   runtime, device profile, model ids, L (num_layers), the modes, the device
                    profiles, the cloud it talks to and whether it answers (what the page builds from)
    POST /v1/ask    multipart: image (file) and the fields of edge_agent/request.py's AskRequest
                    (question, mode, k, bandwidth_mbps, rtt_ms, budget_ms, stream, …: their
                    defaults, ranges and meaning declared there, and in the OpenAPI document)
                    → one JSON record (edge_agent/agent.py); with stream=true, NDJSON lines:
                    {"type": "refinement", …} per layer as the cloud answers it, then
                    {"type": "result", "record": …} or {"type": "error", "status", "detail"}
    POST /v1/compare  CompareRequest's fields: `modes` (comma-separated) instead of mode; every mode
                    for one frame, the device's work done once; NDJSON lines reference,
                    refinement/result per mode, the ladder k = 1..L, then done (the demo's Run)
    POST /v1/watch, /v1/watch/sessions…  a clip or a live camera through the device to the
                    cloud's stream, standing questions' events per frame (edge_agent/watch_service.py)

With a token configured, /v1/* needs `Authorization: Bearer <token>`; a request a browser sends
from another origin is refused (progvlm.net.http_limits). Every error is `{"detail": "<reason>"}`:
400 an unreadable image, 401 no or a wrong token, 403 cross-origin, 408 a body that stalls,
409 a cloud running another VLM or MAE than this device (naming both), 413 a body or image over
the limit, 422 a field missing, malformed or out of range (the range named), 502 the cloud down
or refusing (full-edge still answers without a cloud), 503 the device busy until the request's
deadline, 504 the deadline passed. A stream starts only once the whole request has been checked,
so only a failure during the work itself arrives as an NDJSON error line.

Work runs in daemon threads awaited with the request's deadline: no request holds up shutdown
(uvicorn's graceful-shutdown timeout cancels the await; the interpreter does not wait for the
thread).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from progvlm.images import ImageInputError
from progvlm.net.http_limits import READ_TIMEOUT_S, add_basics, add_guards

from .agent import EdgeAgent
from .errors import AskError, BusyError, CloudError, DeadlineError, PairingError
from .request import AskRequest, CompareRequest, reasons
from .watch_service import add_watch_routes

log = logging.getLogger("edge_agent")

MAX_UPLOAD_BYTES = 20 << 20
FORM_FIELDS_BYTES = 64 << 10  # room for the form's other fields and the multipart framing
SETTLE_S = 0.5


def _image():
    return File(description="the camera frame: an image file (PNG, JPEG, …) or, with image_format "
                            "rgb24, its raw pixels")


class AskForm(AskRequest):
    """POST /v1/ask's multipart body: the request's fields (edge_agent/request.py) and the image."""
    image: Annotated[UploadFile, _image()]


class CompareForm(CompareRequest):
    """POST /v1/compare's multipart body: the request's fields and the image."""
    image: Annotated[UploadFile, _image()]


class ErrorDetail(BaseModel):
    """Every error this service answers: the reason, as one sentence."""
    detail: str


ERRORS = {
    400: "The image cannot be read (not an image, truncated, too many pixels), or the multipart "
         "body cannot be parsed.",
    401: "No or a wrong access token (`Authorization: Bearer <token>`).",
    403: "A cross-origin request (an `Origin` header naming another host), or a `Host` that does "
         "not name this service (DNS rebinding): not served.",
    408: "The request body stalled past the read timeout, or took too long in all.",
    409: "The cloud runs another VLM or MAE than this device.",
    404: "No such live stream (closed, or idle past its timeout).",
    413: "The body or the image is over the limit.",
    422: "A field is missing, malformed or out of range; the message names the field and range.",
    429: "Too many live streams are open.",
    502: "The cloud backend is unreachable or refused the request.",
    503: "The device stayed busy with other requests until this request's deadline.",
    504: "The request's deadline passed.",
}


def _documented(*statuses: int) -> dict:
    return {s: {"model": ErrorDetail, "description": ERRORS[s]} for s in statuses}


def _status(e: Exception) -> int:
    for kind, status in ((ImageInputError, 400), (AskError, 422), (CloudError, 502),
                         (PairingError, 409), (BusyError, 503), (DeadlineError, 504)):
        if isinstance(e, kind):
            return status
    return 500


def _detail(e: Exception) -> str:
    if _status(e) != 500:
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


def _error(e: Exception) -> JSONResponse:
    return JSONResponse({"detail": _detail(e)}, status_code=_status(e))


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn, *args, **kwargs) -> asyncio.Future:
    """fn(*args) in a daemon thread of its own, as a future of `loop`. Unlike the thread pool's
    workers, such a thread neither holds up the interpreter's exit nor an awaiting task's
    cancellation: shutdown never waits on a request."""
    future = loop.create_future()

    def settle(result, error):
        if not future.done():  # (cancelled: nobody waits any more)
            future.set_exception(error) if error else future.set_result(result)

    def work():
        try:
            result, error = fn(*args, **kwargs), None
        except Exception as e:  # noqa: BLE001 - handed to the awaiting request as it is
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: the server has shut down

    threading.Thread(target=work, daemon=True, name=f"edge-{fn.__name__}").start()
    return future


async def _within(future: asyncio.Future, deadline: float, timeout_s: float):
    """The future's result, or DeadlineError once the deadline (and a moment for the work to
    report its own reason for missing it, e.g. a busy device) has passed."""
    remaining = deadline + SETTLE_S - time.monotonic()
    try:
        return await asyncio.wait_for(future, max(remaining, 0.0))
    except asyncio.TimeoutError:
        raise DeadlineError(f"the request did not finish within its deadline of {timeout_s:g} s") from None


def create_app(agent: EdgeAgent, max_upload_bytes: int = MAX_UPLOAD_BYTES, token: str | None = None,
               read_timeout_s: float = READ_TIMEOUT_S, allowed_hosts=frozenset()) -> FastAPI:
    """The service for `agent`. `token`: required of every /v1/* request when set.
    `allowed_hosts`: names it answers to besides its addresses and localhost
    (progvlm.net.http_limits.TrustedHost)."""
    app = FastAPI(title="progvlm edge agent", version="1",
                  description="The camera device's side of progvlm. Every error is "
                              "`{\"detail\": \"<reason>\"}`.")
    app.state.agent = agent
    add_guards(app, token=token, max_body_bytes=max_upload_bytes + FORM_FIELDS_BYTES,
               read_timeout_s=read_timeout_s, allowed_hosts=allowed_hosts, log=log)

    add_basics(app, reasons)

    @app.get("/v1/info", responses=_documented(401, 403))
    async def info():
        out = agent.info()
        if agent.cloud:
            try:
                out["cloud"] = await _in_daemon_thread(asyncio.get_running_loop(), agent.cloud.info)
            except CloudError as e:
                out["cloud_error"] = str(e)
        return out

    ok = {"description": "The record (application/json), or with stream=true NDJSON lines.",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/x-ndjson": {"schema": {"type": "string"}}}}

    async def read_upload(form) -> bytes | JSONResponse:
        """The image's bytes, or the 413 for one over the limit."""
        data = await form.image.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return JSONResponse({"detail": f"image upload over the limit of {max_upload_bytes} bytes"},
                                status_code=413)
        return data

    async def check_within(check, data: bytes, form, request: Request):
        """`check(data, form, client)` in a daemon thread, within a fresh request's deadline."""
        client = request.client.host if request.client else "unknown"
        return await _within(_in_daemon_thread(asyncio.get_running_loop(), check, data, form, client),
                             time.monotonic() + agent.request_timeout_s, agent.request_timeout_s)

    @app.post("/v1/ask", responses={200: ok, **_documented(400, 401, 403, 408, 409, 413, 422,
                                                           502, 503, 504)})
    async def ask(request: Request, form: Annotated[AskForm, Form(media_type="multipart/form-data")]):
        data = await read_upload(form)
        if isinstance(data, JSONResponse):
            return data
        try:  # everything checkable, before any work and before a stream starts
            checked_ask = await check_within(agent.checked, data, form, request)
            if not form.stream:
                return await _within(_in_daemon_thread(asyncio.get_running_loop(), agent.run, checked_ask),
                                     checked_ask.deadline, agent.request_timeout_s)
        except Exception as e:  # every failure reaches the caller as a reason, not a trace
            return _error(e)
        return StreamingResponse(_ndjson(agent, checked_ask), media_type="application/x-ndjson")

    events = {"description": "NDJSON lines: reference, refinement and result per mode, ladder, "
                             "then done (or error)",
              "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}

    @app.post("/v1/compare", responses={200: events, **_documented(400, 401, 403, 408, 409, 413, 422,
                                                                   502, 503, 504)})
    async def compare(request: Request,
                      form: Annotated[CompareForm, Form(media_type="multipart/form-data")]):
        """Every mode for one frame and question in one request, the device's work on the frame
        done once; the compression ladder k = 1..L from one progressive stream's per-layer
        answers (what the demo page asks per Run)."""
        data = await read_upload(form)
        if isinstance(data, JSONResponse):
            return data
        try:
            checked_ask, modes = await check_within(agent.checked_compare, data, form, request)
        except Exception as e:  # noqa: BLE001 - every failure reaches the caller as a reason
            return _error(e)
        return StreamingResponse(_compare_ndjson(agent, checked_ask, modes),
                                 media_type="application/x-ndjson")

    add_watch_routes(app, agent, lambda fn, *args: _in_daemon_thread(asyncio.get_running_loop(), fn, *args),
                     _error, _ndjson_lines, _documented)
    return app


async def _ndjson_lines(agent: EdgeAgent, deadline: float, work, last_types: tuple[str, ...]):
    """Run `work(put)` in a daemon thread and yield each item it puts as an NDJSON line, up to
    one whose type is in `last_types` (or the error that ended the work), never past the
    request's deadline."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()

    def put(item):
        try:
            loop.call_soon_threadsafe(lines.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: the server has shut down

    def guarded():
        try:
            work(put)
        except Exception as e:  # noqa: BLE001 - reaches the caller as its line
            put({"type": "error", "status": _status(e), "detail": _detail(e)})

    threading.Thread(target=guarded, daemon=True, name="edge-stream").start()
    while True:
        try:
            item = await _within(lines.get(), deadline, agent.request_timeout_s)
        except DeadlineError as e:
            item = {"type": "error", "status": 504, "detail": str(e)}
        yield json.dumps(item) + "\n"
        if item["type"] in last_types + ("error",):
            return


def _compare_ndjson(agent: EdgeAgent, checked, modes: list[str]):
    """agent.compare's events as lines, then done (or the error)."""
    def work(put):
        agent.compare(checked, modes, on_event=put)
        put({"type": "done"})
    return _ndjson_lines(agent, checked.deadline, work, ("done",))


def _ndjson(agent: EdgeAgent, checked):
    """The checked request's refinements as they arrive, then its record (or the error)."""
    def work(put):
        def on_refinement(msg):
            put({"type": "refinement", "layers": msg["layers"], "answer": msg["answer"],
                 "confidence": msg.get("confidence"), "edge_t_ms": msg["edge_t_ms"]})
        put({"type": "result", "record": agent.run(checked, on_refinement=on_refinement)})
    return _ndjson_lines(agent, checked.deadline, work, ("result",))
