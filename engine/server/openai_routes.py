"""`POST /v1/chat/completions` and `POST /v1/embeddings` in OpenAI's shapes, and the helpers
completions_routes.py shares (request checks, the stream cursor, logprobs, usage; the wire framing is
framing.py's).

Engines hand over cumulative outputs; streaming diffs them per choice into deltas. Usage counts come
from the engine's token ids, so streamed and non-streamed replies agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from gearshift.engine.outputs import CompletionOutput, Logprob, RequestOutput
from gearshift.engine.pipeline import chat, structured
from gearshift.engine.pipeline import embeddings as embedding
from gearshift.engine.pipeline.tools import parse_tools
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.server.framing import SSE_HEADERS, json_response, sse, sse_events
from gearshift.engine.server.generation import Generation, answer
from gearshift.engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    new_id,
    now,
    usage,
)
from gearshift.engine.server.state import ServerState, checked_state

router = APIRouter()


def _top(lp: Logprob, k: int) -> list[tuple[int, float]]:
    return sorted(lp.top.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(state: ServerState, lps: list[Logprob], k: int) -> dict[str, Any]:
    def entry(tid: int, value: float) -> dict[str, Any]:
        text = state.backend.decode([tid])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in _top(lp, k)]}
                        for lp in lps]}


def completion_logprobs(state: ServerState, lps: list[Logprob], k: int, offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for lp in lps:
        text = state.backend.decode([lp.token_id])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{state.backend.decode([t]): v for t, v in _top(lp, k)} for lp in lps],
            "text_offset": offsets}


def usage_of(outputs: list[RequestOutput | None]) -> dict[str, Any]:
    """Token counts summed over the finished engine requests of one reply (None: not finished)."""
    done = [f for f in outputs if f is not None]
    completion = sum(len(c.token_ids) for f in done for c in f.outputs)
    return usage(sum(len(f.prompt_token_ids) for f in done), completion, sum(f.num_cached_tokens for f in done))


def checked_params(request: Request,
                   body: ChatCompletionRequest | CompletionRequest) -> tuple[ServerState, SamplingParams]:
    """The app's state and the request's sampling parameters, once its model and logit_bias are valid."""
    state = checked_state(request, body.model)
    params = body.sampling_params()
    state.vocab_check(list(params.logit_bias), "logit_bias")
    return state, params


class Cursor:
    """What has been streamed of each choice so far."""

    def __init__(self, n: int) -> None:
        self.chars = [0] * n
        self.tokens = [0] * n
        self.offset = [0] * n
        self.done = [False] * n

    def advance(self, c: CompletionOutput) -> tuple[str, list[Logprob]] | None:
        """New text and logprobs of choice `c`, or None when there is nothing to send."""
        i = c.index
        if self.done[i]:
            return None
        delta = c.text[self.chars[i]:] if len(c.text) > self.chars[i] else ""
        lps = (c.logprobs or [])[self.tokens[i]:]
        if not delta and not c.finished and not lps:
            return None
        self.chars[i] = max(self.chars[i], len(c.text))
        self.tokens[i] = len(c.token_ids)
        self.done[i] = c.finished
        return delta, lps


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state, params = checked_params(request, body)
    tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    spec = structured.openai_spec(body.response_format, body.guided_json, body.guided_regex, body.guided_choice)
    # Off the event loop: a long conversation takes seconds to render and tokenize, /health shares the loop.
    plan = await asyncio.to_thread(chat.prepare_chat, state.backend, [m.as_dict() for m in body.messages], tools, params,
                                   spec, body.add_generation_prompt)
    chat_reply = _ChatReply(state, body, params, plan)
    gen = Generation(state, plan.prompt_ids, params)
    return await answer(request, gen, body.stream, lambda: chat_reply.stream(gen), chat_reply.reply,
                        "text/event-stream", SSE_HEADERS)


class _ChatReply:
    """One chat completion's answer in OpenAI's shapes: the SSE chunks of a stream, or the whole reply."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest, params: SamplingParams,
                 plan: chat.ChatPlan) -> None:
        self.state, self.body, self.params, self.plan = state, body, params, plan
        self.rid, self.created, self.model = new_id("chatcmpl"), now(), state.model_name
        self.k = params.logprobs

    def logprobs(self, lps: list[Logprob]) -> dict[str, Any] | None:
        return chat_logprobs(self.state, lps, self.k) if self.k is not None else None

    def stream(self, gen: Generation) -> AsyncIterator[str]:
        return sse_events("/v1/chat/completions", self._chunks(gen))

    async def _chunks(self, gen: Generation) -> AsyncIterator[str]:
        n = self.params.n
        cur = Cursor(n)
        splitters = [chat.ToolStream(self.plan) for _ in range(n)]
        base = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None}
        if self.body.include_usage:
            base["usage"] = None
        for i in range(n):  # the role comes first, as OpenAI sends it
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for out in gen.outputs():
            for c in out.outputs:
                step = cur.advance(c)
                if step is None:
                    continue
                choice = self._delta_choice(splitters[c.index], c, step[1])
                if choice is not None:
                    yield sse({**base, "choices": [choice]})
        if self.body.include_usage and gen.final is not None:
            yield sse({**base, "choices": [], "usage": usage_of([gen.final])})

    def _delta_choice(self, split: chat.ToolStream, c: CompletionOutput,
                      lps: list[Logprob]) -> dict[str, Any] | None:
        """The streamed choice for choice `c`'s new text (content, or tool calls as they complete); None when
        there is nothing to send."""
        content, calls = split.update(c.text, c.finished)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            first = len(split.calls) - len(calls)
            delta["tool_calls"] = [{"index": first + j, **call.openai()} for j, call in enumerate(calls)]
        if not delta and not c.finished and not lps:
            return None
        finish = "tool_calls" if c.finished and split.calls else c.finish_reason
        return {"index": c.index, "delta": delta, "logprobs": self.logprobs(lps),
                "finish_reason": finish, "stop_reason": c.stop_reason}

    def _message(self, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        content, calls = chat.final_message(self.plan, c.text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [call.openai() for call in calls]
        return msg, ("tool_calls" if calls else c.finish_reason)

    def reply(self, out: RequestOutput) -> Response:
        choices = []
        for c in out.outputs:
            msg, finish = self._message(c)
            choices.append({"index": c.index, "message": msg, "logprobs": self.logprobs(c.logprobs or []),
                            "finish_reason": finish, "stop_reason": c.stop_reason})
        return json_response({"id": self.rid, "object": "chat.completion", "created": self.created,
                              "model": self.model, "choices": choices, "usage": usage_of([out]),
                              "system_fingerprint": None})


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Last-token pooled, L2-normalised vectors from the served model (both engines; README: Embeddings)."""
    state = checked_state(request, body.model)
    embedding.check_dimensions(body.dimensions)
    inputs = embedding.token_inputs(state.backend, body.input)
    vectors = await state.embed(inputs)
    n = sum(map(len, inputs))
    return json_response({"object": "list", "model": state.model_name,
                  "data": [{"object": "embedding", "index": i, "embedding": embedding.encode_vector(v, body.encoding_format)}
                           for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": n, "total_tokens": n}})


