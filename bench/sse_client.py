"""A lean streaming client for the load generator: HTTP/1.1 over asyncio streams, SSE events split on
bytes, JSON parsed only for the `usage` event.

Why not httpx: on the 2-core machine the client shares the CPUs with the server under test, and each
token's chunk cost httpx (h11, line iteration, json.loads) about as much CPU as the server spent sending
it. A load generator should cost the server nothing (wrk is C for the same reason); every server measured
goes through this same client, so comparisons between them are unchanged in kind.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

TOKEN_MARKERS = (b'"text":"', b'"content":"')  # completions and chat deltas
EMPTY_MARKERS = (b'"text":""', b'"content":""')


class HTTPStatusError(Exception):
    pass


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield the response body in pieces as they arrive (chunked, sized, or until EOF)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def stream_completion(base_url: str, path: str, body: dict[str, Any], chunk_times: list[float]
                            ) -> int | None:
    """POST `body` with stream=True; append the arrival time of every content chunk to `chunk_times`.
    Returns usage.completion_tokens when the server sent usage, else None. Raises HTTPStatusError."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST {url.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            text = b"".join([piece async for piece in _read_body(reader, headers)])
            raise HTTPStatusError(f"HTTP {status}: {text[:200]!r}")
        usage: int | None = None
        buf = b""
        async for piece in _read_body(reader, headers):
            now = time.perf_counter()
            buf += piece
            *events, buf = buf.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data:"):
                    continue
                data = event[5:].strip()
                if data == b"[DONE]":
                    return usage
                if b'"usage":{' in data:
                    usage = json.loads(data)["usage"].get("completion_tokens", usage)
                if any(m in data for m in TOKEN_MARKERS) and not any(m in data for m in EMPTY_MARKERS):
                    chunk_times.append(now)
        return usage
    finally:
        writer.close()
