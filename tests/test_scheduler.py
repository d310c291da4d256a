"""Scheduler + block manager, driven step by step against a pure-Python paged KV cache.

The "model" here is a paged store of token ids: every scheduled token is written to the slot its block
table names, and each sequence's whole context is read back through its block table and compared with
the tokens it should hold. A wrong block, a block shared while still being written, a bad prefix hit or a
lost block after preemption breaks that comparison. The next token is a function of the context read back, so a
request's output must be the same alone as in any batch.
"""

from __future__ import annotations

import random

import pytest
from gearshift.engine.block_manager import BlockManager
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.scheduler import Scheduler
from gearshift.engine.scheduler_output import SchedulerOutput
from gearshift.engine.sequence import Sequence, fan_out

VOCAB = 1000


class PagedTokenStore:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]

    def run(self, out: SchedulerOutput, seqs: dict[int, Sequence]) -> dict[int, int]:
        for s in out.seqs:
            assert len(s.block_table) == -(-s.context_len // self.bs), "block table must cover the context exactly"
            for j, t in enumerate(s.token_ids):
                p = s.start_pos + j
                self.slots[s.block_table[p // self.bs]][p % self.bs] = t
        sampled = {}
        for s in out.seqs:
            ctx = [self.slots[s.block_table[p // self.bs]][p % self.bs] for p in range(s.context_len)]
            seq = seqs[s.seq_id]
            assert ctx == seq.token_ids[: s.context_len], f"KV of {seq} does not hold its tokens"
            assert s.sample == (s.context_len == seq.num_tokens)
            if s.sample:
                sampled[s.seq_id] = sum((i + 1) * t for i, t in enumerate(ctx)) * 31 + len(ctx)
        return sampled


class Driver:
    """The engine loop, minus the model: schedule, run on the token store, sample, finish."""

    def __init__(self, num_blocks: int, block_size: int = 4, budget: int = 64, max_seqs: int = 8,
                 max_model_len: int = 4096, prefix_caching: bool = True) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sch = Scheduler(self.bm, max_seqs, budget, max_model_len)
        self.store = PagedTokenStore(num_blocks, block_size)
        self.budget, self.max_seqs = budget, max_seqs
        self.outputs: dict[tuple[str, int], list[int]] = {}
        self.finish_order: list[str] = []
        self.steps: list[SchedulerOutput] = []

    def add(self, rid: str, prompt: list[int], max_tokens: int, n: int = 1) -> Sequence:
        self.sch.check_fits(len(prompt), max_tokens, n)
        seqs = fan_out(rid, prompt, SamplingParams(max_tokens=max_tokens, n=n))
        for seq in seqs:
            self.sch.add(seq)
        return seqs[0]

    def step(self) -> SchedulerOutput:
        out = self.sch.schedule()
        self.steps.append(out)
        assert out.num_batched_tokens <= self.budget and len(out.seqs) <= self.max_seqs
        assert len({s.seq_id for s in out.seqs}) == len(out.seqs)
        kinds = [len(s.token_ids) == 1 and s.sample for s in out.seqs]
        assert kinds == sorted(kinds, reverse=True), "decodes come first"
        sampled = self.store.run(out, self.sch.seqs)
        self.sch.on_step_done(out)
        for s in out.seqs:
            if not s.sample:
                continue
            seq = self.sch.seqs[s.seq_id]
            seq.append_token((sampled[s.seq_id] + 7 * seq.index) % VOCAB)  # each choice draws differently
            if seq.num_output_tokens >= seq.max_tokens:
                self.outputs[(seq.request_id, seq.index)] = seq.output_token_ids
                self.finish_order.append(seq.request_id)
                self.sch.finish(seq)
        self.bm.check(list(self.sch.seqs.values()))
        assert len(self.sch.running) <= self.max_seqs
        return out

    def run(self, arrivals: dict[int, list[tuple[str, list[int], int, int]]] | None = None,
            max_steps: int = 10_000) -> None:
        arrivals = dict(arrivals or {})
        for t in range(max_steps):
            for rid, prompt, max_tokens, n in arrivals.pop(t, []):
                self.add(rid, prompt, max_tokens, n)
            if not self.sch.num_unfinished and not arrivals:
                break
            if self.sch.num_unfinished:
                assert not self.step().is_empty, "unfinished work but nothing scheduled"
        else:
            raise AssertionError("did not finish")
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"
        self.bm.check([])


def solo(prompt: list[int], max_tokens: int, n: int = 1) -> dict[int, list[int]]:
    d = Driver(num_blocks=512, budget=10_000)
    d.add("solo", prompt, max_tokens, n)
    d.run()
    return {k[1]: v for k, v in d.outputs.items()}


def test_chunked_prefill_then_decode() -> None:
    d = Driver(num_blocks=64, budget=32)
    d.add("a", list(range(100)), 3)
    d.run()
    sizes = [[len(s.token_ids) for s in out.seqs] for out in d.steps]
    assert sizes == [[32], [32], [32], [4], [1], [1]]
    assert [out.seqs[0].sample for out in d.steps] == [False, False, False, True, True, True]
    assert [out.seqs[0].start_pos for out in d.steps] == [0, 32, 64, 96, 100, 101]


def test_decodes_and_prefill_chunks_share_a_step() -> None:
    d = Driver(num_blocks=64, budget=16)
    d.run({0: [("a", list(range(10)), 6, 1)], 2: [("b", list(range(50, 90)), 2, 1)]})
    mixed = d.steps[2]
    assert [len(s.token_ids) for s in mixed.seqs] == [1, 15]  # a's decode, then b's chunk in the rest
    assert d.outputs[("a", 0)] == solo(list(range(10)), 6)[0]
    assert d.outputs[("b", 0)] == solo(list(range(50, 90)), 2)[0]


def test_prefix_hits_counted_and_served() -> None:
    d = Driver(num_blocks=64, budget=64)
    shared = list(range(300, 340))  # 10 full blocks of 4
    d.run({0: [("a", shared + [1, 2, 3], 4, 1)], 3: [("b", shared + [7, 8], 4, 1)]})
    assert d.bm.prefix_cache_hits == 40
    assert d.bm.prefix_cache_queries == 43 + 42
    assert d.outputs[("b", 0)] == solo(shared + [7, 8], 4)[0]


def test_identical_prompts_in_one_step_compute_twice_and_stay_correct() -> None:
    d = Driver(num_blocks=64, budget=64)
    d.run({0: [("a", list(range(20)), 5, 1), ("b", list(range(20)), 5, 1)]})
    assert d.outputs[("a", 0)] == d.outputs[("b", 0)] == solo(list(range(20)), 5)[0]


def test_preemption_by_recompute_keeps_outputs() -> None:
    # 12 blocks of 4 = 48 slots; three requests that each grow to 30 tokens cannot all stay resident.
    d = Driver(num_blocks=12, budget=64)
    reqs = [(f"r{i}", [i * 10 + j for j in range(10)], 20, 1) for i in range(3)]
    d.run({0: reqs})
    assert d.sch.num_preemptions > 0
    assert d.bm.prefix_cache_queries == 30  # recomputing after preemption is not counted as a lookup
    for rid, prompt, max_tokens, _ in reqs:
        assert d.outputs[(rid, 0)] == solo(prompt, max_tokens)[0]


def test_fcfs_order_with_one_slot() -> None:
    d = Driver(num_blocks=64, budget=64, max_seqs=1)
    d.run({0: [("a", [1, 2, 3], 3, 1), ("b", [4, 5], 5, 1), ("c", [6], 1, 1)]})
    assert d.finish_order == ["a", "b", "c"]


def test_n_siblings_wait_for_the_prompt_then_share_its_full_blocks() -> None:
    d = Driver(num_blocks=64, budget=64)
    prompt = list(range(10))  # two full blocks and a partial one
    d.add("a", prompt, 6, n=3)
    first = d.step()
    assert len(first.seqs) == 1  # the siblings wait while choice 0 computes the prompt
    second = d.step()
    family = list(d.sch.seqs.values())
    assert len(family) == 3 and len(second.seqs) == 3
    assert len({tuple(s.block_table[:2]) for s in family}) == 1  # full prompt blocks: prefix hits
    assert len({s.block_table[2] for s in family}) == 3  # the partial block: each its own, never shared
    assert d.bm.prefix_cache_hits == 2 * 8
    d.run()
    outs = solo(prompt, 6, n=3)
    assert [d.outputs[("a", k)] for k in range(3)] == [outs[0], outs[1], outs[2]]
    assert len({tuple(v) for v in outs.values()}) == 3


def test_abort_frees_blocks_at_once() -> None:
    d = Driver(num_blocks=16, budget=8)
    a = d.add("a", list(range(20)), 10)
    b = d.add("b", list(range(30, 40)), 10)
    d.step()
    assert a.block_table and not b.block_table
    d.sch.finish(a)  # running, mid-prefill
    d.sch.finish(b)  # still waiting
    assert d.bm.num_free_blocks == 16 and not d.sch.num_unfinished
    d.bm.check([])
    assert d.sch.schedule().is_empty


def test_request_that_can_never_fit_is_rejected() -> None:
    sch = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=100)
    sch.check_fits(10, 6)  # 16 tokens = 4 blocks: fits exactly
    with pytest.raises(InvalidRequestError) as e:
        sch.check_fits(10, 7)
    assert e.value.param == "max_tokens" and "KV" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        sch.check_fits(17, 1)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        sch.check_fits(4, 4, n=5)
    assert e.value.param == "n"
    assert not sch.num_unfinished


def test_a_sequence_alone_always_progresses_in_a_full_cache() -> None:
    # The cache holds exactly one maximal request; a second must wait or be preempted, never deadlock.
    d = Driver(num_blocks=8, budget=16)
    d.run({0: [("a", list(range(20)), 12, 1), ("b", list(range(40, 60)), 12, 1)]})
    assert d.outputs[("a", 0)] == solo(list(range(20)), 12)[0]
    assert d.outputs[("b", 0)] == solo(list(range(40, 60)), 12)[0]


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_match_solo_runs(seed: int) -> None:
    """Mixed lengths, shared prefixes, forks, staggered arrivals, tight memory: same tokens as alone."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))] for _ in range(3)]
    arrivals: dict[int, list] = {}
    reqs = []
    for i in range(rng.randrange(4, 14)):
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
        req = (f"r{i}", prompt, rng.randrange(1, 24), rng.choice([1, 1, 1, 2, 3]))
        reqs.append(req)
        arrivals.setdefault(rng.randrange(0, 30), []).append(req)
    longest = max(len(p) + m for _, p, m, _ in reqs)
    num_blocks = -(-longest // block_size) + rng.randrange(0, 3 * 64 // block_size)
    d = Driver(num_blocks=num_blocks, block_size=block_size, budget=rng.choice([8, 16, 64, 256]),
               max_seqs=rng.choice([3, 4, 8]), prefix_caching=rng.random() < 0.8)
    d.run(arrivals)
    for rid, prompt, max_tokens, n in reqs:
        alone = solo(prompt, max_tokens, n)
        for k in range(n):
            assert d.outputs[(rid, k)] == alone[k], (rid, k)
