"""Async scheduling (engine/async_step.py) on the real SmolLM2 GGUF, CPU, fp32: forced on, it gives the same
token ids and finish reasons as forced off, for every kind of request, through the offline API, the engine
stepped by hand (aborts, stop strings and requests arriving while a step is in flight) and a real
`gearshift serve` process. Each test also checks that steps really were launched ahead.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from gearshift.engine import LLM, SamplingParams
from gearshift.engine.async_step import PLACEHOLDER, resolve_async, samples_on_device
from gearshift.engine.block_manager import BlockManager
from gearshift.engine.scheduler import Scheduler
from gearshift.engine.scheduler_output import SchedulerOutput
from gearshift.engine.sequence import Sequence
from server_process import metric, running_server

BLOCK = 4
BLOCKS = 150  # 600 tokens: the 16-request batch below outgrows it and must preempt
KV_BYTES = BLOCKS * BLOCK * 2 * 30 * 3 * 64 * 4  # SmolLM2: 30 layers, 3 KV heads of 64, fp32 K and V
SETTINGS = dict(dtype="float32", max_model_len=256, kv_cache_memory=KV_BYTES, block_size=BLOCK, max_num_seqs=16,
                max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def llms(smollm2_gguf) -> dict[str, LLM]:
    return {mode: LLM(model=smollm2_gguf, async_scheduling=mode, **SETTINGS) for mode in ("on", "off")}


def assert_no_leak(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks == BLOCKS
    assert stats.num_running == stats.num_waiting == 0
    engine.block_manager.check([])  # every block free or cached, no reference left behind


def choices(outputs) -> list[tuple]:
    return [(c.index, c.token_ids, c.finish_reason, c.stop_reason, c.text)
            for o in outputs for c in o.outputs]


@pytest.mark.parametrize(("mode", "device", "tp", "on"), [
    ("auto", "cuda", 1, True), ("auto", "cpu", 1, False), ("on", "cpu", 1, True), ("off", "cuda", 1, False),
    ("auto", "cuda", 2, False), ("on", "cuda", 2, False)])
def test_when_it_is_on(mode, device, tp, on) -> None:
    assert resolve_async(mode, device, tp) is on


def _scheduler_with(n: int, cap: int = 4) -> tuple[Scheduler, list[Sequence]]:
    """A real scheduler whose n greedy sequences have their prompts computed (the step after a prefill)."""
    sched = Scheduler(BlockManager(64, BLOCK), cap, 64, 256)
    seqs = [Sequence(f"r{i}", list(range(10 + i, 16 + i)), SamplingParams(temperature=0.0)) for i in range(n)]
    for seq in seqs:
        sched.add(seq)
    sched.on_step_done(sched.schedule())
    return sched, seqs


def test_flight_bookkeeping_placeholders_inputs_and_when_to_continue() -> None:
    """The pure part of async_step.py on a real scheduler: placeholders turn every live row into a decode
    and go again without a trace; the next step's inputs are the flight's ids, reordered when its rows
    are; it continues only when the next schedule can hold nothing but decodes of the flight's rows."""
    import torch
    from gearshift.engine import async_step

    sched, seqs = _scheduler_with(3)
    flight = async_step.launched(SchedulerOutput(), seqs, torch.tensor([7, 8, 9]))
    before = [list(s.token_ids) for s in seqs]
    assert async_step.can_continue(flight, sched)
    sched.finish(seqs[1])  # aborted between steps: no placeholder, not scheduled
    async_step.add_placeholders(flight)
    out = sched.schedule()
    assert out.num_decodes == len(out.seqs) == 2 and [s.token_ids for s in out.seqs] == [[PLACEHOLDER]] * 2
    assert async_step.next_input_ids(flight, out).tolist() == [7, 9]
    from gearshift.engine.model_runner import with_previous_ids

    step_ids = torch.tensor([PLACEHOLDER, 5, PLACEHOLDER, 11, 12])  # 3 decodes (one not the flight's), a prefill
    assert with_previous_ids(step_ids, torch.tensor([7, 0, 9])).tolist() == [7, 5, 9, 11, 12]
    async_step.drop_placeholders(flight)
    async_step.drop_placeholders(flight)  # idempotent
    assert [list(s.token_ids) for s in seqs] == before
    whole = SchedulerOutput(num_decodes=2, scheduled=[seqs[0], seqs[2]])
    assert async_step.next_input_ids(async_step.launched(whole, [seqs[0], seqs[2]], torch.tensor([1, 2])),
                                     whole).tolist() == [1, 2]
    sched.add(Sequence("new", [1, 2, 3], SamplingParams(temperature=0.0)))  # a greedy prefill may join
    assert async_step.can_continue(flight, sched)
    sched.add(Sequence("drawn", [1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9)))  # so may a drawn one
    assert async_step.can_continue(flight, sched)
    sched.add(Sequence("lp", [1, 2, 3], SamplingParams(temperature=0.7, logprobs=2)))  # and a logprobs one
    assert async_step.can_continue(flight, sched)
    sched.add(Sequence("json", [1, 2, 3], SamplingParams(guide=object())))  # a grammar row's mask: no
    assert not async_step.can_continue(flight, sched)
    full, rows = _scheduler_with(4, cap=4)  # ... unless the running batch is at max_num_seqs
    full.add(Sequence("new", [1, 2, 3], SamplingParams(temperature=0.7, guide=object())))
    assert async_step.can_continue(async_step.launched(SchedulerOutput(), rows, torch.tensor([1, 2, 3, 4])), full)
    assert not async_step.can_continue(async_step.launched(SchedulerOutput(), rows[:3], torch.tensor([1, 2, 3])), full)


@pytest.mark.parametrize(("params", "ok"), [
    (SamplingParams(temperature=0.0), True), (SamplingParams(temperature=0.8), True),
    (SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1, seed=3), True),
    (SamplingParams(temperature=0.0, logprobs=1), True), (SamplingParams(temperature=0.9, logprobs=0), True),
    (SamplingParams(temperature=0.0, logit_bias={5: 1.0}), True),
    (SamplingParams(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3), True),
    (SamplingParams(temperature=0.0, guide=object()), False)])
def test_which_rows_sample_on_the_device(params, ok) -> None:
    assert samples_on_device([Sequence("r", [1, 2], params)]) is ok


def test_greedy_batch_with_early_stops_and_preemption_equals_sync(llms) -> None:
    """All greedy: every decode step runs ahead. max_tokens from 8 to 23 (more KV than the cache holds), stop tokens that end some
    choices after 2-5 tokens, EOS allowed on others: a finished request's extra token must not leak out."""
    prompts = [list(range(1000 + 50 * i, 1041 + 50 * i + i % 4)) for i in range(16)]  # no shared prefix
    plain = [SamplingParams(temperature=0.0, max_tokens=8 + i, ignore_eos=i not in (0, 9)) for i in range(16)]
    ref = llms["off"].generate([{"prompt_token_ids": p} for p in prompts], plain)
    params = []
    for i, (p, out) in enumerate(zip(plain, ref, strict=True)):
        stop = [out.token_ids[1 + i % 4]] if i % 4 == 1 and len(out.token_ids) > 5 else []
        params.append(SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=p.ignore_eos,
                                     stop_token_ids=stop))
    assert sum(bool(p.stop_token_ids) for p in params) >= 2
    results = {}
    for mode, llm in llms.items():
        engine = llm.llm_engine
        before = (engine.num_async_steps, engine.stats().num_preemptions)
        results[mode] = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        results[mode + "-counts"] = (engine.num_async_steps - before[0], engine.stats().num_preemptions - before[1])
        assert_no_leak(llm)
    assert choices(results["on"]) == choices(results["off"])
    assert [len(o.token_ids) for o in results["on"]] != [p.max_tokens for p in params], "no choice stopped early"
    launched, preempted = results["on-counts"]
    assert launched >= 10 and preempted > 0, results
    assert results["off-counts"][0] == 0


def test_sampling_guided_logprobs_and_stop_strings_fall_back_and_equal_sync(llms) -> None:
    """Seeded n=2 sampling, a grammar, logprobs and a stop string beside greedy requests: the steps with
    a grammar row run synchronously, the rest ahead; every choice is the same."""
    from gearshift.engine.pipeline.guided import GuidedSpec, compile_guide, vocab_from_hf_json

    tok = llms["off"].get_tokenizer()
    guide = compile_guide(GuidedSpec("regex", r"[0-9]{3}-[a-c]{2}"),
                          vocab_from_hf_json(tok._tok.to_str(), tok.vocab_size, tok.eos_token_ids))
    prompt = "Once upon a time"
    [full] = llms["off"].generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    stop = full.text[6:9]
    prompts = [prompt, "My favourite animal is the", "Write a serial number:", "The sky is", prompt, "Hi"]
    params = [SamplingParams(temperature=0.0, max_tokens=10, stop=[stop]),
              SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=6, seed=1234, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, guide=guide.fork()),
              SamplingParams(temperature=0.0, max_tokens=4, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)]
    results = {}
    for mode, llm in llms.items():
        before = llm.llm_engine.num_async_steps
        results[mode] = llm.generate(prompts, params)  # each choice forks its own grammar state
        results[mode + "-launched"] = llm.llm_engine.num_async_steps - before
        assert_no_leak(llm)
    assert choices(results["on"]) == choices(results["off"])
    assert results["on"][0].finish_reason == "stop" and results["on"][0].outputs[0].stop_reason == stop
    assert results["on"][0].text == full.text[:full.text.find(stop)]
    assert [lp.token_id for lp in results["on"][3].outputs[0].logprobs] == results["off"][3].token_ids
    assert results["on-launched"] > 0 and results["off-launched"] == 0


DRAWN = [dict(temperature=0.8, top_p=0.9, logprobs=3), dict(temperature=1.0, top_k=20, seed=77),
         dict(temperature=1.3, min_p=0.1, logprobs=0),
         dict(temperature=0.7, repetition_penalty=1.3), dict(temperature=0.9, presence_penalty=0.8, frequency_penalty=0.6),
         dict(temperature=0.0, logit_bias={198: 5.0, 13: -100.0}), dict(temperature=0.0, logprobs=2),
         dict(n=2, temperature=1.0),
         dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0)]


def test_drawn_and_penalized_rows_run_ahead_and_equal_sync(llms) -> None:
    """Temperature, top-k/top-p/min-p (seeded and not), penalties, logit_bias and logprobs beside greedy rows, with
    stop tokens that end some choices early, EOS on others and preemption (more KV than the cache holds):
    the device-side sampler runs these steps ahead with the synchronous engine's tokens (unseeded rows
    are keyed by the request id, given by hand here, and their position, so the same in both engines)."""
    import torch

    prompts = [list(range(2000 + 40 * i, 2041 + 40 * i + i % 3)) for i in range(16)]

    def params(stops: dict[int, list[int]]) -> list[SamplingParams]:
        return [SamplingParams(**DRAWN[i % len(DRAWN)], max_tokens=8 + i, ignore_eos=i not in (2, 11),
                               stop_token_ids=stops.get(i, [])) for i in range(16)]

    def run(engine, tag: str, ps: list[SamplingParams]) -> dict[str, list]:
        for i, (p, sp) in enumerate(zip(prompts, ps, strict=True)):
            engine.add_request(f"{tag}{i}", p, sp)
        seen = _drive(engine, lambda i: None)
        return {rid[len(tag):]: [(c.index, c.token_ids, c.finish_reason,
                                  [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs or []]) for c in outs[-1].outputs]
                for rid, outs in seen.items()}

    first = run(llms["off"].llm_engine, "d", params({}))
    # stop tokens that end a few sampled choices after 2-4 tokens (the same request ids: the same draws)
    stops = {i: [first[str(i)][0][1][2 + i % 3]] for i in (0, 4, 9) if len(first[str(i)][0][1]) > 5}
    assert len(stops) >= 2
    results = {}
    for mode, llm in llms.items():
        engine = llm.llm_engine
        before = (engine.num_async_steps, engine.stats().num_preemptions)
        results[mode] = run(engine, "d", params(stops))
        results[mode + "-counts"] = (engine.num_async_steps - before[0], engine.stats().num_preemptions - before[1])
        assert_no_leak(llm)
    # Tokens, finish reasons and the logprobs' token ids exactly; their values to 1e-4: the CPU forward's fp32
    # logits move by ~1e-6 with the batch's shape (a stale row, a recompute after preemption), never a token.
    exact = {mode: {k: [(c[:3], [(t, list(top)) for t, _, top in c[3]]) for c in v] for k, v in results[mode].items()}
             for mode in ("on", "off")}
    assert exact["on"] == exact["off"]
    on, off = ([v for k in sorted(results[mode]) for c in results[mode][k] for _, lp, top in c[3] for v in (lp, *top.values())]
               for mode in ("on", "off"))
    assert len(on) > 100 and torch.allclose(torch.tensor(on), torch.tensor(off), atol=1e-4, rtol=0)
    assert any(r[0][2] == "stop" for r in results["on"].values()), "no choice stopped early"
    assert [lp[0] for lp in results["on"]["0"][0][3]] == results["on"]["0"][0][1]  # a logprob per token
    assert all(len(lp[2]) == 3 for lp in results["on"]["0"][0][3])
    assert len({tuple(c[1]) for c in results["on"]["7"]}) == 2, "the two unseeded choices should differ"
    launched, preempted = results["on-counts"]
    assert launched >= 10 and preempted > 0, results
    assert results["off-counts"][0] == 0


def _drive(engine, on_step) -> dict[str, list]:
    """Step until done; on_step(i) runs between steps; every output per request, in order."""
    seen: dict[str, list] = {}
    i = 0
    while engine.has_unfinished():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
        on_step(i)
        i += 1
    return seen


def test_abort_stop_string_and_a_new_request_while_a_step_is_in_flight(llms) -> None:
    """By hand, as the server drives it: between steps (with one launched ahead) a request is aborted,
    one is ended by a stop string (finish_choice) and one is added. Nothing is reported for the first
    two after that, every other request ends once with the tokens the synchronous engine gives it."""
    engine = llms["on"].llm_engine
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = {"a": [300 + i for i in range(20)], "b": [500 + i for i in range(9)],
               "c": [700 + i for i in range(13)], "late": [900 + i for i in range(7)]}
    ref = {rid: llms["off"].generate([{"prompt_token_ids": p}], long)[0].token_ids for rid, p in prompts.items()}
    for rid in ("a", "b", "c"):
        engine.add_request(rid, prompts[rid], long)
    before = engine.num_async_steps
    ended: dict[str, int] = {}

    def between(i: int) -> None:
        if i == 4:
            assert engine.num_async_steps > before  # a step is in flight now
            out = engine.abort("a")
            assert out.finished and out.finish_reason == "abort"
            ended["a"] = len(out.token_ids)
            assert out.token_ids == ref["a"][:len(out.token_ids)]
        if i == 6:
            engine.finish_choice("b", 0)  # what the server does when its text processor sees a stop string
            ended["b"] = -1
        if i == 7:
            engine.add_request("late", prompts["late"], long)

    seen = _drive(engine, between)
    assert seen["a"][-1].token_ids == ref["a"][:ended["a"]] and not seen["a"][-1].finished
    assert not any(o.finished for o in seen["b"]) and seen["b"][-1].token_ids == ref["b"][:len(seen["b"][-1].token_ids)]
    for rid in ("c", "late"):
        assert [o.finished for o in seen[rid]].count(True) == 1 and seen[rid][-1].finished
        assert seen[rid][-1].token_ids == ref[rid] and seen[rid][-1].finish_reason == "length"
        lengths = [len(o.token_ids) for o in seen[rid]]
        assert lengths == sorted(set(lengths)), "one new token per output, never one twice"
    assert engine.num_async_steps - before >= 20
    assert_no_leak(llms["on"])


def test_server_with_async_scheduling_forced_on(smollm2_gguf, llms) -> None:
    """A real `gearshift serve` (paged, CPU, fp32, --async-scheduling on): concurrent streamed completions of
    different lengths, one ended by a stop string, give the offline synchronous engine's text; every
    block is free afterwards."""
    offline = llms["off"]
    tok = offline.get_tokenizer()
    prompts = [tok.encode(f"List {k} facts about the sea:") for k in range(6)]
    maxes = [3, 11, 7, 16, 5, 9]
    ref = offline.generate([{"prompt_token_ids": p} for p in prompts],
                           [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in maxes])
    stop = ref[3].text[4:8]

    async def run(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            async def one(i: int) -> str:
                body = {"model": "smollm2", "prompt": prompts[i], "max_tokens": maxes[i], "temperature": 0,
                        "ignore_eos": True, "stream": True, **({"stop": [stop]} if i == 3 else {})}
                text = ""
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    with running_server(smollm2_gguf, "paged", "--async-scheduling", "on", "--max-num-seqs", "4",
                        "--dtype", "float32") as server:  # fp32 like the reference: batch invariant on CPU
        texts = asyncio.run(run(server.url))
        for _ in range(300):  # the worker publishes its stats after the step that ended the last request
            page = server.metrics()
            if metric(page, "gearshift:num_requests_running") == 0:
                break
            time.sleep(0.1)
        assert metric(page, "gearshift:num_requests_running") == 0
        assert metric(page, "gearshift:kv_cache_free_blocks") == metric(page, "gearshift:kv_cache_total_blocks")
    want = [o.text for o in ref]
    want[3] = want[3][:want[3].find(stop)]
    assert texts == want


@pytest.mark.gpu
def test_on_cuda_async_equals_sync_and_a_launch_never_waits_for_the_device(smollm2_gguf) -> None:
    """CUDA, fp32 (batch invariant there too: tests/test_gpu_engine.py), CUDA graphs: the same batch of
    greedy and drawn rows (temperature, top-p/top-k, seeds, penalties, logprobs) with different lengths gives
    the same tokens async on and off; and in the steady state a whole step() (schedule, input prep, launch,
    sampling on the device, the previous step's ids and logprobs read from pinned memory after its event)
    makes no call torch counts as a synchronization (set_sync_debug_mode "error" raises on one)."""
    import torch

    settings = dict(SETTINGS, device="cuda", kv_cache_memory=64 * 2**20)
    prompts = [list(range(1000 + 50 * i, 1020 + 50 * i + i % 7)) for i in range(12)]
    drawn = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=40, seed=5),
             dict(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5, logprobs=2)]
    params = [SamplingParams(**drawn[i % 4], max_tokens=6 + 3 * i, ignore_eos=True) for i in range(12)]
    outs = {}
    for mode in ("off", "on"):
        llm = LLM(model=smollm2_gguf, async_scheduling=mode, **settings)
        outs[mode] = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
        if mode == "on":
            engine = llm.llm_engine
            for i, p in enumerate(prompts):
                engine.add_request(f"s{i}", p, SamplingParams(**drawn[i % 4], max_tokens=40, ignore_eos=True))
            for _ in range(4):  # the prefill, then decodes launched ahead
                engine.step()
            before = engine.num_async_steps
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(5):
                    assert len(engine.step()) == len(prompts)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert engine.num_async_steps - before == 5
            while engine.has_unfinished():
                engine.step()
        del llm
    assert outs["on"] == outs["off"]
