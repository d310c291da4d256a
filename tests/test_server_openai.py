"""The OpenAI surface of a real `gearshift serve` process on the real SmolLM2 model, on both engines,
through the official `openai` client (and raw httpx where the client would refuse to send the input)."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_process import engine_param, running_server

PROMPT = "Write a short story about a lighthouse keeper."
MESSAGES = [{"role": "user", "content": "Tell me about the sea in three sentences."}]


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def server(request, smollm2_gguf):
    with running_server(smollm2_gguf, request.param) as s:
        s.engine = request.param
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def tokenize(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_models_lists_the_served_name(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert models[0].owned_by == "gearshift"


def greedy_chat(client, **kw):
    return client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0, **kw)


def test_chat_greedy_streamed_equals_non_streamed_and_usage_is_right(client, server):
    # The same request first, so that every call below meets the same prefix-cache state: llama.cpp's
    # logits differ in the last digits between a cold prompt and one re-evaluated from a cached prefix.
    greedy_chat(client)
    full = greedy_chat(client)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len(tokenize(server, messages=MESSAGES))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert 1 <= full.usage.completion_tokens <= 24

    chunks = list(greedy_chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_counts_tokens_exactly_with_ignore_eos(client, server):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    # The text is exactly those 12 tokens.
    back = httpx.post(server.url + "/tokenize", json={"prompt": r.choices[0].text, "add_special_tokens": False}).json()
    assert abs(back["count"] - 12) <= 2  # re-tokenizing text may merge or split at the edges


def test_completion_streamed_equals_non_streamed_greedy(client):
    client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=20, temperature=0)  # same cache state
    full = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=20, temperature=0)
    parts = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_choices_and_usage(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 18

    chunks = list(client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=6, n=2,
                                                 temperature=1.0, seed=7, stream=True,
                                                 extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_seed_reproduces_sampled_text(client):
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=1.0,
                                           top_p=0.95, seed=seed)
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)


def test_stop_string_ends_the_text_before_it(client):
    base = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {base!r}"
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    streamed = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0,
                                              stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in streamed) == r.choices[0].text


def test_logprobs_shapes(client):
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-3  # greedy picks the best
    c = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_tokenize_detokenize_roundtrip(server):
    ids = tokenize(server, prompt="Hello there, sailor!", add_special_tokens=False)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids})
    assert r.json() == {"prompt": "Hello there, sailor!"}


# ---- errors, in OpenAI's shape ----

def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert e.value.body["param"] == "model" and "gpt-9" in e.value.body["message"]


def test_malformed_json_and_wrong_types_are_400_naming_the_field(server):
    url = server.v1 + "/chat/completions"
    err = _error(httpx.post(url, content=b'{"model": "smollm2", "messages": [', headers={
        "content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    err = _error(httpx.post(url, json={"model": "smollm2", "messages": MESSAGES, "temperature": "hot"}), 400)
    assert err["param"] == "temperature" and "temperature" in err["message"]
    err = _error(httpx.post(url, json={"model": "smollm2", "messages": "hello"}), 400)
    assert err["param"] == "messages"
    err = _error(httpx.post(url, json={"model": "smollm2"}), 400)
    assert err["param"] == "messages"
    err = _error(httpx.post(url, json=[1, 2, 3]), 400)
    err = _error(httpx.post(server.v1 + "/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": "9"}), 400)
    assert err["param"] == "max_tokens"
    _error(httpx.get(server.v1 + "/nothing-here"), 404)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("n", 0),
                                         ("max_tokens", 0), ("presence_penalty", 3.0), ("top_k", -5),
                                         ("min_p", 2.0), ("top_logprobs", 50), ("repetition_penalty", 0.0)])
def test_bad_sampling_values_are_400(client, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4,
                                       extra_body={field: value, **extra})
    assert e.value.body["param"] == field, e.value.body
    assert field in e.value.body["message"]


def test_prompt_too_long_is_400(client, server):
    long_prompt = "the sea " * 5000  # far past the context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"
    # The server is fine afterwards.
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices[0].text is not None
