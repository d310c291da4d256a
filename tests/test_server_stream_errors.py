"""A request that ends inside its stream (the request timeout passes mid-generation) ends the stream the
OpenAI way on both generating routes of a real `gearshift serve` (gguf, SmolLM2): an error event with the
408's body, then `data: [DONE]`, never a cut connection (framing.sse_events, which
/v1/chat/completions and /v1/completions share). A timeout before the first token is a plain 408
(test_server_lifecycle.py)."""

from __future__ import annotations

import importlib.util
import json

import httpx
import openai
import pytest
from server_process import running_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")
PROMPT = "Write a long story about a lighthouse keeper and the storm."
LONG = {"model": "smollm2", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
BODIES = {
    "/v1/completions": {**LONG, "prompt": PROMPT},
    "/v1/chat/completions": {**LONG, "messages": [{"role": "user", "content": PROMPT}]},
}


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    # Long enough for the first token under any load, far too short for 3000 tokens.
    with running_server(smollm2_gguf, "gguf", "--request-timeout", "3") as s:
        yield s


@pytest.mark.parametrize("path", list(BODIES))
def test_timeout_mid_stream_is_an_error_event_then_done(server, path):
    with httpx.Client(base_url=server.url, timeout=120) as http, http.stream("POST", path, json=BODIES[path]) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2, events  # tokens streamed before the deadline
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error", error
    assert all("error" not in json.loads(e) for e in events[:-2])


def test_the_openai_client_raises_the_timeout_from_the_stream(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=3000, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = 0
    with pytest.raises(openai.APIError, match="request timeout"):
        for _ in stream:
            chunks += 1
    assert chunks > 1  # the role chunk and tokens came first
