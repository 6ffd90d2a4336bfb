"""A client of the edge agent's HTTP API (what the demo's UI calls). Its requests' fields are
edge_agent/request.py's (AskRequest, CompareRequest); a field not given is not sent, so the
agent's default applies."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx

from .request import AskRequest, CompareRequest, as_form


class EdgeAgentError(RuntimeError):
    """The agent refused or failed the request; str(e) is its reason."""


class EdgeAgentClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        """`token`: the agent's access token (its PROGVLM_AGENT_TOKEN), sent as a Bearer token."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def info(self) -> dict:
        """GET /v1/info: the agent's models, L (num_layers), modes and device profiles."""
        try:
            r = self._http.get("/v1/info")
        except httpx.HTTPError as e:
            raise EdgeAgentError(f"edge agent at {self.url} unreachable: {e}") from None
        if r.status_code != 200:
            raise EdgeAgentError(_reason(r))
        return r.json()

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

    def _lines(self, path: str, data: bytes, form: dict, until: str | None = None) -> Iterator[dict]:
        """The NDJSON lines of a streamed POST, up to (not including) a line of type `until`."""
        try:
            with self._http.stream("POST", path, files={"image": ("image", data)}, data=form) as r:
                if r.status_code != 200:
                    r.read()
                    raise EdgeAgentError(_reason(r))
                for line in r.iter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if item["type"] == "error":
                        raise EdgeAgentError(item["detail"])
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


def _bytes(image: str | Path | bytes) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _reason(r: httpx.Response) -> str:
    try:
        return f"{r.status_code}: {r.json()['detail']}"
    except (ValueError, KeyError):
        return f"{r.status_code}: {r.text[:300]}"
