"""Chat input and output processing, shared by the OpenAI and Ollama routes and by both engines.

Input: messages (with tool turns) + tools + output format -> prompt token ids and a compiled guide.
Output: a choice's cumulative text -> content deltas and tool-call deltas as they complete.

    plan = prepare_chat(backend, messages, tools, params, spec)        # 400s before any admission
    stream = ToolStream(plan)                                          # one per choice
    content_delta, new_calls = stream.update(text, finished)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gearshift.engine.errors import GearshiftError, InvalidRequestError
from gearshift.engine.pipeline import structured
from gearshift.engine.pipeline.guided import GuidedSpec
from gearshift.engine.pipeline.tools import (
    Family,
    ToolCall,
    ToolRequest,
    family_of,
    forced_grammar,
    parse_calls,
    render_messages,
    stream_safe_prefix,
    template_knows_tools,
)
from gearshift.engine.sampling_params import SamplingParams

NO_TOOLS = ToolRequest((), "none")


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    tools: ToolRequest
    family: Family


def render_chat(backend: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: ToolRequest = NO_TOOLS) -> tuple[str, Family]:
    """The prompt text from the model's own template; tool turns rendered for it (see tools.py)."""
    source = backend.chat_template_source()
    native = tools.active and template_knows_tools(source)
    msgs = render_messages(messages, tools, native)
    extra = {"tools": [t.openai() for t in tools.tools]} if native else {}
    try:
        text = backend.apply_chat_template(msgs, add_generation_prompt, **extra)
    except GearshiftError:
        raise
    except Exception as e:  # a template's raise_exception(), or a role order it does not accept
        raise InvalidRequestError(f"the model's chat template rejected these messages: {e}",
                                  param="messages") from None
    return text, family_of(source)


def prepare_chat(backend: Any, messages: list[dict[str, Any]], tools: ToolRequest, params: SamplingParams,
                 spec: GuidedSpec | None, add_generation_prompt: bool = True) -> ChatPlan:
    text, family = render_chat(backend, messages, add_generation_prompt, tools)
    ids = backend.encode(text, add_special_tokens=False)
    if tools.forced:
        if spec is not None:
            raise InvalidRequestError("a forced tool_choice cannot be combined with an output format",
                                      param="tool_choice")
        spec = GuidedSpec("lark", forced_grammar(tools, family), param="tool_choice")
    structured.attach(params, spec, backend)
    return ChatPlan(ids, tools, family)


@dataclass
class ToolStream:
    """One choice's output split into content and tool calls while it streams. Content is sent up to
    anything that is, or may become, a tool call; each call is sent once it is complete."""

    plan: ChatPlan
    sent_chars: int = 0
    calls: list[ToolCall] = field(default_factory=list)

    def update(self, text: str, finished: bool) -> tuple[str, list[ToolCall]]:
        if not self.plan.tools.active:
            delta, self.sent_chars = text[self.sent_chars:], max(self.sent_chars, len(text))
            return delta, []
        names = {t.name for t in self.plan.tools.tools}
        if finished:
            content, calls = parse_calls(text, self.plan.family, names)
            if not calls:
                content = text
            # Content after the streamed prefix (a parse that kept everything as text sends the rest now).
            delta = content[self.sent_chars:] if content.startswith(text[:self.sent_chars]) else ""
            self.sent_chars = len(text)
            return delta, self._new(calls)
        safe = stream_safe_prefix(text, self.plan.family)
        delta = text[self.sent_chars:safe] if safe > self.sent_chars else ""
        self.sent_chars = max(self.sent_chars, safe)
        new: list[ToolCall] = []
        if self.plan.family == "hermes":
            end = text.rfind("</tool_call>")
            if end >= 0:
                new = self._new(parse_calls(text[: end + len("</tool_call>")], "hermes", names)[1])
        return delta, new

    def _new(self, calls: list[ToolCall]) -> list[ToolCall]:
        fresh = calls[len(self.calls):]
        self.calls.extend(fresh)
        return fresh


def final_message(plan: ChatPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished choice's (content, tool calls); content None when the reply is only calls."""
    if not plan.tools.active:
        return text, []
    content, calls = parse_calls(text, plan.family, {t.name for t in plan.tools.tools})
    if not calls:
        return text, []
    return (content or None), calls
