"""One HTTP request's generation: admission, the engine's output stream, deadlines, client disconnects
and the latency metrics, measured here so both engines report the same thing.

The first output is awaited before any response header is sent, so every refusal (bad values, prompt
too long, queue full) is a proper 4xx rather than an error inside a 200 stream. While waiting (queued,
or generating for a non-streamed reply) the client's socket is watched: a client that goes away aborts
its request, which frees its KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from gearshift.engine.errors import GearshiftError
from gearshift.engine.outputs import RequestOutput
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.server.errors import APIError, from_engine_error
from gearshift.engine.server.protocol import error_body
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from gearshift.engine.server.state import ServerState

T = TypeVar("T")
log = logging.getLogger("gearshift.server")


class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""


def timeout_error(seconds: float) -> APIError:
    return APIError(408, f"the request did not finish within the server's request timeout ({seconds:g}s)",
                    code="request_timeout")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_client(request: Request, awaitable: Awaitable[T], timeout: float) -> T:
    """Await `awaitable` unless the client disconnects (ClientGone) or `timeout` passes (TimeoutError)
    first; the loser is cancelled, which aborts the engine request inside it."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=max(timeout, 0.0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone() if watcher in done else asyncio.TimeoutError()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


if sys.version_info >= (3, 11):

    async def _next_within(agen: AsyncIterator[T], seconds: float) -> T:
        # A timeout scope on this task: asyncio.wait_for on 3.11 wraps every call in a new Task, which
        # the stream paid once per token.
        async with asyncio.timeout(seconds):
            return await agen.__anext__()

else:  # pragma: no cover - Python 3.10

    async def _next_within(agen: AsyncIterator[T], seconds: float) -> T:
        return await asyncio.wait_for(agen.__anext__(), seconds)


class Generation:
    """Drive one engine request; iterate `outputs()` after `start()`, always `close()`."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams) -> None:
        self.state = state
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = uuid.uuid4().hex
        self.arrival = time.monotonic()
        self.deadline = self.arrival + state.config.request_timeout
        self.final: RequestOutput | None = None
        self._first: RequestOutput | None = None
        self._agen: AsyncIterator[RequestOutput] | None = None
        self._last_token_time: float | None = None
        self._tokens_seen = 0
        self._closed = False
        self._entered = False
        self._rejected = False
        self.first_token_at: float | None = None  # monotonic, like `arrival`
        self.finished_at: float | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def start(self, request: Request) -> None:
        """Admit and wait for the first output. Raises APIError (4xx/503) or ClientGone."""
        self.state.lifecycle.admit()  # 503 while draining or not ready
        self.state.lifecycle.enter()
        self._entered = True
        self._agen = self.state.backend.generate(self.request_id, self.prompt_ids, self.params)
        try:
            self._first = await race_client(request, self._agen.__anext__(), self.remaining())
        except GearshiftError as e:
            self._rejected = True  # refused, never admitted: not a finished request for the metrics
            await self.close()
            raise from_engine_error(e) from None
        except StopAsyncIteration:
            await self.close()
            raise APIError(503, "the engine stopped before answering", code="engine_stopped") from None
        except asyncio.TimeoutError:
            await self.close()
            raise timeout_error(self.state.config.request_timeout) from None
        except BaseException:
            await self.close()
            raise
        self._observe(self._first)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs, the first included; raises APIError(408) past the request timeout."""
        assert self._first is not None and self._agen is not None
        out = self._first
        yield out
        while not out.finished:
            try:
                out = await _next_within(self._agen, max(self.remaining(), 0.0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise timeout_error(self.state.config.request_timeout) from None
            except GearshiftError as e:  # the engine ended this request: an error event, not a cut stream
                raise from_engine_error(e) from None
            self._observe(out)
            yield out

    async def collect(self, request: Request) -> RequestOutput:
        """Run to the end (non-streamed reply) while watching the client."""

        async def last() -> RequestOutput:
            last_out = self._first
            async for out in self.outputs():
                last_out = out
            assert last_out is not None
            return last_out

        try:
            return await race_client(request, last(), self.remaining() + 1.0)
        except asyncio.TimeoutError:
            raise timeout_error(self.state.config.request_timeout) from None

    def _observe(self, out: RequestOutput) -> None:
        m, now = self.state.metrics, time.monotonic()
        tokens = sum(len(o.token_ids) for o in out.outputs)
        new = tokens - self._tokens_seen
        if new > 0:
            if self._last_token_time is None:
                self.first_token_at = now
                m.ttft_h.observe(now - self.arrival)
                if out.first_scheduled_time and out.arrival_time and out.first_scheduled_time >= out.arrival_time:
                    m.queue_time_h.observe(out.first_scheduled_time - out.arrival_time)
            else:
                m.itl_h.observe(now - self._last_token_time)
            self._last_token_time = now
            self._tokens_seen = tokens
            m.generation_tokens_c.inc(new)
        if out.finished and self.final is None:
            self.final = out
            self.finished_at = now
            m.prompt_tokens_c.inc(len(out.prompt_token_ids))
            m.e2e_h.observe(now - self.arrival)
            m.finished(out.finish_reason or "abort")

    async def reply(self, request: Request, render: Callable[[RequestOutput], Response]) -> Response:
        """The non-streamed answer: run to the end, close, and render the last output; 499 when the client
        went away first."""
        try:
            out = await self.collect(request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            await self.close()
        return render(out)

    async def close(self) -> None:
        """Abort the engine request if it is still running; idempotent and safe under cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._agen is not None:
                with contextlib.suppress(BaseException):
                    await self._agen.aclose()  # type: ignore[attr-defined]
            if self._agen is not None and self.final is None and not self._rejected:
                self.state.metrics.finished("abort")
                self.state.metrics.e2e_h.observe(time.monotonic() - self.arrival)
            if self._entered:
                self.state.lifecycle.leave()


async def answer(request: Request, gen: Generation, stream: bool, events: Callable[[], AsyncIterator[str]],
                 render: Callable[[RequestOutput], Response], media_type: str,
                 headers: dict[str, Any] | None = None) -> Response:
    """Start `gen` and answer with a stream of `events()` or the rendered last output; 499 when the client
    went away before the first output."""
    try:
        await gen.start(request)
    except ClientGone:
        return Response(status_code=499)
    if stream:
        return GenerationStream(events(), gen, media_type=media_type, headers=headers)
    return await gen.reply(request, render)


class GenerationStream(StreamingResponse):
    """A streaming response that always closes its generation, even when the client leaves before the
    body iterator ever runs (Starlette would then never close the iterator)."""

    def __init__(self, content: AsyncIterator[str], generation: Generation, media_type: str,
                 headers: dict[str, Any] | None = None) -> None:
        super().__init__(_never_cut(content, media_type), media_type=media_type, headers=headers)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.close()


async def _never_cut(content: AsyncIterator[str], media_type: str) -> AsyncIterator[str]:
    """A bug of ours while streaming still ends the stream properly: an error event in the stream's own
    format (and `[DONE]` for SSE), never a connection cut without a word."""
    try:
        async with contextlib.aclosing(content):  # type: ignore[type-var]
            async for chunk in content:
                yield chunk
    except Exception as e:
        log.exception("error while streaming a response")
        message = f"internal error: {type(e).__name__}"
        if media_type == "text/event-stream":
            body = json.dumps(error_body(message, "server_error", None, "server_error"))
            yield f"data: {body}\n\ndata: [DONE]\n\n"
        else:
            yield json.dumps({"error": message}) + "\n"
