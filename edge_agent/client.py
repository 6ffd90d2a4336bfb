"""A client of the edge agent's HTTP API (what the demo's UI calls). Its requests' fields are
edge_agent/request.py's (AskRequest, CompareRequest) and, for a video, edge_agent/watch.py's
(WatchSettings); a field not given is not sent, so the agent's default applies."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx

from .request import AskRequest, CompareRequest, as_form
from .watch import WatchSettings


class EdgeAgentError(RuntimeError):
    """The agent refused or failed the request; str(e) is its reason, `status` its HTTP status
    (None when the agent could not be reached)."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class EdgeAgentClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        """`token`: the agent's access token (its PROGVLM_AGENT_TOKEN), sent as a Bearer token."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def info(self) -> dict:
        """GET /v1/info: the agent's models, L (num_layers), modes and device profiles."""
        return self._json("GET", "/v1/info")

    def ask_stream(self, image: str | Path | bytes, question: str, **fields) -> Iterator[dict]:
        """Yield the agent's lines: {"type": "refinement", …} as layers are answered, then
        {"type": "result", "record": …}. `fields`: AskRequest's (mode, k, bandwidth_mbps, …;
        `conversation` asks about the same image again and again, its bytes sent once, and
        `new_conversation` on the first question sends the frame afresh). Raises EdgeAgentError
        with the agent's reason."""
        form = as_form(AskRequest, question=question, **fields, stream=True)
        yield from self._lines("/v1/ask", _bytes(image), form)

    def compare_stream(self, image: str | Path | bytes, question: str, modes, **fields) -> Iterator[dict]:
        """POST /v1/compare: every mode for one frame in one request (`fields`: CompareRequest's).
        Yields the agent's events (reference, refinement, result, ladder) until done; raises
        EdgeAgentError with its reason."""
        form = as_form(CompareRequest, question=question, modes=list(modes), **fields)
        yield from self._lines("/v1/compare", _bytes(image), form, until="done")

    # ---- a camera that watches (edge_agent/watch_service.py) ----------------------------------
    def watch_stream(self, video: str | Path | bytes, questions, **fields) -> Iterator[dict]:
        """POST /v1/watch: a clip (GIF, MP4, WebM, …) played through the device to the cloud with
        its standing `questions`. Yields the agent's lines: {"type": "video", …}, then
        {"type": "frame", "record": …} per frame as it is answered, then {"type": "summary", …}.
        `fields`: WatchSettings' (method, k, bandwidth_mbps, rtt_ms, fps, …). Raises
        EdgeAgentError with the agent's reason (a bad field, an unreadable video, …)."""
        yield from self._lines("/v1/watch", _bytes(video), _watch_form(questions, fields), field="video")

    def watch_open(self, questions, **fields) -> str:
        """POST /v1/watch/sessions: a live stream (a webcam) with its standing `questions` and
        WatchSettings' `fields`; returns its id (the agent closes it after SESSION_IDLE_S idle)."""
        return self._json("POST", "/v1/watch/sessions", data=_watch_form(questions, fields))["session"]

    def watch_frame(self, session: str, image: str | Path | bytes) -> dict:
        """POST /v1/watch/sessions/{session}/frame: one camera frame (an image file's bytes or
        path) → its record (index, kind, bytes, events, stage_ms, …). EdgeAgentError (with
        `status` 404) when the stream is closed or expired."""
        return self._json("POST", f"/v1/watch/sessions/{session}/frame",
                          files={"image": ("frame", _bytes(image))})

    def watch_close(self, session: str) -> bool:
        """DELETE /v1/watch/sessions/{session}: True if it was open (False: already closed)."""
        try:
            self._json("DELETE", f"/v1/watch/sessions/{session}")
        except EdgeAgentError as e:
            if e.status == 404:
                return False
            raise
        return True

    def _json(self, method: str, path: str, **kwargs) -> dict:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise EdgeAgentError(f"edge agent at {self.url} unreachable: {e}") from None
        if r.status_code != 200:
            raise EdgeAgentError(_reason(r), r.status_code)
        return r.json()

    def _lines(self, path: str, data: bytes, form: dict, until: str | None = None,
               field: str = "image") -> Iterator[dict]:
        """The NDJSON lines of a streamed POST (the file as `field`), up to (not including) a
        line of type `until`."""
        try:
            with self._http.stream("POST", path, files={field: (field, data)}, data=form) as r:
                if r.status_code != 200:
                    r.read()
                    raise EdgeAgentError(_reason(r), r.status_code)
                for line in r.iter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if item["type"] == "error":
                        raise EdgeAgentError(item["detail"], item.get("status"))
                    if item["type"] == until:
                        return
                    yield item
        except httpx.HTTPError as e:
            raise EdgeAgentError(f"edge agent at {self.url} unreachable: {e}") from None

    def ask(self, image, question: str, **fields) -> dict:
        """The agent's record for one request."""
        for item in self.ask_stream(image, question, **fields):
            if item["type"] == "result":
                return item["record"]
        raise EdgeAgentError("the agent's stream ended without a result")


def _watch_form(questions, fields: dict) -> dict:
    """WatchSettings' fields as a multipart form: `questions` repeated, one field each."""
    if isinstance(questions, str):
        questions = [questions]
    return {**as_form(WatchSettings, **fields), "questions": list(questions)}


def _bytes(image: str | Path | bytes) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _reason(r: httpx.Response) -> str:
    try:
        return f"{r.status_code}: {r.json()['detail']}"
    except (ValueError, KeyError):
        return f"{r.status_code}: {r.text[:300]}"
