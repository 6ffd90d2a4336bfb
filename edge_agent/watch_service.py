"""The agent's video routes (added to the app of edge_agent/service.py): a clip or a live camera
played through the device to the cloud's stream, frame by frame.

    POST   /v1/watch                     multipart: `video` (GIF, MP4, WebM, … within
                                         progvlm.video.reader's limits) and WatchSettings' fields
                                         (`questions` repeated) → NDJSON: {"type": "frame",
                                         "record": …} per frame as it is answered, then
                                         {"type": "summary", …} (or {"type": "error", …})
    POST   /v1/watch/sessions            WatchSettings' fields → {"session": id} (a live camera:
                                         the page's webcam)
    POST   /v1/watch/sessions/{id}/frame multipart `image` → the frame's record
    DELETE /v1/watch/sessions/{id}       closes it; an idle session (SESSION_IDLE_S) closes itself

A frame takes the device's lock as a request does (one camera). Sessions are bounded
(MAX_SESSIONS); each holds one stream to the cloud.
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Annotated

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from progvlm.images import ImageInputError, load_image
from progvlm.video.reader import MAX_VIDEO_BYTES, VideoError, VideoTooLarge, read_video

from .errors import CloudError
from .watch import WatchSettings, Watcher, summarise

MAX_SESSIONS = 2
SESSION_IDLE_S = 30.0
PLAY_TIMEOUT_S = 3600.0  # a clip's whole play (MAX_FRAMES frames at most)


class WatchForm(WatchSettings):
    """POST /v1/watch's multipart body: the stream's settings (`questions` repeated) and the clip."""
    video: Annotated[UploadFile, File(description="a clip: GIF, MP4, WebM, … (progvlm.video.reader)")]


def _cloud(agent) -> tuple[str, str | None]:
    if agent.cloud is None:
        raise CloudError("this agent has no cloud (--cloud URL): a stream needs one")
    return agent.cloud.base_url, getattr(agent.cloud, "token", None)


class Sessions:
    """Live streams by id, at most MAX_SESSIONS, closed when idle for SESSION_IDLE_S."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, tuple[Watcher, float]] = {}

    def reap(self):
        now = time.monotonic()
        with self._lock:
            stale = [sid for sid, (_, seen) in self._open.items() if now - seen > SESSION_IDLE_S]
            watchers = [self._open.pop(sid)[0] for sid in stale]
        for w in watchers:
            w.close()

    def add(self, watcher: Watcher) -> str:
        self.reap()
        with self._lock:
            if len(self._open) >= MAX_SESSIONS:
                watcher.close()
                raise OverflowError(f"{MAX_SESSIONS} live streams are open: close one first")
            sid = secrets.token_hex(8)
            self._open[sid] = (watcher, time.monotonic())
        return sid

    def get(self, sid: str) -> Watcher | None:
        self.reap()
        with self._lock:
            if sid not in self._open:
                return None
            watcher = self._open[sid][0]
            self._open[sid] = (watcher, time.monotonic())
            return watcher

    def close(self, sid: str) -> bool:
        with self._lock:
            entry = self._open.pop(sid, None)
        if entry:
            entry[0].close()
        return entry is not None


def add_watch_routes(app: FastAPI, agent, run_in_thread, error_response, ndjson_lines, documented):
    """The routes above on `app`, using the service's own helpers: `run_in_thread(fn, *args)`
    (an awaitable), `error_response(e)` (the agent's error statuses), `ndjson_lines` and
    `documented(*statuses)` (the OpenAPI document's error responses)."""
    lines = {"description": "NDJSON lines: video, a frame record per frame, then summary (or error)",
             "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}
    sessions = Sessions()
    app.state.watch_sessions = sessions

    def frame(watcher: Watcher, image) -> dict:
        with agent.device_lock:
            return watcher.frame(image)

    def play(video, settings: WatchSettings, put):
        put({"type": "video", "frames": len(video.frames), "fps": video.fps,
             "size": list(video.size), "truncated": video.truncated})
        url, token = _cloud(agent)
        watcher = Watcher(agent.runtime, url, settings, token, profile=agent.profile)
        records = []
        try:
            for image in video.frames:
                records.append(frame(watcher, image))
                put({"type": "frame", "record": records[-1]})
        finally:
            watcher.close()
        put({"type": "summary", **summarise(records, settings)})

    @app.post("/v1/watch", responses={200: lines, **documented(400, 401, 403, 408, 413, 422)})
    async def watch(form: Annotated[WatchForm, Form(media_type="multipart/form-data")]):
        """A clip played through the device: NDJSON lines, a record per frame, then a summary."""
        settings = WatchSettings.model_validate(form.model_dump(exclude={"video"}))
        try:
            settings.check(agent.runtime.num_layers)
        except ValueError as e:
            return JSONResponse({"detail": str(e)}, status_code=422)
        data = await form.video.read(MAX_VIDEO_BYTES + 1)
        if len(data) > MAX_VIDEO_BYTES:
            return JSONResponse({"detail": f"video over the limit of {MAX_VIDEO_BYTES} bytes"},
                                status_code=413)
        try:  # a clip that cannot be played is a real status, before the stream starts
            video = await run_in_thread(read_video, data)
        except VideoTooLarge as e:
            return JSONResponse({"detail": str(e)}, status_code=413)
        except VideoError as e:
            return JSONResponse({"detail": f"bad video: {e}"}, status_code=400)
        deadline = time.monotonic() + PLAY_TIMEOUT_S
        return StreamingResponse(ndjson_lines(agent, deadline, lambda put: play(video, settings, put),
                                              ("summary",)), media_type="application/x-ndjson")

    @app.post("/v1/watch/sessions", responses=documented(400, 401, 403, 408, 409, 413, 422, 429, 502))
    async def open_session(settings: Annotated[WatchSettings, Form(media_type="multipart/form-data")]):
        """A live stream (a webcam): its frames come one request each."""
        try:
            settings.check(agent.runtime.num_layers)
            url, token = _cloud(agent)
            watcher = await run_in_thread(lambda: Watcher(agent.runtime, url, settings, token,
                                                          profile=agent.profile))
            return {"session": sessions.add(watcher)}
        except ValueError as e:
            return JSONResponse({"detail": str(e)}, status_code=422)
        except OverflowError as e:
            return JSONResponse({"detail": str(e)}, status_code=429)
        except Exception as e:  # noqa: BLE001 - the agent's statuses (502: cloud down, …)
            return error_response(e)

    @app.post("/v1/watch/sessions/{sid}/frame",
              responses=documented(400, 401, 403, 404, 408, 413, 422, 502, 503))
    async def session_frame(sid: str, image: Annotated[UploadFile, File()]):
        watcher = sessions.get(sid)
        if watcher is None:
            return JSONResponse({"detail": f"no live stream {sid} (closed, or idle for over "
                                           f"{SESSION_IDLE_S:g} s)"}, status_code=404)
        data = await image.read(MAX_VIDEO_BYTES + 1)
        try:
            picture = load_image(data)
            return await run_in_thread(frame, watcher, picture)
        except ImageInputError as e:
            return JSONResponse({"detail": f"bad image: {e}"}, status_code=400)
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    @app.delete("/v1/watch/sessions/{sid}", responses=documented(401, 403, 404))
    async def close_session(sid: str):
        if not sessions.close(sid):
            return JSONResponse({"detail": f"no live stream {sid}"}, status_code=404)
        return {"closed": sid}
