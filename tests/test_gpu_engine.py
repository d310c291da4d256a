"""The paged engine end to end on a CUDA GPU: Triton kernels, CUDA-graph decode, preemption, prefix cache.

Every test needs a GPU (skipped cleanly without one). The engine under test keeps a small KV cache
(KV_BLOCKS blocks of 16 tokens), so a batch of 32 requests outgrows it and must preempt; decode batches
of 1..32 sequences replay the CUDA graphs of buckets 1, 2, 4, 8, 16 and 32 with padding rows.
The CPU path (torch attention, no graphs) is the reference: fp32 greedy tokens must agree with it.
"""

from __future__ import annotations

import pytest
import torch
from gearshift.engine import LLM, SamplingParams
from gearshift.engine.loader import open_model

pytestmark = pytest.mark.gpu

BLOCK = 16
KV_BLOCKS = 32
MAX_LEN = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def kv_bytes(model: str, blocks: int) -> int:
    cfg = open_model(model).config
    return blocks * 2 * cfg.num_layers * BLOCK * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 K and V


def make_llm(model: str, device: str, **kw) -> LLM:
    return LLM(model=model, device=device, dtype="float32", max_model_len=MAX_LEN,
               kv_cache_memory=kv_bytes(model, KV_BLOCKS), block_size=BLOCK, max_num_seqs=32,
               max_num_batched_tokens=512, **kw)


@pytest.fixture(scope="module")
def gpu_llm(smollm2_gguf) -> LLM:
    return make_llm(str(smollm2_gguf), "cuda")


def prompts(tok) -> list[list[int]]:
    """32 prompts of ~10 to ~60 tokens; half share one long prefix (prefix-cache hits)."""
    system = tok.encode("You are a careful assistant. Answer in one short sentence, and never make up facts. ")
    topics = ["the moon", "rivers", "bread", "violins", "glaciers", "chess", "tea", "bees", "volcanoes",
              "maps", "owls", "salt", "clocks", "whales", "paper", "rain"]
    out = []
    for i, topic in enumerate(topics):
        also = "".join(f" and {t}" for t in topics[:i % 5])
        out.append(system + tok.encode(f"Question {i}: what is interesting about {topic}{also}?"))
        out.append(tok.encode(f"Tell me about {topic}{' in detail' * (i % 4)}."))
    return out


def assert_no_leak(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks == KV_BLOCKS
    engine.block_manager.check([])


def test_decode_runs_in_cuda_graphs(gpu_llm: LLM) -> None:
    runner = gpu_llm.llm_engine.runner
    assert runner.device.type == "cuda" and runner.graphs is not None
    assert runner.graphs.buckets == [1, 2, 4, 8, 16, 32]
    mixed = runner.mixed_graphs  # mixed prefill + decode steps: token buckets up to the 512-token budget
    assert mixed is not None and mixed.token_buckets == [32, 64, 128, 256, 512]
    assert sorted(mixed.graphs) == [(t, b) for t in (32, 64, 128, 256, 512) for b in runner.graphs.buckets]


def test_batch_invariance_with_prefix_hits_and_preemption(gpu_llm: LLM) -> None:
    ps = prompts(gpu_llm.get_tokenizer())
    engine = gpu_llm.llm_engine
    before = engine.stats()
    batched = gpu_llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY)
    stats = engine.stats()
    assert stats.num_preemptions > before.num_preemptions, "the batch was meant to outgrow the KV cache"
    assert stats.prefix_cache_hits > before.prefix_cache_hits
    assert_no_leak(gpu_llm)
    for p, out in zip(ps, batched, strict=True):
        [alone] = gpu_llm.generate([{"prompt_token_ids": p}], GREEDY)
        assert out.token_ids == alone.token_ids and len(out.token_ids) == GREEDY.max_tokens
    assert_no_leak(gpu_llm)


def test_gpu_greedy_equals_cpu_and_eager(smollm2_gguf, gpu_llm: LLM) -> None:
    """Graph replay (decode and mixed steps), the eager GPU path and the CPU torch path give the same fp32
    greedy tokens. Prompts are added one step apart, so each prefill shares a step with earlier decodes; a
    suffix no other test uses keeps the prefix cache from serving them whole."""
    tok = gpu_llm.get_tokenizer()
    ps = [p + tok.encode(" Reply briefly, please.") for p in prompts(tok)[:6]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def staggered(llm: LLM) -> list[list[int]]:
        engine, done = llm.llm_engine, {}

        def step() -> None:
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids

        for i, p in enumerate(ps):
            engine.add_request(f"staggered-{i}", p, params)
            step()
        while engine.has_unfinished():
            step()
        return [done[f"staggered-{i}"] for i in range(len(ps))]

    mixed = gpu_llm.llm_engine.runner.mixed_graphs
    replays = mixed.replays
    graphs = staggered(gpu_llm)
    assert mixed.replays >= replays + len(ps), "each prefill beside decodes was meant to replay a mixed graph"
    eager_llm = make_llm(str(smollm2_gguf), "cuda", enforce_eager=True)
    assert eager_llm.llm_engine.runner.graphs is None and eager_llm.llm_engine.runner.mixed_graphs is None
    eager = staggered(eager_llm)
    del eager_llm
    cpu = [o.token_ids for o in make_llm(str(smollm2_gguf), "cpu").generate(
        [{"prompt_token_ids": p} for p in ps], params)]
    assert graphs == eager == cpu


def test_seeded_sampling_and_abort_on_gpu(gpu_llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=6, seed=1234, ignore_eos=True)
    [a] = gpu_llm.generate("My favourite animal is the", params)
    [b] = gpu_llm.generate("My favourite animal is the", params)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    engine = gpu_llm.llm_engine
    engine.add_request("a", list(range(300, 340)), SamplingParams(temperature=0.0, max_tokens=50))
    engine.add_request("b", list(range(400, 420)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort("a")
    assert out is not None and out.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert_no_leak(gpu_llm)


def test_bfloat16_engine_runs(smollm2_gguf) -> None:
    """The GPU default dtype: bf16 weights and KV cache, graphs captured, every request ends."""
    llm = LLM(model=str(smollm2_gguf), device="cuda", dtype="bfloat16", max_model_len=MAX_LEN,
              kv_cache_memory="64Mi", max_num_seqs=16)
    runner = llm.llm_engine.runner
    assert runner.graphs is not None and runner.kv_cache.dtype == torch.bfloat16
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(llm.get_tokenizer())[:20]], GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens and o.finish_reason == "length" for o in outs)


def test_long_fresh_prefill_routes_to_flash_sdpa(smollm2_gguf, monkeypatch) -> None:
    """A 1500-token prompt with no cached prefix (bf16) takes the dense SDPA route
    (engine/kernels/prefill_route.py) and gives the logits the unified kernel gives, in one step and beside
    decodes of earlier sequences."""
    from gearshift.engine.model import llama
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    llm = LLM(model=str(smollm2_gguf), device="cuda", dtype="bfloat16", max_model_len=2048,
              kv_cache_memory="256Mi", max_num_seqs=4, max_num_batched_tokens=2048)
    runner = llm.llm_engine.runner
    bs = runner.block_size
    ids = (llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog. ") * 200)[:1500]
    fresh = ScheduledSeq(0, ids, 0, list(range(-(-1500 // bs))), True)
    runner.execute(SchedulerOutput(seqs=[ScheduledSeq(1, ids[:40], 0, [200, 201, 202], True)]))
    steps = [SchedulerOutput(seqs=[fresh]),
             SchedulerOutput(seqs=[ScheduledSeq(1, [ids[40]], 40, [200, 201, 202], True), fresh])]
    for step in steps:
        _, _, meta, _ = runner.prepare(step)
        assert llama.plan_route(meta, None, torch.bfloat16, runner.model_config.head_dim, None) is not None
    routed = [runner.execute(step) for step in steps]
    monkeypatch.setattr(llama, "plan_route", lambda *args, **kw: None)  # everything through the unified kernel
    unified = [runner.execute(step) for step in steps]
    for r, u in zip(routed, unified, strict=True):
        assert (r - u).abs().max().item() <= 0.02 * u.abs().max().item()
        top3 = u.topk(3, dim=-1).indices  # [rows, 3]: bf16 kernels may swap a near-tie, nothing more
        assert (top3 == r.argmax(-1, keepdim=True)).any(-1).all()
