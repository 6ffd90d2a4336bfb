"""The edge agent as an HTTP service (FastAPI): what the demo's UI calls.

    GET  /healthz
    GET  /v1/info   runtime, device profile, model ids, the cloud it talks to and whether it answers
    POST /v1/ask    multipart: image (file), question, mode, k, bandwidth_mbps, rtt_ms, budget_ms,
                    cut_after_layer (fault injection), device_profile, stream
                    → one JSON record (edge_agent/agent.py); with stream=true, NDJSON lines:
                    {"type": "refinement", …} per layer as the cloud answers it, then
                    {"type": "result", "record": …} or {"type": "error", "status", "detail"}

Errors: a bad request → 422, a bad image → 400, an upload over the limit → 413, the cloud
down or refusing → 502 with its reason (full-edge still answers without a cloud), a cloud
running another VLM or MAE than this device → 409 naming both.
"""
from __future__ import annotations

import json
import queue
import threading

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from progvlm.images import ImageInputError

from .agent import AskError, CloudError, EdgeAgent, PairingError

MAX_UPLOAD_BYTES = 20 << 20


def _status(e: Exception) -> int:
    if isinstance(e, ImageInputError):
        return 400
    if isinstance(e, AskError):
        return 422
    if isinstance(e, CloudError):
        return 502
    if isinstance(e, PairingError):  # the cloud runs another VLM or MAE than this device
        return 409
    return 500


def _detail(e: Exception) -> str:
    if isinstance(e, (ImageInputError, AskError, CloudError, PairingError)):
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


def create_app(agent: EdgeAgent, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    app = FastAPI(title="progvlm edge agent", version="1")
    app.state.agent = agent

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/info")
    def info():
        rt = agent.runtime
        out = {"runtime": rt.name, "device_profile": agent.profile.name,
               "timing_source": agent.profile.source, **rt.info(),
               "cloud_url": agent.cloud.base_url if agent.cloud else None}
        if agent.cloud:
            try:
                out["cloud"] = agent.cloud.info()
            except CloudError as e:
                out["cloud_error"] = str(e)
        return out

    @app.post("/v1/ask")
    async def ask(request: Request, image: UploadFile = File(...), question: str = Form(...),
                  mode: str = Form("progressive"), k: int | None = Form(None),
                  bandwidth_mbps: float = Form(1.0), rtt_ms: float = Form(20.0),
                  budget_ms: float | None = Form(None), cut_after_layer: int | None = Form(None),
                  device_profile: str | None = Form(None), stream: bool = Form(False)):
        data = await image.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return JSONResponse({"detail": f"image upload over the limit of {max_upload_bytes} bytes"},
                                status_code=413)
        args = dict(image=data, question=question, mode=mode, k=k, bandwidth_mbps=bandwidth_mbps,
                    rtt_ms=rtt_ms, budget_ms=budget_ms, cut_after_layer=cut_after_layer,
                    device_profile=device_profile)
        if not stream:
            try:
                return await run_in_threadpool(agent.ask, **args)
            except Exception as e:  # every failure reaches the caller as a reason, not a trace
                return JSONResponse({"detail": _detail(e)}, status_code=_status(e))
        return StreamingResponse(_stream(agent, args), media_type="application/x-ndjson")

    return app


def _stream(agent: EdgeAgent, args: dict):
    """Run the request in a thread; yield its refinements as they arrive, then the record."""
    lines: queue.Queue = queue.Queue()

    def on_refinement(msg):
        lines.put({"type": "refinement", "layers": msg["layers"], "answer": msg["answer"],
                   "edge_t_ms": msg["edge_t_ms"]})

    def work():
        try:
            lines.put({"type": "result", "record": agent.ask(**args, on_refinement=on_refinement)})
        except Exception as e:
            lines.put({"type": "error", "status": _status(e), "detail": _detail(e)})

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = lines.get()
        yield json.dumps(item) + "\n"
        if item["type"] != "refinement":
            return
