"""`POST /v1/responses`: a stateless subset of OpenAI's Responses API (text, function calls, text.format),
streamed as Responses events or not, on the same chat pipeline as /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.outputs import RequestOutput
from gearshift.engine.pipeline import chat
from gearshift.engine.pipeline import responses as rs
from gearshift.engine.pipeline.tools import parse_tools
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.server.errors import APIError
from gearshift.engine.server.framing import SSE_HEADERS, compact
from gearshift.engine.server.generation import Generation, answer
from gearshift.engine.server.state import checked_state
from pydantic import BaseModel, ConfigDict

router = APIRouter()


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None  # nothing is ever stored: accepted, and the reply says store false
    previous_response_id: str | None = None
    user: str | None = None


def _sse(event: dict[str, Any], seq: list[int]) -> str:
    event["sequence_number"] = seq[0]
    seq[0] += 1
    return f"event: {event['type']}\ndata: {compact(event)}\n\n"


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    state = checked_state(request, body.model)
    if body.previous_response_id:
        raise InvalidRequestError("this server keeps no responses (stateless): send the whole conversation as "
                                  "input instead of previous_response_id", param="previous_response_id")
    params = SamplingParams(max_tokens=body.max_output_tokens,
                            temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p)
    tools = parse_tools(rs.chat_tools(body.tools), rs.chat_tool_choice(body.tool_choice), body.parallel_tool_calls)
    # Templating, tokenizing and compiling a text.format grammar take a while on a long conversation: a worker
    # thread, as the chat and Ollama routes do, keeps the event loop (and /health) answering meanwhile.
    plan = await asyncio.to_thread(chat.prepare_chat, state.backend, rs.to_messages(body.instructions, body.input),
                                   tools, params, rs.text_format_spec(body.text))
    gen = Generation(state, plan.prompt_ids, params)
    rid, model = rs.new_id("resp"), state.model_name

    def finished(out: RequestOutput, output: list[dict[str, Any]]) -> dict[str, Any]:
        c = out.outputs[0]
        incomplete = "max_output_tokens" if c.finish_reason == "length" else None
        return rs.response_object(rid, model, body, output, "incomplete" if incomplete else "completed",
                                  rs.usage_of(len(out.prompt_token_ids), len(c.token_ids)), incomplete)

    def render(out: RequestOutput) -> Response:
        content, calls = chat.final_message(plan, out.outputs[0].text)
        output = ([rs.message_item(rs.new_id("msg"), content)] if content else []) + [rs.call_item(c) for c in calls]
        return Response(compact(finished(out, output)), media_type="application/json")

    return await answer(request, gen, body.stream, lambda: _events(gen, plan, rid, model, body, finished), render,
                        "text/event-stream", SSE_HEADERS)


async def _events(gen: Generation, plan: chat.ChatPlan, rid: str, model: str, body: ResponsesRequest,
                  finished: Any) -> AsyncIterator[str]:
    seq = [0]
    msg_id, text = rs.new_id("msg"), ""
    output: list[dict[str, Any]] = []
    opened = False
    yield _sse({"type": "response.created",
                "response": rs.response_object(rid, model, body, [], "in_progress", None)}, seq)
    split = chat.ToolStream(plan)
    try:
        async for out in gen.outputs():
            c = out.outputs[0]
            delta, calls = split.update(c.text, c.finished)
            if delta:
                if not opened:
                    opened = True
                    yield _sse({"type": "response.output_item.added", "output_index": 0,
                                "item": rs.message_item(msg_id, "", "in_progress")}, seq)
                    yield _sse({"type": "response.content_part.added", "item_id": msg_id, "output_index": 0,
                                "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}},
                               seq)
                text += delta
                yield _sse({"type": "response.output_text.delta", "item_id": msg_id, "output_index": 0,
                            "content_index": 0, "delta": delta}, seq)
            if opened and (calls or c.finished) and not output:
                part = {"type": "output_text", "text": text, "annotations": []}
                yield _sse({"type": "response.output_text.done", "item_id": msg_id, "output_index": 0,
                            "content_index": 0, "text": text}, seq)
                yield _sse({"type": "response.content_part.done", "item_id": msg_id, "output_index": 0,
                            "content_index": 0, "part": part}, seq)
                output.append(rs.message_item(msg_id, text))
                yield _sse({"type": "response.output_item.done", "output_index": 0, "item": output[0]}, seq)
            for call in calls:
                item, idx = rs.call_item(call), len(output)
                yield _sse({"type": "response.output_item.added", "output_index": idx,
                            "item": {**item, "arguments": "", "status": "in_progress"}}, seq)
                yield _sse({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                            "output_index": idx, "delta": call.arguments}, seq)
                yield _sse({"type": "response.function_call_arguments.done", "item_id": item["id"],
                            "output_index": idx, "arguments": call.arguments}, seq)
                output.append(item)
                yield _sse({"type": "response.output_item.done", "output_index": idx, "item": item}, seq)
        if gen.final is not None:
            final = finished(gen.final, output)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield _sse({"type": kind, "response": final}, seq)
    except APIError as e:
        yield _sse({"type": "error", "code": str(e.code or e.status), "message": e.message, "param": e.param}, seq)
