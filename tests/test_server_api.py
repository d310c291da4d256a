"""The API surface of a real `gearshift serve` process on the real SmolLM2 model, on both engines: OpenAI's
through the official `openai` client (raw httpx where the client would refuse to send the input), and
Ollama's through plain httpx."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from server_process import engine_param, metric, running_server

PROMPT = "Write a short story about a lighthouse keeper."
MESSAGES = [{"role": "user", "content": "Tell me about the sea in three sentences."}]


# Room for 16 requests in flight: gguf runs 1 and queues up to 16 (one spare: its worker may not have
# taken the first off the queue yet); paged runs 4 and queues 12.
CAPACITY = {"gguf": ["--max-waiting", "16"], "paged": ["--max-num-seqs", "4", "--max-waiting", "12"]}


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def server(request, smollm2_gguf):
    """One server per engine for this module (a paged start costs tens of seconds on 2 cores); the
    SIGTERM test, last in the file, ends it."""
    with running_server(smollm2_gguf, request.param, "--drain-timeout", "60", *CAPACITY[request.param]) as s:
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


# ---- Ollama's API, implemented once in the shared layer ----

def _ndjson(r: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def test_ollama_chat_streams_ndjson_and_matches_openai_greedy(server, client):
    body = {"model": "smollm2:latest", "messages": MESSAGES,
            "options": {"temperature": 0, "num_predict": 24}}
    httpx.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=120)  # same cache state
    whole = httpx.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=120)
    assert whole.status_code == 200, whole.text
    final = whole.json()
    assert final["done"] is True and final["message"]["role"] == "assistant"
    assert final["done_reason"] in ("stop", "length")
    assert final["prompt_eval_count"] == len(tokenize(server, messages=MESSAGES))
    assert 1 <= final["eval_count"] <= 24
    assert final["total_duration"] >= final["eval_duration"] > 0  # nanoseconds
    assert final["total_duration"] > 1000

    r = httpx.post(server.url + "/api/chat", content=json.dumps(body), timeout=120)  # no content-type, as curl
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = _ndjson(r)
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(x["message"]["content"] for x in lines) == final["message"]["content"]
    assert greedy_chat(client).choices[0].message.content == final["message"]["content"]


def test_ollama_generate(server):
    r = httpx.post(server.url + "/api/generate", json={
        "model": "smollm2", "prompt": "Why is the sky blue?", "options": {"temperature": 0, "num_predict": 8}},
        timeout=120)
    lines = _ndjson(r)
    final = lines[-1]
    assert final["done"] and final["eval_count"] <= 8 and isinstance(final["context"], list)
    assert len(final["context"]) == final["prompt_eval_count"] + final["eval_count"]
    assert "".join(x["response"] for x in lines)
    raw = httpx.post(server.url + "/api/generate", json={
        "model": "smollm2", "prompt": "1, 2, 3,", "raw": True, "stream": False,
        "options": {"temperature": 0, "num_predict": 4}}, timeout=120).json()
    assert raw["prompt_eval_count"] == len(tokenize(server, prompt="1, 2, 3,"))
    load = httpx.post(server.url + "/api/generate", json={"model": "smollm2"}).json()
    assert load["done"] is True and load["done_reason"] == "load"


def test_ollama_listing_and_errors(server):
    tags = httpx.get(server.url + "/api/tags").json()["models"]
    assert tags[0]["name"] == "smollm2:latest" and tags[0]["size"] > 50_000_000
    assert tags[0]["details"]["format"] == "gguf"
    ps = httpx.get(server.url + "/api/ps").json()["models"]
    assert ps[0]["name"] == "smollm2:latest" and ps[0]["context_length"] > 0
    assert httpx.get(server.url + "/api/version").json()["version"]
    missing = httpx.post(server.url + "/api/chat", json={"model": "llama3", "messages": MESSAGES})
    assert missing.status_code == 404 and "llama3" in missing.json()["error"]
    bad = httpx.post(server.url + "/api/chat", json={"model": "smollm2", "messages": MESSAGES,
                                                     "options": {"temperature": "warm"}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]


# ---- back-pressure and lifecycle, per engine ----

PROMPT_LONG = "Write a long story about a lighthouse keeper and the storm."


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": "smollm2", "prompt": PROMPT_LONG, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True}


def test_dropped_streams_abort_and_free_every_block(server):
    aborted_before = metric(server.metrics(), "gearshift:request_success_total", 'finished_reason="abort"')
    async def drop_16() -> float:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as http:
            started = asyncio.Event()

            async def one() -> None:
                async with http.stream("POST", "/v1/completions", json=_body(400, True)) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        started.set()
                        await asyncio.sleep(3600)  # hold the stream open until cancelled

            tasks = [asyncio.create_task(one()) for _ in range(16)]
            await asyncio.wait_for(started.wait(), 120)
            await asyncio.sleep(0.3)  # mid-generation
            text = (await http.get("/metrics")).text
            assert metric(text, "gearshift:num_requests_running") + metric(
                text, "gearshift:num_requests_waiting") == 16
            for t in tasks:
                t.cancel()  # closes each connection
            await asyncio.gather(*tasks, return_exceptions=True)
            return time.monotonic()

    dropped_at = asyncio.run(drop_16())
    while True:
        text = server.metrics()
        running = metric(text, "gearshift:num_requests_running")
        waiting = metric(text, "gearshift:num_requests_waiting")
        free = metric(text, "gearshift:kv_cache_free_blocks")
        total = metric(text, "gearshift:kv_cache_total_blocks")
        if running == 0 and waiting == 0 and free == total:
            break
        assert time.monotonic() - dropped_at < 1.0, f"after 1s: {running=} {waiting=} {free=}/{total}"
        time.sleep(0.05)
    assert metric(text, "gearshift:request_success_total", 'finished_reason="abort"') == aborted_before + 16
    assert metric(text, "gearshift:kv_cache_usage_perc") == 0
    # The engine still serves.
    r = httpx.post(server.v1 + "/completions", json=_body(4, False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_overload_answers_429_and_admitted_requests_complete(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json=_body(12, False)) for _ in range(24)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"].isdigit()
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 12
            assert r.json()["choices"][0]["finish_reason"] == "length"
    assert codes.count(200) <= 17


def test_sigterm_drains_in_flight_refuses_new_and_exits_0(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=_body(64, True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with httpx.Client(base_url=server.url, timeout=30) as other:
                ready = other.get("/ready")
                assert ready.status_code == 503
                refused = other.post("/v1/completions", json=_body(4, False))
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "service_unavailable"
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]
    assert server.proc.wait(timeout=60) == 0
