"""`POST /v1/completions`: one prompt or a batch of them (text or token ids), `echo`, logprobs, streamed or
not, in OpenAI's shapes. A batch of P prompts with n choices each is P engine requests running side by side;
choice k of prompt p is index p*n + k, as OpenAI numbers them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from gearshift.engine.outputs import CompletionOutput, Logprob, RequestOutput
from gearshift.engine.pipeline import structured
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.server.errors import APIError
from gearshift.engine.server.framing import SSE_HEADERS, json_response, sse, sse_events
from gearshift.engine.server.generation import ClientGone, Generation, GenerationStream
from gearshift.engine.server.openai_routes import Cursor, checked_params, completion_logprobs, usage_of
from gearshift.engine.server.protocol import CompletionRequest, new_id, now
from gearshift.engine.server.state import ServerState

router = APIRouter()


class _Batch:
    """The generations of one request's prompts; closing it closes them all."""

    def __init__(self, gens: list[Generation]) -> None:
        self.gens = gens

    async def start(self, request: Request) -> bool:
        """Start every generation; False when the client went away first. Any failure closes them all."""
        try:
            for g in self.gens:
                await g.start(request)
        except ClientGone:
            await self.close()
            return False
        except BaseException:
            await self.close()
            raise
        return True

    async def close(self) -> None:
        for g in self.gens:
            await g.close()


async def _prompt_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return await state.encode(prompt, add_special_tokens=True)  # long texts off the event loop
    state.vocab_check(prompt, "prompt")
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state, params = checked_params(request, body)
    structured.attach(params, structured.openai_spec(None, body.guided_json, body.guided_regex, body.guided_choice),
                      state.backend)
    prompts = body.prompts()
    ids = [await _prompt_ids(state, p) for p in prompts]
    echo = [(p if isinstance(p, str) else state.backend.decode(p)) if body.echo else "" for p in prompts]
    batch = _Batch([Generation(state, i, params) for i in ids])
    if not await batch.start(request):
        return Response(status_code=499)
    answer = _CompletionReply(state, body, params, echo, batch)
    if body.stream:
        events = sse_events("/v1/completions", answer.chunks())
        return GenerationStream(events, batch,  # type: ignore[arg-type]
                                media_type="text/event-stream", headers=SSE_HEADERS)
    return await answer.reply(request)


class _CompletionReply:
    """One completions request's answer in OpenAI's shapes: the SSE chunks of a stream, or the whole reply.
    `echo[p]`: the text put before prompt p's choices ("" without echo)."""

    def __init__(self, state: ServerState, body: CompletionRequest, params: SamplingParams, echo: list[str],
                 batch: _Batch) -> None:
        self.state, self.body, self.echo, self.batch = state, body, echo, batch
        self.n, self.k = params.n, params.logprobs
        self.base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                     "model": state.model_name}

    def _choice(self, index: int, text: str, lps: list[Logprob], offset: int,
                c: CompletionOutput) -> dict[str, Any]:
        logprobs = completion_logprobs(self.state, lps, self.k, offset) if self.k is not None else None
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    async def chunks(self) -> AsyncIterator[str]:
        n, echo = self.n, self.echo
        cursors = [Cursor(n) for _ in echo]
        head = {**self.base, "usage": None} if self.body.include_usage else self.base
        async for p, out in _merged(self.batch.gens):
            for c in out.outputs:
                cur, first = cursors[p], cursors[p].chars[c.index] == 0 and cursors[p].tokens[c.index] == 0
                offset = cur.offset[c.index]
                step = cur.advance(c)
                if step is not None:
                    cur.offset[c.index] += len(step[0])
                    text = (echo[p] if first else "") + step[0]
                    yield sse({**head, "choices": [self._choice(p * n + c.index, text, step[1], offset, c)]})
        if self.body.include_usage:
            yield sse({**head, "choices": [], "usage": usage_of([g.final for g in self.batch.gens])})

    async def reply(self, request: Request) -> Response:
        """The non-streamed answer once every prompt's generation has finished; 499 when the client left."""
        try:
            finals = await asyncio.gather(*(g.collect(request) for g in self.batch.gens))
        except ClientGone:
            return Response(status_code=499)
        finally:
            await self.batch.close()
        choices = [self._choice(p * self.n + c.index, self.echo[p] + c.text, c.logprobs or [], 0, c)
                   for p, out in enumerate(finals) for c in out.outputs]
        return json_response({**self.base, "choices": choices, "usage": usage_of(list(finals)),
                              "system_fingerprint": None})


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every generation as they come; an APIError from one is raised here."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, g: Generation) -> None:
        try:
            async for out in g.outputs():
                await queue.put((p, out))
        except APIError as e:
            await queue.put((p, e))
        finally:
            await queue.put((p, None))

    tasks = [asyncio.create_task(pump(p, g)) for p, g in enumerate(gens)]
    live = len(tasks)
    try:
        while live:
            p, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
