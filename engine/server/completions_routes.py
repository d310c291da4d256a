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
from gearshift.engine.server.errors import APIError, error_payload
from gearshift.engine.server.generation import ClientGone, Generation, GenerationStream
from gearshift.engine.server.openai_routes import SSE_HEADERS, Cursor, completion_logprobs, json_response, sse
from gearshift.engine.server.protocol import CompletionRequest, new_id, now, usage
from gearshift.engine.server.state import ServerState, get_state

router = APIRouter()


class _Batch:
    """The generations of one request's prompts; closing it closes them all."""

    def __init__(self, gens: list[Generation]) -> None:
        self.gens = gens

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
    state = get_state(request)
    state.check_model(body.model)
    params = body.sampling_params()
    state.vocab_check(list(params.logit_bias), "logit_bias")
    structured.attach(params, structured.openai_spec(None, body.guided_json, body.guided_regex, body.guided_choice),
                      state.backend)
    prompts = body.prompts()
    ids = [await _prompt_ids(state, p) for p in prompts]
    echo = [(p if isinstance(p, str) else state.backend.decode(p)) if body.echo else "" for p in prompts]
    batch = _Batch([Generation(state, i, params) for i in ids])
    try:
        for g in batch.gens:
            await g.start(request)
    except ClientGone:
        await batch.close()
        return Response(status_code=499)
    except BaseException:
        await batch.close()
        raise
    rid, created, model, n, k = new_id("cmpl"), now(), state.model_name, params.n, params.logprobs
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}

    def choice(index: int, text: str, lps: list[Logprob], offset: int, c: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "text": text,
                "logprobs": completion_logprobs(state, lps, k, offset) if k is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def total_usage(finals: list[RequestOutput | None]) -> dict[str, Any]:
        done = [f for f in finals if f is not None]
        return usage(sum(len(f.prompt_token_ids) for f in done),
                     sum(len(c.token_ids) for f in done for c in f.outputs), sum(f.num_cached_tokens for f in done))

    async def stream() -> AsyncIterator[str]:
        cursors = [Cursor(n) for _ in prompts]
        head = {**base, "usage": None} if body.include_usage else base
        try:
            async for p, out in _merged(batch.gens):
                for c in out.outputs:
                    cur, first = cursors[p], cursors[p].chars[c.index] == 0 and cursors[p].tokens[c.index] == 0
                    offset = cur.offset[c.index]
                    step = cur.advance(c)
                    if step is not None:
                        cur.offset[c.index] += len(step[0])
                        text = (echo[p] if first else "") + step[0]
                        yield sse({**head, "choices": [choice(p * n + c.index, text, step[1], offset, c)]})
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": total_usage([g.final for g in batch.gens])})
        except APIError as e:
            yield sse(error_payload("/v1/completions", e))
        yield "data: [DONE]\n\n"

    if body.stream:
        return GenerationStream(stream(), batch, media_type="text/event-stream", headers=SSE_HEADERS)  # type: ignore[arg-type]
    try:
        finals = await asyncio.gather(*(g.collect(request) for g in batch.gens))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await batch.close()
    choices = [choice(p * n + c.index, echo[p] + c.text, c.logprobs or [], 0, c)
               for p, out in enumerate(finals) for c in out.outputs]
    return json_response({**base, "choices": choices, "usage": total_usage(list(finals)), "system_fingerprint": None})


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
