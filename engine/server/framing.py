"""How replies are written on the wire, said once for every route: compact JSON, an SSE data event
(OpenAI's streams), an NDJSON line (Ollama's streams) and a JSON response.

A leaf of the server package beside errors.py: the route modules import it, never each other for it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from gearshift.engine.server.errors import APIError, error_payload

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NDJSON = "application/x-ndjson"


def compact(obj: dict[str, Any]) -> str:
    """`obj` as JSON without spaces, non-ASCII text kept as it is."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: dict[str, Any]) -> str:
    return f"data: {compact(obj)}\n\n"


def ndjson_line(obj: dict[str, Any]) -> str:
    return compact(obj) + "\n"


def json_response(obj: dict[str, Any]) -> Response:
    return Response(compact(obj), media_type="application/json")


async def sse_events(path: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events` framed as an OpenAI stream: an APIError mid-stream becomes an error event, and the
    stream always ends with `[DONE]`."""
    try:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                yield event
    except APIError as e:
        yield sse(error_payload(path, e))
    yield "data: [DONE]\n\n"
