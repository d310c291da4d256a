"""Fuzzing against real `gearshift serve` processes on the real SmolLM2 GGUF: whatever a client sends, the
server never answers 5xx (nor dies), and every 4xx carries an error body.

Schemathesis covers every endpoint from the app's own OpenAPI schema (gguf). A hypothesis strategy of
hostile bodies (lone surrogates, numbers past 64 bits, JSON nested 20 000 deep, wrong types, truncated or
non-UTF-8 text) goes at the OpenAI and Ollama routes of both engines while healthy streams run alongside,
each of which must end intact ([DONE] / done)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

pytest.importorskip("llama_cpp")
schemathesis = pytest.importorskip("schemathesis")

from gearshift.engine.backends.gguf import GGUFBackend  # noqa: E402
from gearshift.engine.config import EngineConfig  # noqa: E402
from gearshift.engine.server.app import build_app  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_process import engine_param, running_server  # noqa: E402

# The schema comes from the app itself (building it loads no model); the cases go to a real server.
_config = EngineConfig(model="smollm2.gguf", engine="gguf", served_model_name="smollm2")
schema = schemathesis.openapi.from_dict(build_app(GGUFBackend(_config), _config).openapi())


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    # A short context and request timeout bound what one generated request can cost (n=128 with no
    # max_tokens...): such cases end as 400 or 408, which the fuzz is allowed to see.
    with running_server(smollm2_gguf, "gguf", "--max-model-len", "64", "--request-timeout", "0.25",
                        "--max-waiting", "4") as s:
        yield s


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, server):
    # Name the served model in every body that names one, so the cases get past the 404 into
    # validation and generation (unknown models are tested in test_server_api.py).
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "smollm2"
    response = case.call(base_url=server.url, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert "error" in response.json(), response.text
    assert server.proc.poll() is None, f"the server died:\n{server.log_tail()}"


# ---- hostile bodies on both engines, with healthy streams running alongside ----------------------------

ROUTES = {
    "/v1/completions": {"model": "smollm2", "prompt": "Hello", "max_tokens": 4},
    "/v1/chat/completions": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "/api/generate": {"model": "smollm2", "prompt": "Hello", "stream": False, "options": {"num_predict": 4}},
    "/api/chat": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                  "options": {"num_predict": 4}},
    "/tokenize": {"prompt": "Hello"},
    "/detokenize": {"tokens": [1, 2, 3]},
}
FIELDS = ["model", "prompt", "messages", "max_tokens", "n", "seed", "temperature", "top_p", "top_k", "stop",
          "stop_token_ids", "logprobs", "top_logprobs", "stream", "stream_options", "options", "tokens",
          "logit_bias", "response_format", "tools", "num_predict", "ignore_eos"]
DEEP = "\u0000DEEP\u0000"  # stands for a nesting too deep to build as a Python object

surrogate_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=8),
                           st.sampled_from(["\ud800", "\udfff", "\ud83d", "\udc00\ud800"]), st.text(max_size=8))
huge_number = st.sampled_from([2**64, 2**64 - 1, 2**63, -(2**63) - 1, 10**30, -(10**30), 1e308, -1e308, 2**31,
                               -1, 0, 0.5, -0.0])
deep_json = st.integers(min_value=50, max_value=20_000).map(lambda d: (DEEP, d))
wrong_type = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=20),
                       st.lists(st.integers(), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                             max_size=3))
hostile = st.one_of(surrogate_text, huge_number, deep_json, wrong_type,
                    st.lists(st.one_of(surrogate_text, huge_number), min_size=1, max_size=4),
                    st.just([{"role": "user", "content": "\ud800"}]),
                    st.just({"num_predict": 2**64, "seed": -(2**70), "top_k": 2**40, "stop": ["\udfff"]}))


def encode_body(body: dict) -> bytes:
    """JSON text of `body`; a (DEEP, depth) value becomes that many nested arrays."""
    deep = [v for v in body.values() if isinstance(v, tuple) and v and v[0] == DEEP]
    text = json.dumps({k: ("__deep__" if isinstance(v, tuple) else v) for k, v in body.items()})  # \ud800 escapes
    if deep:
        text = text.replace('"__deep__"', "[" * deep[0][1] + "]" * deep[0][1])
    return text.encode()


@st.composite
def hostile_request(draw):
    path = draw(st.sampled_from(sorted(ROUTES)))
    body = dict(ROUTES[path])
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        body[name] = draw(hostile)
    raw = encode_body(body)
    cut = draw(st.sampled_from(["none", "none", "none", "truncate", "bad_utf8", "deep_raw"]))
    if cut == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif cut == "bad_utf8":
        raw = raw.replace(b'"Hello"', b'"\xff\xfeHello"').replace(b'"Hi"', b'"\xc3("')
    elif cut == "deep_raw":
        raw = b"[" * 100_000 + b"]" * 100_000
    return path, raw


class Bystanders(threading.Thread):
    """Healthy streams, one after another, for as long as the fuzz runs: every one must end intact."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.done, self.broken = url, threading.Event(), 0, []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as http:
            while not self.stop.is_set():
                self.openai(http) if self.done % 2 == 0 else self.ollama(http)
                self.done += 1

    def openai(self, http: httpx.Client) -> None:
        body = {"model": "smollm2", "prompt": "Count to ten:", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
        finish = [json.loads(x)["choices"][0].get("finish_reason") for x in lines[:-1] if "choices" in x]
        if r.status_code != 200 or lines[-1:] != ["[DONE]"] or finish[-1:] != ["length"]:
            self.broken.append(("openai", r.status_code, lines[-2:]))

    def ollama(self, http: httpx.Client) -> None:
        body = {"model": "smollm2", "prompt": "Count to ten:", "options": {"num_predict": 12, "temperature": 0}}
        with http.stream("POST", "/api/generate", json=body) as r:
            lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
        if r.status_code != 200 or not lines or not lines[-1].get("done") or "error" in lines[-1]:
            self.broken.append(("ollama", r.status_code, lines[-2:]))


@pytest.fixture(scope="module", params=[engine_param("gguf"), engine_param("paged")])
def fuzzed(request, smollm2_gguf):
    with running_server(smollm2_gguf, request.param, "--max-model-len", "256", "--max-waiting", "64") as server:
        bystanders = Bystanders(server.url)
        bystanders.start()
        yield server, bystanders
        bystanders.stop.set()
        bystanders.join(timeout=300)
        assert bystanders.done >= 2 and not bystanders.broken, bystanders.broken


@given(case=hostile_request())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_hostile_bodies_get_4xx_and_bystanders_finish(fuzzed, case):
    server, bystanders = fuzzed
    path, raw = case
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code < 500, f"{path} {raw[:300]!r} -> {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err if path.startswith("/api/") else err["message"], r.text
    assert server.proc.poll() is None, f"the server died:\n{server.log_tail()}"
    assert httpx.get(server.url + "/health").status_code == 200
    assert not bystanders.broken, bystanders.broken
