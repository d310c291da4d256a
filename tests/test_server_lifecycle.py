"""Lifecycle of a real `gearshift serve` process that is engine-independent (on the fast-starting gguf
engine): drain timeout, API keys, request timeouts, startup errors. The per-engine back-pressure and
drain tests live in test_server_api.py, on its shared servers."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_process import free_port, metric, running_server, serve_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")
PROMPT = "Write a long story about a lighthouse keeper and the storm."


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}


def test_drain_timeout_aborts_what_is_left_and_exits_0(smollm2_gguf):
    with running_server(smollm2_gguf, "gguf", "--drain-timeout", "1") as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json=_body(3000, True)) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                server.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"abort"' in rest[-2]
        assert server.proc.wait(timeout=60) == 0


def test_api_key_required_in_openai_shape(smollm2_gguf):
    with running_server(smollm2_gguf, "gguf", env={"GEARSHIFT_API_KEY": "s3cret"}) as server:
        for key in ("wrong", None):
            http = httpx.post(server.v1 + "/chat/completions", json={"model": "smollm2", "messages": []},
                              headers={"Authorization": f"Bearer {key}"} if key else {})
            assert http.status_code == 401
            assert http.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=server.v1, api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "smollm2"
        assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(server.url + "/metrics").status_code == 200


def test_request_timeout_is_408(smollm2_gguf):
    with running_server(smollm2_gguf, "gguf", "--request-timeout", "0.5") as server:
        r = httpx.post(server.v1 + "/completions", json=_body(3000, False), timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        # The 408 cancels the request; the gguf worker lets go of it at its next token, so the running
        # gauge drops just after the response, not necessarily before it (seen under load).
        deadline = time.monotonic() + 30
        while metric(server.metrics(), "gearshift:num_requests_running") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server.metrics(), "gearshift:num_requests_running") == 0


@pytest.mark.parametrize("model", ["/nonexistent/model.gguf", "NOT_A_GGUF"])
def test_bad_model_is_one_line_exit_2(tmp_path, model):
    if model == "NOT_A_GGUF":
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"this is not a gguf file" * 100)
        model = str(bad)
    proc = subprocess.run([sys.executable, "-m", "gearshift.engine.cli", "serve", "--model", model,
                           "--engine", "gguf", "--port", str(free_port()), "--log-level", "error"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gearshift serve: error:") and "Traceback" not in proc.stderr


def test_requests_while_the_model_loads_get_503_with_retry_after(smollm2_gguf, tmp_path):
    """The paged server answers /health at once and loads in the background (seconds): until /ready, chat,
    completions and /tokenize answer 503 + Retry-After in OpenAI's shape, never a 4xx blaming the client."""
    port = free_port()
    cmd = [sys.executable, "-m", "gearshift.engine.cli", "serve", *serve_args(smollm2_gguf, "paged"),
           "--port", str(port)]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONSAFEPATH": "1"})
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    before: list[httpx.Response] = []
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if http.get("/ready").status_code == 200:
                        break
                    before += [http.post("/v1/chat/completions", json=chat),
                               http.post("/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2}),
                               http.post("/tokenize", json={"model": "smollm2", "prompt": "Hi"})]
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.1)
            assert http.get("/ready").status_code == 200, (tmp_path / "serve.log").read_text()[-2000:]
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    # Loading the paged engine takes seconds; requests that came in after /ready turned 200 don't count.
    early = [r for r in before if r.status_code != 200]
    assert early, "no request landed while the model was loading"
    for r in early:
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.request.url, r.status_code, r.text)
        assert "not ready" in r.json()["error"]["message"]
