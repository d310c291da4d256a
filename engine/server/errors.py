"""Every error the server returns, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
(Ollama's routes under /api/ get Ollama's `{"error": "..."}` instead, which its clients parse).

Validation errors become 400 with the offending field in `param` and the message; nothing the client
sends can produce a 500 or a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gearshift.engine.errors import (
    EngineOverloadedError,
    GearshiftError,
    InvalidRequestError,
    ModelNotReadyError,
)
from gearshift.engine.server.protocol import error_body
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gearshift.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    """An HTTP error with OpenAI's fields; raised anywhere in a route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")


def overloaded(retry_after: int = 1) -> APIError:
    return APIError(429, "the server's waiting queue is full; retry later", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after)})


def unavailable(why: str) -> APIError:
    return APIError(503, why, code="service_unavailable", headers={"Retry-After": "1"})


def server_error(message: str) -> APIError:
    """A failure on our side (HTTP 500): OpenAI's clients retry it."""
    return APIError(500, message, code="server_error")


def from_engine_error(e: GearshiftError) -> APIError:
    """Only InvalidRequestError is the client's fault (400); any other engine error is ours (5xx)."""
    if isinstance(e, InvalidRequestError):
        return APIError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, EngineOverloadedError):
        return overloaded()
    if isinstance(e, ModelNotReadyError):
        return unavailable(str(e))
    return server_error(str(e))


def error_payload(path: str, err: APIError) -> dict[str, Any]:
    if path.startswith("/api/"):
        return {"error": err.message}
    return error_body(err.message, _TYPES.get(err.status, "invalid_request_error"), err.param, err.code)


def error_response(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(error_payload(request.url.path, err), status_code=err.status, headers=err.headers)


def _field(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names union members ("str", "list[int]", "function-after[...]") in loc: not fields.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or None


def validation_to_api_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    if first.get("type") == "model_attributes_type" or (first.get("loc") == ("body",) and first.get("type") != "missing"):
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    if first.get("loc") == ("body",):
        return APIError(400, "the request body is missing", code="invalid_body")
    field = _field(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    return APIError(400, f"{field}: {msg}" if field else msg, param=field, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_to_api_error(exc))

    @app.exception_handler(GearshiftError)
    async def _engine(request: Request, exc: GearshiftError) -> JSONResponse:
        return error_response(request, from_engine_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed"}
        err = APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)), headers=dict(exc.headers or {}))
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours: log the traceback here, hand the client one line.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(f"internal error: {type(exc).__name__}", "internal_error", None, "internal_error")
        return JSONResponse(body if not request.url.path.startswith("/api/") else {"error": body["error"]["message"]},
                            status_code=500)


def error_response_plain(status: int, message: str, code: str | None = None) -> JSONResponse:
    """For routes outside /api/ and /v1/ (e.g. /ready): OpenAI's shape all the same."""
    return JSONResponse(error_body(message, _TYPES.get(status, "invalid_request_error"), None, code),
                        status_code=status)
