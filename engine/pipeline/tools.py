"""Tool calling: the request's tools and tool_choice, the chat history with tool turns rendered for the
model's template, a parser per model family, and the grammar that forces a call (tool_choice required or
a named function), so a forced call always parses.

Families (picked from the chat template's own text):
  * hermes  — `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Qwen 2/2.5/3, SmolLM2, Hermes);
              also the fallback for templates that know no tools (SmolLM2-135M's plain ChatML): the tool
              list then goes into the system message in Qwen 2.5's wording.
  * llama3  — the whole reply is `{"name": ..., "parameters": {...}}` (optionally after <|python_tag|>).
  * mistral — `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from gearshift.engine.errors import InvalidRequestError

Family = Literal["hermes", "llama3", "mistral"]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def ollama(self) -> dict[str, Any]:
        try:
            args = json.loads(self.arguments)
        except ValueError:
            args = {}
        return {"function": {"name": self.name, "arguments": args}}


@dataclass(frozen=True)
class ToolRequest:
    """What the request asked for: the tools, and whether a call is off, free, any-forced or one-forced."""

    tools: tuple[Tool, ...]
    choice: Literal["none", "auto", "required", "named"]
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def parse_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                parallel: bool | None) -> ToolRequest:
    """OpenAI's (and Ollama's) `tools` and `tool_choice` -> ToolRequest; 400s name the bad field."""
    parsed: list[Tool] = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}",
                                      param=f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidRequestError(f"tools[{i}].function.name must match [A-Za-z0-9_.-]{{1,64}}",
                                      param=f"tools[{i}].function.name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object",
                                      param=f"tools[{i}].function.parameters")
        parsed.append(Tool(name, str(fn.get("description") or ""), params))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique", param="tools")
    choice, named = _choice(tool_choice, names)
    return ToolRequest(tuple(parsed), choice, named, True if parallel is None else parallel)


def _choice(tool_choice: str | dict[str, Any] | None, names: list[str]) -> tuple[Any, str | None]:
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice must be none, auto, required or a function, got {tool_choice!r}",
                                      param="tool_choice")
        if tool_choice != "none" and not names:
            raise InvalidRequestError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return tool_choice, None
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise InvalidRequestError('tool_choice must be {"type": "function", "function": {"name": ...}}',
                                  param="tool_choice")
    if name not in names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return "named", name


def family_of(template: str | None) -> Family:
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "hermes"


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


# ---- input: the history rendered for the template ----------------------------------------------

_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>"
)


def hermes_call_text(name: str, arguments: str) -> str:
    try:
        args: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        args = arguments
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def render_messages(messages: list[dict[str, Any]], req: ToolRequest, native: bool) -> list[dict[str, Any]]:
    """messages: {"role", "content", "tool_calls"?, "tool_call_id"?, "name"?} dicts. native: the template
    renders tools itself (it gets `tools=` and these messages untouched); otherwise tool turns and the tool
    list become Hermes text in plain system/user/assistant turns."""
    if native:
        return [_native_message(m) for m in messages]
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [hermes_call_text(c["function"]["name"], _args_text(c["function"].get("arguments")))
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": role, "content": content})
    if req.active:
        tools_text = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in req.tools)
        block = _HERMES_SYSTEM.format(tools=tools_text)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _args_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments or {})


def _native_message(m: dict[str, Any]) -> dict[str, Any]:
    msg = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        # Templates (Qwen's, Llama's) want arguments as a mapping, not OpenAI's JSON text.
        msg["tool_calls"] = [{"type": "function", "id": c.get("id"),
                              "function": {"name": c["function"]["name"],
                                           "arguments": _loads_or(c["function"].get("arguments"))}}
                             for c in m["tool_calls"]]
    for k in ("tool_call_id", "name"):
        if m.get(k):
            msg[k] = m[k]
    return msg


def _loads_or(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments or {}


# ---- output: parsing ---------------------------------------------------------------------------

_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_calls(text: str, family: Family, names: set[str]) -> tuple[str, list[ToolCall]]:
    """Split a finished reply into (content, tool calls). Calls naming unknown tools or with bad JSON
    are left in the content, so nothing the model said is lost."""
    if family == "mistral" and "[TOOL_CALLS]" in text:
        head, _, tail = text.partition("[TOOL_CALLS]")
        calls = _calls_from_objects(_loads_or(tail.strip()), names, "arguments")
        return (head.strip(), calls) if calls else (text, [])
    if family == "llama3":
        body = text.split("<|python_tag|>", 1)[-1].strip()
        if body.startswith("{"):
            calls = _calls_from_objects(_loads_or(body), names, "parameters")
            if calls:
                return "", calls
        return text, []
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for m in _HERMES_RE.finditer(text):
        call = _one_call(_loads_or(m.group(1)), names, "arguments")
        kept.append(text[last:m.start()] if call else text[last:m.end()])
        last = m.end()
        if call:
            calls.append(call)
    tail = text[last:]
    if calls and "<tool_call>" in tail:  # a further call cut off by max_tokens: not content
        tail = tail[: tail.index("<tool_call>")]
    kept.append(tail)
    return "".join(kept).strip() if calls else text, calls


def _calls_from_objects(obj: Any, names: set[str], args_key: str) -> list[ToolCall]:
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_one_call(o, names, args_key) for o in objs]
    return [c for c in calls if c is not None] if all(calls) else []


def _one_call(obj: Any, names: set[str], args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def stream_safe_prefix(text: str, family: Family) -> int:
    """How much of a reply in progress can be streamed as content: everything before anything that is,
    or may become, a tool call (its marker or a prefix of it at the end)."""
    marker = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "{"}[family]
    if family == "llama3":
        stripped = text.lstrip()
        return 0 if (not stripped or stripped.startswith(("{", "<|python_tag|>"))) else len(text)
    i = text.find(marker)
    if i >= 0:
        return i
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)


# ---- forcing a call: the grammar ----------------------------------------------------------------

def forced_grammar(req: ToolRequest, family: Family) -> str:
    """A Lark grammar (llguidance dialect, `%json` for the arguments) that only admits calls of the
    allowed tools in this family's syntax; one call, or one or more when parallel calls are allowed."""
    tools = [t for t in req.tools if req.choice != "named" or t.name == req.named]
    args_key = "parameters" if family == "llama3" else "arguments"
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, args_key: t.parameters},
                      "required": ["name", args_key], "additionalProperties": False} for t in tools],
           "x-guidance": {"whitespace_flexible": False}}
    obj = "%json " + json.dumps(one)
    many = req.parallel and req.choice != "named"
    if family == "mistral":
        arr = '"[" call ("," call)* "]"' if many else '"[" call "]"'
        return f'start: "[TOOL_CALLS]" {arr}\ncall: {obj}\n'
    if family == "llama3":
        return f"start: call\ncall: {obj}\n"
    rep = "(\"\\n\" call)*" if many else ""
    return f'start: call {rep}\ncall: "<tool_call>\\n" obj "\\n</tool_call>"\nobj: {obj}\n'
