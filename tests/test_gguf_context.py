"""The gguf engine's context limit is the one asked for, on a real `gearshift serve --engine gguf` process
with a context (64) that is not a multiple of 256.

llama.cpp pads its context up to a multiple of 256 (`Llama.n_ctx()` says 256 for 64) while llama-cpp-python
keeps its token buffer `input_ids` at the 64 asked for. The engine once took the padded size as its limit:
a 65..256-token prompt passed the length check and `Llama.eval` then overran that buffer, a 500
"could not broadcast input array from shape (64,) into (40,)" (seen under the fuzz, tests/test_server_fuzz.py).
"""

from __future__ import annotations

import httpx
import openai
import pytest
from server_process import running_server

pytest.importorskip("llama_cpp")

CTX = 64  # not a multiple of 256: llama.cpp pads it to 256


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    # Prefix caching on (the default): llama-cpp-python's prefix reuse is how the overrun first showed.
    with running_server(smollm2_gguf, "gguf", "--max-model-len", str(CTX), "--threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def ids(n: int, offset: int = 0) -> list[int]:
    """n ordinary token ids (no BOS/EOS/control tokens in SmolLM2's range 1000+)."""
    return [1000 + (offset + i) % 5000 for i in range(n)]


def assert_context_error(err: openai.BadRequestError, n_prompt: int) -> None:
    body = err.response.json()["error"]
    assert err.status_code == 400 and body["code"] == "context_length_exceeded", body
    assert f"maximum context length is {CTX} tokens" in body["message"] and str(n_prompt) in body["message"]


def test_the_advertised_context_is_the_one_asked_for(server, client):
    assert [m.max_model_len for m in client.models.list().data] == [CTX]  # type: ignore[attr-defined]
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Hello"}, timeout=30).json()
    assert tok["max_model_len"] == CTX


def test_prompt_past_the_context_after_a_cached_prefix_is_400(server, client):
    prefix = ids(24)
    first = client.completions.create(model="smollm2", prompt=prefix, max_tokens=1, temperature=0)
    assert first.choices[0].finish_reason == "length"
    # 24 cached + 64 to evaluate: was the 500 "could not broadcast ... (64,) into (40,)"
    for n in (CTX + 24, CTX + 1, 4 * CTX):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="smollm2", prompt=prefix + ids(n - 24, 24), max_tokens=1)
        assert_context_error(e.value, n)
    with pytest.raises(openai.BadRequestError) as e:  # streamed: refused before the stream starts
        client.completions.create(model="smollm2", prompt=ids(CTX + 5), max_tokens=1, stream=True)
    assert_context_error(e.value, CTX + 5)
    assert server.proc.poll() is None


def test_prompt_and_completion_fill_the_context_exactly(client):
    # A prompt as long as the context leaves no room for one token: 400 naming the context length.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=ids(CTX), max_tokens=1)
    assert_context_error(e.value, CTX)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=ids(CTX - 4), max_tokens=5)
    assert_context_error(e.value, CTX - 4)
    # Up to the last slot, on top of a cached prefix of the same tokens and cold.
    for offset in (0, 0, 7):
        full = client.completions.create(model="smollm2", prompt=ids(CTX - 4, offset), max_tokens=4,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert full.usage.completion_tokens == 4 and full.choices[0].finish_reason == "length"
    last = client.completions.create(model="smollm2", prompt=ids(CTX - 1), max_tokens=1, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert last.usage.completion_tokens == 1 and last.choices[0].finish_reason == "length"


def test_embedding_inputs_past_the_context_are_400(client):
    ok = client.embeddings.create(model="smollm2", input=[ids(CTX)])
    assert len(ok.data) == 1 and len(ok.data[0].embedding) > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2", input=[ids(CTX + 36)])
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
