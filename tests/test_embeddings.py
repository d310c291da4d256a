"""Embeddings on both engines through the official clients: OpenAI's `embeddings.create` (float and base64,
batches, token-id inputs) and Ollama's `embed` / `embeddings`. Vectors are the last token's final-normed
hidden state, L2-normalised; a batch equals its inputs one by one, and the two engines agree."""

from __future__ import annotations

import base64

import numpy as np
import ollama
import openai
import pytest
from server_process import engine_param, running_server

TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force.", "Bonjour"]
SEEN: dict[str, np.ndarray] = {}  # engine -> vectors of TEXTS, for the cross-engine check


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def server(request, smollm2_gguf):
    # A short context keeps the truncation test cheap on 2 CPUs (an input is cut to it).
    with running_server(smollm2_gguf, request.param, "--max-model-len", "512") as s:
        s.engine = request.param
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)


def test_openai_batch_float_and_base64(client, server):
    r = client.embeddings.create(model="smollm2", input=TEXTS)
    vecs = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1, 2] and vecs.shape == (3, 576)  # SmolLM2-135M's hidden size
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 3
    one = np.array(client.embeddings.create(model="smollm2", input=TEXTS[1]).data[0].embedding)
    np.testing.assert_allclose(one, vecs[1], atol=2e-3)  # a batch row equals the input alone
    raw = client.embeddings.with_raw_response.create(model="smollm2", input=TEXTS, encoding_format="base64")
    b64 = raw.http_response.json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), vecs[0], atol=1e-6)
    SEEN[server.engine] = vecs


def test_token_id_inputs_and_bad_inputs(client):
    ids = client.embeddings.create(model="smollm2", input=[[1, 2, 3], [4, 5]]).data
    assert len(ids) == 2
    for bad in ([], "", [[10**9]]):
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="smollm2", input=bad)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="x", dimensions=8)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="word " * 2000)  # over the context


def test_ollama_embed_and_legacy_embeddings(server):
    c = ollama.Client(host=server.url, timeout=300)
    r = c.embed("smollm2", input=TEXTS[:2])
    vecs = np.array(r.embeddings)
    assert vecs.shape == (2, 576) and r.prompt_eval_count > 2
    legacy = np.array(c.embeddings("smollm2", prompt=TEXTS[0]).embedding)
    np.testing.assert_allclose(legacy, vecs[0], atol=2e-3)
    if server.engine in SEEN:
        np.testing.assert_allclose(vecs, SEEN[server.engine][:2], atol=2e-3)
    assert len(c.embed("smollm2", input="word " * 2000).embeddings[0]) == 576  # truncate=True by default
    with pytest.raises(ollama.ResponseError):
        c.embed("smollm2", input="word " * 2000, truncate=False)


def test_both_engines_embed_alike():
    if len(SEEN) < 2:
        pytest.skip("needs both engines' vectors (runs on the second engine)")
    cos = np.sum(SEEN["gguf"] * SEEN["paged"], axis=1)
    assert (cos > 0.97).all(), cos
