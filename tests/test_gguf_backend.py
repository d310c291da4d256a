"""The gguf engine on the real SmolLM2 GGUF: driven directly with asyncio, then through a real
`gearshift serve --engine gguf` process with the official `openai` client. The reference everywhere is
`llama_cpp.Llama` called directly with the same settings.

Prefix caching is off in the equality checks: llama.cpp's logits differ in the last digits between a cold
prompt and one evaluated on top of a cached prefix, and a fresh reference is always cold.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest
from gearshift.engine.backends.gguf import GGUFBackend
from gearshift.engine.backends.gguf_loader import import_llama_cpp
from gearshift.engine.config import EngineConfig, usable_cpus
from gearshift.engine.errors import EngineOverloadedError, InvalidRequestError, ModelLoadError
from gearshift.engine.outputs import RequestOutput
from gearshift.engine.sampling_params import SamplingParams
from server_process import free_port, metric, running_server

pytest.importorskip("llama_cpp")

CTX = 1024
THREADS = 1  # one thread: no barrier waits on a CPU shared with other jobs; the default is checked below
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village by the sea, there lived"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(backend: GGUFBackend, prompt: str | list[int], params: SamplingParams,
                  rid: str = "r") -> list[RequestOutput]:
    return [out async for out in backend.generate(rid, prompt, params)]


@pytest.fixture(scope="module")
def backend(smollm2_gguf):
    b = GGUFBackend(EngineConfig(model=str(smollm2_gguf), engine="gguf", max_model_len=CTX, threads=THREADS,
                                 enable_prefix_caching=False))
    run(b.start())
    yield b
    run(b.stop())


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=CTX, n_threads=THREADS, n_threads_batch=THREADS,
                           verbose=False)


def ref_completion(reference, prompt: str, **kw: Any) -> dict:
    reference.reset()  # cold, like the backend without prefix caching
    return reference.create_completion(prompt, **kw)


# ----- the backend driven directly -----

def test_start_reads_context_threads_and_template(backend):
    assert backend.ready() and backend.name == "gguf" and backend.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert backend.max_model_len == CTX
    assert backend._llm.n_threads == THREADS
    prompt = backend.apply_chat_template(MESSAGES)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert backend.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("<|im_end|>\n")
    # encode/decode round-trip; special tokens in rendered chat text are parsed as single tokens
    ids = backend.encode(prompt, add_special_tokens=False)
    [im_start] = backend.encode("<|im_start|>", add_special_tokens=False)
    assert ids[0] == im_start and ids.count(im_start) == prompt.count("<|im_start|>") == 3
    assert backend.decode(backend.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_chat_template_renders_like_llama_cpp_formatter(backend, reference):
    llama_cpp = import_llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = reference.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    conversation = [{"role": "system", "content": "Be brief."}, *MESSAGES,
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    assert backend.apply_chat_template(conversation) == fmt(messages=conversation).prompt
    assert llama_cpp.__version__


def test_greedy_equals_llama_cpp_direct_and_usage_is_right(backend, reference):
    prompt = backend.apply_chat_template(MESSAGES)
    outs = run(collect(backend, prompt, SamplingParams(max_tokens=16, temperature=0.0)))
    final = outs[-1]
    ref = ref_completion(reference, prompt, max_tokens=16, temperature=0.0)
    assert final.finished and final.text == ref["choices"][0]["text"]
    assert final.finish_reason == ref["choices"][0]["finish_reason"] == "length"
    assert len(final.prompt_token_ids) == ref["usage"]["prompt_tokens"]
    assert len(final.token_ids) == ref["usage"]["completion_tokens"] == 16
    # streamed snapshots are cumulative: each text a prefix of the next, one token more each time
    for a, b in zip(outs, outs[1:], strict=False):
        assert b.text.startswith(a.text) and len(b.token_ids) >= len(a.token_ids)
    assert final.first_token_time and final.first_scheduled_time and final.arrival_time


def test_sampling_with_seed_penalties_and_filters_equals_llama_cpp(backend, reference):
    kw = dict(temperature=0.9, top_p=0.9, top_k=50, min_p=0.05, seed=1234, presence_penalty=0.5,
              frequency_penalty=0.3)
    params = SamplingParams(max_tokens=16, repetition_penalty=1.1, **kw)
    a = run(collect(backend, STORY, params))[-1]
    b = run(collect(backend, STORY, params))[-1]
    assert a.text == b.text  # reproducible
    ref = ref_completion(reference, STORY, max_tokens=16, repeat_penalty=1.1, **kw)
    assert a.text == ref["choices"][0]["text"]
    other = run(collect(backend, STORY, SamplingParams(max_tokens=16, repetition_penalty=1.1, **{**kw, "seed": 99})))
    assert other[-1].text != a.text


def test_n_choices_run_one_after_another_with_per_choice_seeds(backend):
    params = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=5)
    final = run(collect(backend, STORY, params))[-1]
    assert [o.index for o in final.outputs] == [0, 1] and all(o.finish_reason == "length" for o in final.outputs)
    one = run(collect(backend, STORY, SamplingParams(max_tokens=8, temperature=1.0, seed=5)))[-1]
    assert final.outputs[0].text == one.text and final.outputs[1].text != one.text


def test_stop_strings_cut_the_text_and_are_never_streamed(backend, reference):
    free = ref_completion(reference, STORY, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    words = free.split()
    stop = words[len(words) // 2]  # a word the greedy text really contains
    outs = run(collect(backend, STORY, SamplingParams(max_tokens=24, temperature=0.0, stop=[stop])))
    final = outs[-1]
    ref = ref_completion(reference, STORY, max_tokens=24, temperature=0.0, stop=[stop])
    assert final.finish_reason == "stop" and final.outputs[0].stop_reason == stop
    assert final.text == ref["choices"][0]["text"] == free[: free.index(stop)]
    assert all(stop not in o.text for o in outs)
    kept = run(collect(backend, STORY, SamplingParams(max_tokens=24, temperature=0.0, stop=[stop],
                                                      include_stop_str_in_output=True)))[-1]
    assert kept.text == final.text + stop


def test_each_token_is_its_own_output_and_the_context_is_left_as_found(backend):
    """Outputs reach the event loop as the next llama_decode starts (gguf_decode._DecodeHandoff), the last
    one at once: still one output per token, in order, and the context's own decode method afterwards."""
    prompt = backend.apply_chat_template(MESSAGES)
    outs = run(collect(backend, prompt, SamplingParams(max_tokens=8, temperature=0.0)))
    assert [len(o.token_ids) for o in outs] == list(range(1, 9))
    assert [o.finished for o in outs] == [False] * 7 + [True]
    assert "decode" not in vars(backend._llm._ctx)


def test_eos_ends_with_stop_and_ignore_eos_runs_to_max_tokens(backend):
    prompt = backend.apply_chat_template([{"role": "user", "content": "Say hi."}])
    final = run(collect(backend, prompt, SamplingParams(max_tokens=200, temperature=0.0)))[-1]
    eos = backend._llm.token_eos()
    assert final.finish_reason == "stop" and final.outputs[0].stop_reason is None
    assert final.token_ids[-1] == eos  # counted in usage like vLLM, never in the text
    long = run(collect(backend, prompt, SamplingParams(max_tokens=len(final.token_ids) + 4, temperature=0.0,
                                                       ignore_eos=True)))[-1]
    assert long.finish_reason == "length" and len(long.token_ids) == len(final.token_ids) + 4


def test_logprobs_match_llama_cpp_with_all_logits(backend, smollm2_gguf):
    llama_cpp = import_llama_cpp()
    ref_llm = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=256, n_threads=THREADS, logits_all=True,
                              verbose=False)
    ref = ref_llm.create_completion(STORY, max_tokens=4, temperature=0.0, logprobs=3)["choices"][0]["logprobs"]
    ref_llm.close()
    final = run(collect(backend, STORY, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)))[-1]
    lps = final.outputs[0].logprobs
    assert lps is not None and len(lps) == 4
    for lp, token_id, want in zip(lps, final.token_ids, ref["token_logprobs"], strict=True):
        assert lp.token_id == token_id and lp.logprob == pytest.approx(want, abs=2e-3)
        assert len(lp.top) == 3 and next(iter(lp.top)) == token_id  # greedy: the best is the chosen one
        assert list(lp.top.values()) == sorted(lp.top.values(), reverse=True)


def test_bad_requests_are_refused_before_queuing(backend):
    long_prompt = "hello " * (CTX + 10)
    with pytest.raises(InvalidRequestError, match="maximum context length is 1024") as e:
        run(collect(backend, long_prompt, SamplingParams(max_tokens=4)))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        run(collect(backend, "hi", SamplingParams(max_tokens=CTX)))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        run(collect(backend, [1, 2, 10**7], SamplingParams(max_tokens=4)))
    assert backend.stats().num_waiting == 0 and backend.stats().num_running == 0
    # max_tokens=None means "up to the context" (this short answer ends with EOS well before)
    prompt = backend.apply_chat_template([{"role": "user", "content": "Say hi."}])
    final = run(collect(backend, prompt, SamplingParams(max_tokens=None, temperature=0.0)))[-1]
    assert final.finish_reason == "stop" and len(final.token_ids) < 100


async def _wait_for(cond, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_closing_the_iterator_aborts_at_the_next_token(backend):
    async def scenario() -> None:
        agen = backend.generate("long", STORY, SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True))
        for _ in range(3):
            out = await agen.__anext__()
        assert backend.stats().num_running == 1
        await agen.aclose()
        waited = await _wait_for(lambda: backend.stats().num_running == 0, timeout=2.0)
        assert waited < 1.0 and backend._llm.n_tokens < len(out.prompt_token_ids) + 60
        # the engine serves the next request at once
        final = [o async for o in backend.generate("next", STORY, SamplingParams(max_tokens=3))][-1]
        assert len(final.token_ids) == 3

    run(scenario())


@pytest.fixture(scope="module")
def small_queue_backend(smollm2_gguf):
    b = GGUFBackend(EngineConfig(model=str(smollm2_gguf), engine="gguf", max_model_len=256, max_waiting=1))
    run(b.start())
    yield b


def test_full_queue_is_overloaded_and_stop_aborts_everything(small_queue_backend):
    b = small_queue_backend
    assert b._llm.n_threads == usable_cpus()  # no --threads: the CPUs this process may really use
    forever = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario() -> None:
        running = b.generate("a", STORY, forever)
        await running.__anext__()
        queued = b.generate("b", STORY, SamplingParams(max_tokens=3))
        queued_first = asyncio.ensure_future(queued.__anext__())
        await _wait_for(lambda: b.stats().num_waiting == 1)
        assert b.stats().num_running == 1
        with pytest.raises(EngineOverloadedError, match="max_waiting=1"):
            await b.generate("c", STORY, SamplingParams(max_tokens=3)).__anext__()
        await running.aclose()  # FIFO: the queued request runs next and completes
        outs = [await queued_first] + [o async for o in queued]
        assert outs[-1].finished and len(outs[-1].token_ids) == 3
        # stop(): the running request and the waiting one both end with 'abort'
        r1 = b.generate("d", STORY, forever)
        await r1.__anext__()
        r2 = b.generate("e", STORY, forever)
        r2_first = asyncio.ensure_future(r2.__anext__())
        await _wait_for(lambda: b.stats().num_waiting == 1)
        # r1's worker queues tokens its consumer has not read yet: stop() must not close the model their
        # detokenization needs (it did: ModelNotReadyError in r1's stream instead of its 'abort' end).
        await asyncio.sleep(0.3)
        await b.stop()
        assert (await r2_first).finish_reason == "abort"
        last = [o async for o in r1][-1]
        assert last.finished and last.finish_reason == "abort"
        assert not b.ready()

    run(scenario())


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, smollm2_gguf):
    d = tmp_path_factory.mktemp("broken")
    data = smollm2_gguf.read_bytes()
    i = data.index(b"general.architecture")
    j = data.index(b"llama", i)
    files = {
        "not_gguf": b"<html>this is not a model</html>" * 50,
        "truncated": data[: len(data) // 3],
        "unknown_arch": data[:j] + b"zzzzz" + data[j + 5:],
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = d / f"{name}.gguf"
        paths[name].write_bytes(blob)
    return paths


@pytest.mark.parametrize("name,reason", [
    ("not_gguf", "is not a GGUF file"),
    ("truncated", "model is corrupted or incomplete"),
    ("unknown_arch", "unknown model architecture: 'zzzzz'"),
])
def test_broken_files_fail_to_start_with_the_reason(broken_models, name, reason):
    b = GGUFBackend(EngineConfig(model=str(broken_models[name]), engine="gguf"))
    with pytest.raises(ModelLoadError, match=reason):
        run(b.start())
    assert not b.ready()


# ----- through a real `gearshift serve --engine gguf` process -----

@pytest.fixture(scope="module")
def server(smollm2_gguf):
    with running_server(smollm2_gguf, "gguf", "--max-model-len", str(CTX), "--threads", str(THREADS),
                        "--no-prefix-caching", "--max-waiting", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def test_server_greedy_chat_and_completion_equal_llama_cpp_direct(client, reference):
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0)
    llama_chat = reference.metadata["tokenizer.chat_template"]
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    prompt = Jinja2ChatFormatter(template=llama_chat, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=MESSAGES).prompt
    ref = ref_completion(reference, prompt, max_tokens=16, temperature=0.0)
    assert chat.choices[0].message.content == ref["choices"][0]["text"]
    assert chat.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert chat.usage.completion_tokens == ref["usage"]["completion_tokens"] == 16

    parts = list(client.completions.create(model="smollm2", prompt=STORY, max_tokens=16, temperature=0, stream=True))
    ref = ref_completion(reference, STORY, max_tokens=16, temperature=0.0)
    assert "".join(p.choices[0].text for p in parts) == ref["choices"][0]["text"]


def _long_body(stream: bool = True) -> dict:
    return {"model": "smollm2", "prompt": STORY, "max_tokens": 900, "temperature": 0, "stream": stream,
            "ignore_eos": True}


def test_server_disconnect_aborts_and_full_queue_is_429(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        # 1. a client that leaves mid-stream: the engine stops generating for it within a second
        with http.stream("POST", "/v1/completions", json=_long_body()) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data: ")
        left = time.monotonic()
        while metric(server.metrics(), "gearshift:num_requests_running") != 0:
            assert time.monotonic() - left < 1.0, "still running 1s after the client left"
            time.sleep(0.05)
        generated = metric(server.metrics(), "gearshift:generation_tokens_total")
        time.sleep(0.3)
        assert metric(server.metrics(), "gearshift:generation_tokens_total") == generated
        assert metric(server.metrics(), "gearshift:request_success_total", 'finished_reason="abort"') >= 1

    # 2. one running, one waiting (max-waiting 1): the third gets a 429 in OpenAI's shape
    async def burst() -> tuple[int, int, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async with http.stream("POST", "/v1/completions", json=_long_body()) as running:
                assert running.status_code == 200
                waiting = asyncio.create_task(http.post("/v1/completions", json={**_long_body(False), "max_tokens": 2}))
                deadline = time.monotonic() + 10
                while metric((await http.get("/metrics")).text, "gearshift:num_requests_waiting") != 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                refused = await http.post("/v1/completions", json={**_long_body(False), "max_tokens": 2})
            done = await waiting  # the running stream closed: the waiting request is served
            return running.status_code, done.status_code, refused

    first, second, refused = run(burst())
    assert (first, second) == (200, 200)
    assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_serve_broken_file_is_one_clear_line_and_exit_2(broken_models):
    # (the other broken files are covered on the backend above; each CLI start costs seconds)
    name, reason = "unknown_arch", "unknown model architecture: 'zzzzz'"
    proc = subprocess.run([sys.executable, "-m", "gearshift.engine.cli", "serve", "--model",
                           str(broken_models[name]), "--engine", "gguf", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gearshift serve: error:") and reason in last
