"""HTTP hardening shared by the cloud backend and the edge agent (plain ASGI, any framework):

    check_bind    refuse to listen beyond loopback without an access token, unless told to
    CatchErrors   an unexpected exception → a 500 with a one-line detail, the connection kept
    TrustedHost   only requests that name this service in `Host` (403 otherwise): an IP
                  address, localhost, or a name it was told it has. A page on another domain
                  that rebinds its name to this machine (DNS rebinding) names its own domain
    RequireToken  `Authorization: Bearer <token>` on every path but the open ones (401), and no
                  cross-origin browser request at all (403): these are APIs for programs
    HeadDeadline  uvicorn's HTTP protocol with a deadline on a request's line and headers
    BoundedBody   a request body bounded while it streams (413 at once for a declared length
                  over the limit, else as soon as the bytes counted pass it) and read against a
                  timeout (408 when it stalls or takes too long in all)

The services add the middlewares with `app.add_middleware(...)`; neither adds CORS headers, so a
browser never hands a page another origin's answer.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import time
from urllib.parse import urlsplit

import anyio
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import close_code

OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs"})  # nothing secret in any of them
READ_TIMEOUT_S = 10.0  # the longest a client may leave a started body silent
BODY_TIMEOUT_S = 60.0  # the longest a whole body may take to arrive
HEAD_TIMEOUT_S = 10.0  # the longest a request line and headers may take to arrive


class OpenBindError(ValueError):
    """A service asked to listen beyond loopback with no access token; str(e) says what to do."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; any other name or address (0.0.0.0 and :: included)
    may be reachable from elsewhere."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None, allow_open: bool,
               token_env: str = "the service's token variable") -> None:
    """Raise OpenBindError for a non-loopback `host` without a token, unless `allow_open`."""
    if token or allow_open or is_loopback(host):
        return
    raise OpenBindError(f"refusing to serve on {host or 'every interface'!s} without an access "
                        f"token: anyone who reaches the port could use this service. Set "
                        f"{token_env} (clients then send 'Authorization: Bearer <token>'), or "
                        "pass --allow-open to serve without one on purpose")


def host_allowed(host: str | None, names=frozenset()) -> bool:
    """Whether a `Host` header (name[:port]) names this service: any IP address literal, a
    loopback name (localhost, *.localhost), or one of `names` (lower case). A DNS-rebinding
    page can only reach a service under a domain name of its own, never under an address:
    this is the rule development servers that face browsers apply (Vite's allowedHosts)."""
    if not host:
        return False
    try:
        parts = urlsplit("//" + host.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        name = (parts.hostname or "").rstrip(".")
    except ValueError:  # e.g. a bad port or an unclosed IPv6 bracket
        return False
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in names:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def bind_names(host: str, extra=()) -> frozenset[str]:
    """The names a service bound to `host` answers to beyond addresses and localhost: `host`
    itself when it is a name, and `extra` (--allow-host: a reverse proxy's or a board's name)."""
    names = {n.strip().lower().rstrip(".") for n in extra if n and n.strip()}
    if host and not is_loopback(host):
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            names.add(host.strip().lower().rstrip("."))
    return frozenset(names)


def add_guards(app, *, token: str | None, max_body_bytes: int, read_timeout_s: float,
               allowed_hosts, log) -> None:
    """The guards both services run, in this order from the outside in (Starlette wraps the
    last added outermost): an unexpected error kept to a 500 (CatchErrors), the Host
    (TrustedHost), the token and the Origin (RequireToken), all before any body byte is read,
    then the body itself (BoundedBody: 413 over the limit, 408 when it stalls)."""
    app.add_middleware(BoundedBody, max_body_bytes=max_body_bytes, read_timeout_s=read_timeout_s)
    app.add_middleware(RequireToken, token=token)
    app.add_middleware(TrustedHost, names=allowed_hosts)
    app.add_middleware(CatchErrors, log=log)


def add_basics(app, one_sentence) -> None:
    """What both services answer alike: the open liveness route (GET /healthz) and every
    validation error as one 422 `{"detail": one_sentence(errors)}` (FastAPI's own lists them
    as objects; these services' errors have one shape)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def invalid(_, e: RequestValidationError):
        return JSONResponse({"detail": one_sentence(e.errors())}, status_code=422)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"], name="healthz")


def add_allow_host(parser) -> None:
    """The --allow-host option of every command that serves HTTP (argparse)."""
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name clients may use in the Host header besides the "
                             "service's addresses and localhost (a reverse proxy's or a board's "
                             "name); repeatable. Other names get 403: a web page cannot reach the "
                             "service by rebinding its own domain to this machine")


def bearer_ok(header: str | None, token: str | None) -> bool:
    """Whether an Authorization header carries `token` (always, when no token is configured)."""
    if not token:
        return True
    return header is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_error(send, status: int, detail: str, headers: tuple = ()):
    """A JSON `{"detail": …}` response that closes the connection: the rest of a refused body
    is never read, so the connection cannot carry another request."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class CatchErrors:
    """Any exception the app raises over HTTP becomes a 500 `{"detail": "internal error: …"}`
    (the traceback goes to `log`) and the kept-alive connection stays usable: an exception
    re-raised to the server (as Starlette's handler for Exception does) makes it drop the
    connection, and a client's next request on it fails with a read error."""

    def __init__(self, app, log):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - answered, logged
            self.log.exception("unexpected error")
            if started:
                raise  # half a response sent: only closing the connection can say so
            body = json.dumps({"detail": f"internal error: {type(e).__name__}: {e}"}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


class TrustedHost:
    """403 for any HTTP request or WebSocket whose `Host` does not name this service
    (host_allowed), before anything else runs."""

    def __init__(self, app, names=frozenset()):
        self.app, self.names = app, frozenset(n.lower() for n in names)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if host_allowed(host, self.names):
            return await self.app(scope, receive, send)
        detail = (f"Host {host!r} does not name this service: requests must use its address, "
                  f"localhost, or a name it was started with (--allow-host NAME)")
        if scope["type"] == "websocket":  # closed before it is accepted: an HTTP 403
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": close_code(403), "reason": detail[:120]})
        return await _send_error(send, 403, detail)


class RequireToken:
    """401 without the token on every HTTP path but `open_paths`; 403 for any request that a
    browser sent from another origin (its `Origin` header names another host than `Host`), with
    or without a token. (WebSocket routes check the token themselves.)"""

    def __init__(self, app, token: str | None, open_paths=OPEN_PATHS):
        self.app, self.token, self.open_paths = app, token, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        if origin is not None and urlsplit(origin).netloc.lower() != (_header(scope, b"host") or "").lower():
            return await _send_error(send, 403, f"cross-origin requests are not served (Origin "
                                                f"{origin}): this API is for programs, not web pages")
        if scope["path"] not in self.open_paths and not bearer_ok(_header(scope, b"authorization"), self.token):
            return await _send_error(send, 401, "missing or wrong access token",
                                     ((b"www-authenticate", b"Bearer"),))
        return await self.app(scope, receive, send)


class BoundedBody:
    """Bound every HTTP request body while it arrives: over `max_body_bytes` → 413 (at once for a
    declared Content-Length, without reading; a chunked body as soon as the count passes it);
    no bytes for `read_timeout_s`, or not all within `body_timeout_s` → 408. The application
    then sees the client as gone (`http.disconnect`) and whatever it answers is dropped."""

    def __init__(self, app, max_body_bytes: int, read_timeout_s: float = READ_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.limit = app, max_body_bytes
        self.read_timeout_s, self.body_timeout_s = read_timeout_s, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, f"request body of {int(declared):,} bytes is over "
                                                f"the limit of {self.limit:,} bytes")
        state = {"received": 0, "body_done": False, "refused": False, "started": False}
        deadline = time.monotonic() + self.body_timeout_s

        async def refuse(status: int, detail: str):
            if not state["started"]:  # (an app answering before its body is in keeps its answer)
                await _send_error(send, status, detail)
            state["refused"] = True
            return {"type": "http.disconnect"}

        async def bounded_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:  # e.g. a streaming response listening for a disconnect
                return await receive()
            wait = min(self.read_timeout_s, deadline - time.monotonic())
            message = None
            with anyio.move_on_after(max(wait, 0.0)):
                message = await receive()
            if message is None:
                if wait < self.read_timeout_s:
                    return await refuse(408, f"the request body did not arrive within "
                                             f"{self.body_timeout_s:g} s")
                return await refuse(408, f"the request body stalled: no bytes for "
                                         f"{self.read_timeout_s:g} s")
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    return await refuse(413, f"request body over the limit of {self.limit:,} bytes")
                state["body_done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            if state["refused"] and not state["started"]:
                return  # the client already has its 408/413
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)


__all__ = ["BoundedBody", "CatchErrors", "HeadDeadline", "OpenBindError", "add_basics", "add_guards", "RequireToken", "TrustedHost", "bearer_ok", "bind_names",
           "check_bind", "host_allowed", "is_loopback"]


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol (`uvicorn.run(..., http=HeadDeadline)`), with a deadline on each
    request's head: a client that has begun a request but not finished its line and headers
    within HEAD_TIMEOUT_S (or has sent nothing that long since it connected) is disconnected.
    Without it, one header line every few seconds (a
    slowloris) holds a connection for as long as the client likes: uvicorn times idle
    keep-alive connections, not a head in progress. (BoundedBody times the body.)"""

    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:  # a request begins
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its head is in
            self._cancel_head_timer()

    def _cancel_head_timer(self):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self):
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc):
        self._cancel_head_timer()
        super().connection_lost(exc)
