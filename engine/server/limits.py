"""What one client may cost the server before any route runs: the request body (size, read deadline, valid
UTF-8 JSON text without lone surrogates, a JSON content type from browsers), and at the connection level
a cap on open connections and a deadline for a request's headers (slow clients cannot pin file
descriptors).

`RequestGuard` is an ASGI middleware: it reads a POST body whole (routes read it whole anyway), so every
refusal is an error in the route's own shape before any work starts; with an API key set, only after the
key checks out. `guarded_protocol` wraps uvicorn's
HTTP protocol class for the connection-level limits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from gearshift.engine.server.errors import APIError, error_payload

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A JSON escape of a UTF-16 surrogate; only bodies with one need the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
BODY_BUDGET_BODIES = 8  # bodies of the maximum size that may be in the middle of being read together
_OFF_LOOP_BYTES = 256 * 1024  # parse bigger bodies on a worker thread: /health shares this event loop


class BodyRejected(Exception):
    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def is_json_type(content_type: str) -> bool:
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def from_browser(headers: dict[bytes, bytes]) -> bool:
    """Browsers send Origin (and Sec-Fetch-Site) with every cross-site POST; curl and SDKs send neither."""
    return b"origin" in headers or headers.get(b"sec-fetch-site", b"none") not in (b"none", b"same-origin")


def has_lone_surrogate(value: Any, depth: int = 0) -> bool:
    """True if any string (key or value) in parsed JSON holds a surrogate code point, which no UTF-8
    text can carry (json.loads turns a lone "\\ud800" escape into one; a valid pair becomes one char)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if depth > 200:  # deeper than any of our schemas: the route rejects the shape anyway
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k, depth + 1) or has_lone_surrogate(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v, depth + 1) for v in value)
    return False


def check_body(body: bytes) -> None:
    """Raise BodyRejected (400) for a body that is not UTF-8 or holds a lone surrogate escape. Malformed
    JSON is left to the route, which names the position."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyRejected(APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                                    code="invalid_encoding")) from None
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return
    if has_lone_surrogate(parsed):
        raise BodyRejected(APIError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                         "without its pair): not valid Unicode text", code="invalid_encoding"))


def api_key_error(authorization: str, key: str | None) -> APIError | None:
    """The 401 for an `Authorization` header that does not carry `key` (None: no key is required)."""
    if not key:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return APIError(401, "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`.",
                        code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


class RequestGuard:
    """ASGI middleware for POST bodies: 415 for a browser's non-JSON POST (a page elsewhere must not drive
    this server: text/plain and form posts skip CORS preflight), 413 past `max_body` bytes, 408 past
    `read_timeout` seconds, 400 for invalid text. Non-browser clients may omit the JSON content type
    (Ollama's curl examples post `-d` form-encoded JSON): their bodies are read as JSON."""

    def __init__(self, app: Any, max_body: int, read_timeout: float, api_key: str | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.api_key = api_key  # checked before a body is read: strangers cannot make us buffer megabytes
        # Bodies being read at once share a budget (slow senders each holding a partial body could
        # otherwise pin max_connections x max_body bytes): past it, 503 and retry.
        self.budget = BODY_BUDGET_BODIES * max_body
        self.buffered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            body = await self._read(headers, receive)
            if len(body) > _OFF_LOOP_BYTES:
                await asyncio.to_thread(check_body, body)
            else:
                check_body(body)
        except BodyRejected as e:
            await self._refuse(scope, send, e.error)
            return
        rest = [(k, v) for k, v in scope["headers"]
                if k not in (b"content-type", b"content-length", b"transfer-encoding")]
        scope = {**scope, "headers": rest + [(b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode())]}
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        denied = api_key_error(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)
        if denied is not None:
            raise BodyRejected(denied)
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if not is_json_type(ctype) and from_browser(headers):
            raise BodyRejected(APIError(415, "send the body as JSON with `Content-Type: application/json`",
                                        code="unsupported_media_type"))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        try:
            return await asyncio.wait_for(self._read_all(receive), self.read_timeout)
        except asyncio.TimeoutError:
            raise BodyRejected(APIError(408, f"the request body did not arrive within {self.read_timeout:g}s",
                                        code="request_timeout")) from None

    async def _read_all(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                self.buffered += len(chunk)
                if size > self.max_body:
                    raise self._too_large()
                if self.buffered > self.budget:
                    raise BodyRejected(APIError(503, "the server is reading too many request bodies at once; "
                                                     "retry", code="service_unavailable", headers={"Retry-After": "1"}))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            return b"".join(chunks)
        finally:
            self.buffered -= size

    def _too_large(self) -> BodyRejected:
        return BodyRejected(APIError(413, f"the request body is larger than the server's limit of "
                                          f"{self.max_body} bytes", code="request_too_large"))

    @staticmethod
    async def _refuse(scope: Scope, send: Send, err: APIError) -> None:
        body = json.dumps(error_payload(scope["path"], err)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in err.headers.items())]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (the routes watch it for the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


_OVER_CAP = json.dumps({"error": {"message": "too many open connections; retry later", "type": "server_error",
                                  "param": None, "code": "too_many_connections"}}).encode()
_HEADERS_LATE = json.dumps({"error": {"message": "the request headers did not arrive in time",
                                      "type": "timeout_error", "param": None, "code": "request_timeout"}}).encode()


def _raw_response(status: str, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode() + body


def guarded_protocol(base: type, max_connections: int, header_timeout: float) -> type:
    """uvicorn's HTTP protocol class (httptools or h11), plus: a connection beyond `max_connections` open
    ones gets 503 and is closed at once; a connection that has not completed a request's headers within
    `header_timeout` seconds of opening (or of its first byte after a finished response) gets 408 and is
    closed. Both uvicorn implementations set `self.cycle` when a request's headers are complete."""

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _armed_for: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_raw_response("503 Service Unavailable", _OVER_CAP, "retry-after: 1\r\n"))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._armed_for = self.cycle
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _expired(self) -> None:
            self._deadline = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                # No new request's headers since the deadline was set: a slow or idle client.
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.write(_raw_response("408 Request Timeout", _HEADERS_LATE))
                    self.transport.close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def guarded_http(max_connections: int, header_timeout: float) -> type:
    """uvicorn's default HTTP protocol (httptools when installed, else h11), guarded."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return guarded_protocol(AutoHTTPProtocol, max_connections, header_timeout)
