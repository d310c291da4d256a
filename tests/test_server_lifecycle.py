"""Back-pressure and lifecycle of a real `gearshift serve` process on both engines: client disconnects
abort and free KV blocks, a full queue answers 429, SIGTERM drains, API keys, startup errors."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_process import engine_param, free_port, metric, running_server

ENGINES = [engine_param("gguf"), engine_param("paged")]
PROMPT = "Write a long story about a lighthouse keeper and the storm."


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}


# Room for exactly 16 requests in flight: gguf runs 1 and queues 15; paged runs 4 and queues 12.
CAPACITY = {"gguf": ["--max-waiting", "15"], "paged": ["--max-num-seqs", "4", "--max-waiting", "12"]}


@pytest.fixture(scope="module", params=ENGINES)
def server(request, smollm2_gguf):
    """One server per engine for the tests below; the SIGTERM test, last, ends it."""
    with running_server(smollm2_gguf, request.param, "--drain-timeout", "60", *CAPACITY[request.param]) as s:
        s.engine = request.param
        yield s


def test_dropped_streams_abort_and_free_every_block(server):
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
    assert metric(text, "gearshift:request_success_total", 'finished_reason="abort"') == 16
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
    assert codes.count(200) <= 16


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
        text = server.metrics()
        assert metric(text, "gearshift:num_requests_running") == 0


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
