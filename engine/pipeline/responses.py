"""OpenAI's Responses API, stateless subset, as translations to and from the chat pipeline: input items ->
chat messages, Responses tools (flat) -> chat tools, `text.format` -> an output format, and the finished
reply -> output items (`message` with `output_text`, `function_call`).

Stateless: nothing is stored, so `previous_response_id` (and `store: true` retrieval) are refused with a
400 that says to send the whole conversation as `input`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.pipeline.guided import GuidedSpec
from gearshift.engine.pipeline.tools import ToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def to_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input (a string, or message / function_call / function_call_output items) -> chat messages."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"input[{i}].role must be user, assistant, system or developer",
                                          param=f"input[{i}].role")
            msgs.append({"role": "system" if role == "developer" else role,
                         "content": _text_of(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else _text_of(out, i)})
        else:
            raise InvalidRequestError(f"input[{i}] of type {kind!r} is not supported (text, function calls only)",
                                      param=f"input[{i}].type")
    if not msgs:
        raise InvalidRequestError("input must not be empty", param="input")
    return msgs


def _text_of(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if part.get("type") in ("input_text", "output_text", "text"):
            parts.append(part.get("text", ""))
        else:
            raise InvalidRequestError(f"input[{i}] has a {part.get('type')!r} part: this model reads text only",
                                      param=f"input[{i}].content")
    return "".join(parts)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses' flat function tools -> chat's nested ones (other tool types are a 400)."""
    out = []
    for i, t in enumerate(tools or []):
        if t.get("type") != "function":
            raise InvalidRequestError(f"tools[{i}]: only function tools are supported, not {t.get('type')!r}",
                                      param=f"tools[{i}].type")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                     if k in t}})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def text_format_spec(text: dict[str, Any] | None) -> GuidedSpec | None:
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec("json_object", param="text.format")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("text.format json_schema needs a schema", param="text.format.schema")
        return GuidedSpec("json_schema", fmt["schema"], strict=bool(fmt.get("strict")), param="text.format")
    raise InvalidRequestError(f"text.format type {kind!r} is not supported", param="text.format.type")


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": new_id("fc"), "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}


def response_object(rid: str, model: str, body: Any, output: list[dict[str, Any]], status: str,
                    usage: dict[str, int] | None, incomplete: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": output, "error": None, "instructions": body.instructions,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "max_output_tokens": body.max_output_tokens, "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.temperature, "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "text": body.text or {"format": {"type": "text"}}, "metadata": {},
            "store": False, "usage": usage}


def usage_of(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}
