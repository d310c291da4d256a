"""Ollama's API through the official `ollama` client on both engines: chat with tools and `format`, show
(capabilities), list, ps, version, options mapping and validation, keep_alive, raw generate, images
refused with a clear message."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest
from server_process import engine_param, running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24}}}}}


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def client(request, smollm2_gguf):
    with running_server(smollm2_gguf, request.param) as s:
        yield ollama.Client(host=s.url, timeout=300)


def test_version_show_list_ps(client):
    # The ollama package (0.6) has no version() call: its own HTTP client asks, as `ollama --version` does.
    major, minor, patch = (int(x) for x in client._client.get("/api/version").json()["version"].split("."))
    assert (major, minor, patch) >= (0, 6, 4)  # VS Code's agent mode needs at least this
    show = client.show("smollm2")
    assert {"completion", "tools"} <= set(show.capabilities or [])
    assert "<|im_start|>" in show.template
    assert show.modelinfo["general.context_length"] > 0
    assert [m.model for m in client.list().models] == ["smollm2:latest"]
    assert [m.model for m in client.ps().models] == ["smollm2:latest"]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("other-model")
    assert e.value.status_code == 404


def test_chat_with_format_schema_and_json(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["color", "count"],
              "properties": {"color": {"enum": ["red", "blue"]}, "count": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}}}
    r = client.chat("smollm2", messages=[{"role": "user", "content": "Pick a color and a count."}],
                    format=schema, options={"temperature": 0.7, "seed": 5, "num_predict": 48}, keep_alive="5m")
    jsonschema.validate(json.loads(r.message.content), schema)
    parts = list(client.chat("smollm2", messages=[{"role": "user", "content": "JSON please"}], format="json",
                             stream=True, options={"temperature": 0, "num_predict": 32}))
    assert parts[-1].done and "".join(p.message.content for p in parts).startswith("{")


def test_chat_with_tools_returns_parsed_calls_when_the_model_calls(client):
    # Ollama has no tool_choice: the model decides. Whatever it says either parses into tool_calls (with
    # object arguments, Ollama's shape) or stays text; a tool turn in the history is accepted.
    r = client.chat("smollm2", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[WEATHER], options={"temperature": 0, "num_predict": 64})
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}]
    r = client.chat("smollm2", messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 16})
    assert r.done


def test_options_are_validated_and_raw_generate_works(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("smollm2", "Hi", options={"num_ctx": 10**7})
    assert e.value.status_code == 400 and "num_ctx" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("smollm2", "Hi", options={"num_predict": 0})
    assert e.value.status_code == 400
    r = client.generate("smollm2", "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n", raw=True,
                        options={"temperature": 0, "num_predict": 8, "num_ctx": 512, "top_k": 20, "min_p": 0.05,
                                 "repeat_penalty": 1.1, "stop": ["\n"]})
    assert r.done and r.eval_count <= 8


def test_images_and_suffix_are_refused_clearly(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("smollm2", "def add(a, b):", suffix="    return c")
    assert e.value.status_code == 400 and "suffix" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("smollm2", messages=[{"role": "user", "content": "what is this?", "images": ["aGVsbG8="]}])
    assert e.value.status_code == 400 and "images" in str(e.value)
