"""A client of the edge agent's HTTP API (what the demo's UI calls)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx


class EdgeAgentError(RuntimeError):
    """The agent refused or failed the request; str(e) is its reason."""


class EdgeAgentClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        """`token`: the agent's access token (its PROGVLM_AGENT_TOKEN), sent as a Bearer token."""
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def info(self) -> dict:
        try:
            r = self._http.get("/v1/info")
        except httpx.HTTPError as e:
            raise EdgeAgentError(f"edge agent at {self.url} unreachable: {e}") from None
        if r.status_code != 200:
            raise EdgeAgentError(_reason(r))
        return r.json()

    @staticmethod
    def _form(question, mode, k, bandwidth_mbps, rtt_ms, budget_ms, cut_after_layer, device_profile,
              stream, conversation=False, adaptive_threshold=None, new_conversation=False) -> dict:
        form = {"question": question, "mode": mode, "bandwidth_mbps": str(bandwidth_mbps),
                "rtt_ms": str(rtt_ms), "stream": "true" if stream else "false",
                "conversation": "true" if conversation else "false",
                "new_conversation": "true" if new_conversation else "false"}
        for name, value in (("k", k), ("budget_ms", budget_ms), ("cut_after_layer", cut_after_layer),
                            ("device_profile", device_profile), ("adaptive_threshold", adaptive_threshold)):
            if value is not None:
                form[name] = str(value)
        return form

    def ask_stream(self, image: str | Path | bytes, question: str, mode: str = "progressive",
                   k: int | None = None, bandwidth_mbps: float = 1.0, rtt_ms: float = 20.0,
                   budget_ms: float | None = None, cut_after_layer: int | None = None,
                   device_profile: str | None = None, conversation: bool = False,
                   adaptive_threshold: float | None = None,
                   new_conversation: bool = False) -> Iterator[dict]:
        """Yield the agent's lines: {"type": "refinement", …} as layers are answered, then
        {"type": "result", "record": …}. Raises EdgeAgentError with the agent's reason.
        `conversation`: ask about the same image again and again, its bytes sent once
        (`new_conversation` on the first question: the frame is sent afresh)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form = self._form(question, mode, k, bandwidth_mbps, rtt_ms, budget_ms, cut_after_layer,
                          device_profile, True, conversation, adaptive_threshold, new_conversation)
        yield from self._lines("/v1/ask", data, form)

    def compare_stream(self, image: str | Path | bytes, question: str, modes, k: int | None = None,
                       bandwidth_mbps: float = 1.0, rtt_ms: float = 20.0, budget_ms: float | None = None,
                       device_profile: str | None = None) -> Iterator[dict]:
        """POST /v1/compare: every mode for one frame in one request. Yields the agent's events
        (reference, refinement, result, ladder) until done; raises EdgeAgentError with its reason."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form = {"question": question, "modes": ",".join(modes), "bandwidth_mbps": str(bandwidth_mbps),
                "rtt_ms": str(rtt_ms)}
        for name, value in (("k", k), ("budget_ms", budget_ms), ("device_profile", device_profile)):
            if value is not None:
                form[name] = str(value)
        yield from self._lines("/v1/compare", data, form, until="done")

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

    def ask(self, image, question: str, **options) -> dict:
        """The agent's record for one request."""
        for item in self.ask_stream(image, question, **options):
            if item["type"] == "result":
                return item["record"]
        raise EdgeAgentError("the agent's stream ended without a result")


def _reason(r: httpx.Response) -> str:
    try:
        return f"{r.status_code}: {r.json()['detail']}"
    except (ValueError, KeyError):
        return f"{r.status_code}: {r.text[:300]}"
