"""Tool calling: the parsers per family (table tests), the history rendering, the grammar that forces a call
(random walks on the real vocabulary always parse), and the served model through the official `openai`
client on both engines (tool_choice required / named / none / auto, parallel calls, tool turns, streamed
tool_calls deltas)."""

from __future__ import annotations

import json
import random

import openai
import pytest
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.pipeline.chat import ChatPlan, ToolStream
from gearshift.engine.pipeline.guided import GuidedSpec, compile_guide, vocab_from_hf_json
from gearshift.engine.pipeline.tools import (
    family_of,
    forced_grammar,
    parse_calls,
    parse_tools,
    render_messages,
    stream_safe_prefix,
)
from server_process import engine_param, running_server
from test_structured_output import random_walk

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                  "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}}
NAMES = {"get_weather", "add"}


@pytest.mark.parametrize("family,text,content,calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     "Sure.", [("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n'
               '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>',
     "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>{"name":"nope","arguments":{}}</tool_call>', None, []),  # unknown tool: text
    ("hermes", '<tool_call>{"name":"add", broken</tool_call>', None, []),
    ("hermes", '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n<tool_call>\n{"na',
     "", [("add", {"a": 1, "b": 2})]),  # a second call cut by max_tokens is dropped
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}', "", [("add", {"a": 5, "b": 6})]),
    ("llama3", "The answer is 4.", None, []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 1}}]', "", [("add", {"a": 1, "b": 1})]),
    ("mistral", "no calls here", None, []),
])
def test_parsers(family, text, content, calls):
    got_content, got = parse_calls(text, family, NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert got_content == (text if content is None else content)


def test_family_is_read_from_the_template():
    assert family_of("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert family_of("<|python_tag|>{{ x }}") == "llama3"
    assert family_of("[TOOL_CALLS] {{ x }}") == "mistral"
    assert family_of(None) == "hermes"


def test_tool_choice_validation():
    assert parse_tools([WEATHER], None, None).choice == "auto"
    assert parse_tools(None, None, None).choice == "none"
    req = parse_tools([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}, False)
    assert (req.choice, req.named, req.parallel, req.forced) == ("named", "add", False, True)
    for bad, param in [({"type": "function", "function": {"name": "missing"}}, "tool_choice"),
                       ("always", "tool_choice")]:
        with pytest.raises(InvalidRequestError) as e:
            parse_tools([WEATHER], bad, None)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError):
        parse_tools(None, "required", None)
    with pytest.raises(InvalidRequestError):
        parse_tools([WEATHER, WEATHER], None, None)
    with pytest.raises(InvalidRequestError):
        parse_tools([{"type": "function", "function": {"name": "has space"}}], None, None)


def test_history_with_tool_turns_becomes_hermes_text_for_a_template_without_tools():
    req = parse_tools([WEATHER], None, None)
    msgs = render_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
    ], req, native=False)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "<tools>" in msgs[0]["content"] and "get_weather" in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert msgs[3]["content"] == "<tool_response>\n-3C\n</tool_response>"


def test_stream_holds_back_what_may_become_a_call():
    assert stream_safe_prefix("Hello <tool", "hermes") == len("Hello ")
    assert stream_safe_prefix("Hello <tool_call>{", "hermes") == len("Hello ")
    assert stream_safe_prefix("Hello", "hermes") == 5
    plan = ChatPlan([], parse_tools([ADD], None, None), "hermes")
    s = ToolStream(plan)
    assert s.update("Let me <tool_c", False) == ("Let me ", [])
    text = 'Let me <tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    delta, calls = s.update(text, False)
    assert delta == "" and [c.name for c in calls] == ["add"]
    delta, calls = s.update(text, True)
    assert calls == [] and [c.name for c in s.calls] == ["add"]


@pytest.fixture(scope="module")
def vocab_and_tokenizer(smollm2_gguf):
    from gearshift.engine.loader import open_model
    from gearshift.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_model(open_model(str(smollm2_gguf)))
    return vocab_from_hf_json(tok._tok.to_str(), tok.vocab_size, tok.eos_token_ids), tok


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_always_parse(family, choice, vocab_and_tokenizer):
    vocab, tok = vocab_and_tokenizer
    req = parse_tools([WEATHER, ADD], {"type": "function", "function": {"name": "add"}} if choice == "named"
                      else "required", None)
    guide = compile_guide(GuidedSpec("lark", forced_grammar(req, family), param="tool_choice"), vocab)
    for seed in range(6):
        text = random_walk(guide.fork(), tok, random.Random(seed), limit=600)
        _, calls = parse_calls(text, family, NAMES)
        assert calls, text
        if choice == "named":
            assert {c.name for c in calls} == {"add"}
            assert len(calls) == 1


# ---- through the served model ------------------------------------------------------------------

@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def client(request, smollm2_gguf):
    with running_server(smollm2_gguf, request.param) as s:
        yield openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=300)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_and_named_calls_parse_on_the_served_model(client):
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                       max_tokens=96, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message
    for call in c.message.tool_calls:
        assert call.function.name in NAMES and isinstance(json.loads(call.function.arguments), dict)
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, ADD], max_tokens=64,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       parallel_tool_calls=False, temperature=0.7, seed=4)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    assert set(json.loads(calls[0].function.arguments)) == {"city"}


def test_streamed_tool_call_deltas_assemble_to_the_same_call(client):
    kw = dict(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=64,
              temperature=0, parallel_tool_calls=False)
    full = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in full]


def test_tool_turns_in_history_and_tool_choice_none(client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=24,
                                       temperature=0)  # auto: whatever the model says parses or stays text
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tools_are_400s(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=4)
