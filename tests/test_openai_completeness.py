"""OpenAI completeness through the official `openai` client on both engines: batched prompts and `echo` on
/v1/completions, `user` and `stream_options` accepted, and the stateless `responses.create` subset (text,
streamed events, function calls, text.format)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_process import engine_param, running_server

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 24}}}}


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def client(request, smollm2_gguf):
    with running_server(smollm2_gguf, request.param) as s:
        yield openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=300)


def test_batched_prompts_number_choices_like_openai(client):
    prompts = ["The capital of France is", "One, two, three,"]
    r = client.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0, n=2, user="u-1")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert r.choices[0].text == singles[0].choices[0].text and r.choices[2].text == singles[1].choices[0].text
    streamed: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0, n=2,
                                           stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(4)] == [c.text for c in r.choices]
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_echo_prepends_the_prompt(client):
    r = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.choices[0].text == "Once upon a time" + plain.choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=5, temperature=0, echo=True, stream=True))
    assert text == r.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="x", max_tokens=2, echo=True, logprobs=1)


def test_responses_text_and_stream(client):
    # Asked once first, so both calls below meet the same prefix-cache state (llama.cpp's logits differ in
    # the last digits between a cold prompt and a cached one; see test_server_api.py).
    client.responses.create(model="smollm2", input="Say hello.", instructions="Be brief.", max_output_tokens=12,
                            temperature=0)
    r = client.responses.create(model="smollm2", input="Say hello.", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.output_tokens <= 12
    events = list(client.responses.create(model="smollm2", input="Say hello.", instructions="Be brief.",
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_function_calls_and_history(client):
    r = client.responses.create(model="smollm2", input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                max_output_tokens=64, temperature=0, parallel_tool_calls=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"] and "city" in json.loads(calls[0].arguments)
    follow = client.responses.create(
        model="smollm2", max_output_tokens=16, temperature=0, tools=[WEATHER],
        input=[{"role": "user", "content": "Weather in Oslo?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Snow, -3 C"}])
    assert follow.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="smollm2", input="x", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="smollm2", input="x", tools=[{"type": "web_search"}])


def test_responses_text_format_json_schema(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
              "properties": {"ok": {"type": "boolean"}}}
    r = client.responses.create(model="smollm2", input="Is water wet? Answer in JSON.", max_output_tokens=16,
                                temperature=0, text={"format": {"type": "json_schema", "name": "a", "schema": schema,
                                                                "strict": True}})
    assert isinstance(json.loads(r.output_text)["ok"], bool)


def tokenize(client, text: str) -> list[int]:
    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/tokenize"
    return httpx.post(url, json={"prompt": text, "add_special_tokens": False}, timeout=30).json()["tokens"]


def test_logit_bias_steers_and_bad_keys_are_400s(client):
    prompt = "My favourite word is"
    paris = tokenize(client, " Paris")[0]
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=3, temperature=0,
                                  logit_bias={str(paris): 100})
    assert r.choices[0].text.startswith(" Paris")
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0)
    first = tokenize(client, plain.choices[0].text)[0]
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0,
                                  logit_bias={str(first): -100})
    assert r.choices[0].text != plain.choices[0].text
    for bad in ({"abc": 1}, {"10000000": 1}, {"5": 1000}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2", prompt="x", max_tokens=1, logit_bias=bad)
