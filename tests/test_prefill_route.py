"""The engine's GPU attention step with the prefill route (engine/kernels/prefill_route.py): long prefills
with no cached prefix by dense SDPA, every other sequence by the unified paged kernel.

The route's choice is a table test; its output is checked against the unified kernel alone and against
the torch path (the CPU engine's attention, itself tested against dense attention in test_attention.py).
CPU cases run the kernels under Triton's interpreter with the route's threshold lowered to a few tokens;
tests/kernel_harness.py sets the interpreter up (or re-runs this file's CPU cases in an interpreting process).
The `gpu` cases use the engine's own threshold and check that flash is the SDPA backend taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.kernels import paged_attention
from kernel_harness import (
    BF16,
    F16,
    F32,
    Case,
    Step,
    _params,
    assert_close,
    cpu_in_process,
    make_step,
    ref_paged_attention,
)

ROUTE_TABLE = [
    # (query_start_loc, seq_lens, window, min_query_len) -> dense sequence indices
    (([0, 4096], [4096], None, 1024), [0]),  # one long prompt
    (([0, 4096], [4096], None, 4097), []),  # shorter than the threshold
    (([0, 1, 2, 2050], [90, 7, 2048], None, 1024), [2]),  # decodes beside a fresh prompt
    (([0, 1024, 2048], [1024, 3072], None, 1024), [0]),  # the second has a cached prefix: paged
    (([0, 2000, 2000, 3100], [2000, 0, 1100], None, 1024), [0, 2]),  # a padding sequence between them
    (([0, 2048], [2048], 4096, 1024), [0]),  # a window covering the whole prompt is plain causal
    (([0, 2048], [2048], 2048, 1024), [0]),
    (([0, 2048], [2048], 2047, 1024), []),  # a window that bites: the unified kernel
    (([0, 1, 2], [5, 9], None, 1), []),  # decodes only
]


@pytest.mark.parametrize(("args", "dense"), ROUTE_TABLE)
def test_dense_prefill_choice(args: tuple, dense: list[int]) -> None:
    from gearshift.engine.kernels.prefill_route import dense_prefill_seqs

    assert dense_prefill_seqs(*args) == dense


def test_dense_capable_layers() -> None:
    from gearshift.engine.kernels.prefill_route import dense_capable

    assert dense_capable(BF16, 128, None) and dense_capable(F16, 64, None) and dense_capable(BF16, 256, None)
    assert not dense_capable(BF16, 128, 50.0)  # Gemma 2's soft-capped logits: SDPA cannot express them
    assert not dense_capable(F32, 128, None)  # flash is 16-bit only
    assert not dense_capable(F16, 80 + 4, None) and not dense_capable(F16, 512, None)


def host_step(qsl: list[int], seq_lens: list[int], device: str) -> AttentionMetadata:
    """A step's metadata as ModelRunner.prepare builds it: device tensors plus the host lists they came from.
    On the 'meta' device the tensors hold no data: any read of them (.tolist(), .item(), .cpu()) raises."""
    t, b = qsl[-1], len(seq_lens)
    return AttentionMetadata(
        slot_mapping=torch.arange(t, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        block_tables=torch.zeros(b, 1, dtype=torch.int32, device=device),
        max_query_len=max(qsl[i + 1] - qsl[i] for i in range(b)),
        max_seq_len=max(seq_lens),
        query_start_loc_host=qsl,
        seq_lens_host=seq_lens,
    )


PLAN_TABLE = [
    # (query_start_loc, seq_lens, window, dtype, head_dim, softcap, min_query_len) ->
    #   None (no route) or (dense rows, seq_skip as a list, or None when nothing is left for the unified kernel)
    (([0, 4096], [4096], None, BF16, 128, None, 1024), (((0, 4096),), None)),  # one long prompt alone
    (([0, 1, 2, 2050], [90, 7, 2048], None, BF16, 64, None, 1024), (((2, 2050),), [0, 0, 1])),  # beside decodes
    (([0, 1100, 2200, 3200], [1100, 1100, 3000], None, F16, 128, None, 1024),  # two fresh, one prefix chunk
     (((0, 1100), (1100, 2200)), [1, 1, 0])),
    (([0, 2000, 2000, 3100], [2000, 0, 1100], None, BF16, 128, None, 1024),  # a padding sequence between
     (((0, 2000), (2000, 3100)), None)),
    (([0, 500, 1000], [500, 500], None, BF16, 128, None, 1024), None),  # short prompts: all paged
    (([0, 2048], [4096], None, BF16, 128, None, 1024), None),  # a cached prefix: paged
    (([0, 1, 2049], [30, 2048], 2048, BF16, 128, None, 1024), (((1, 2049),), [0, 1])),  # window covers it
    (([0, 1, 2049], [30, 2048], 1024, BF16, 128, None, 1024), None),  # a window that bites
    (([0, 4096], [4096], None, F32, 128, None, 1024), None),  # fp32: flash is 16-bit only
    (([0, 4096], [4096], None, F16, 84, None, 1024), None),  # head dims flash does not take
    (([0, 4096], [4096], None, BF16, 512, None, 1024), None),
    (([0, 4096], [4096], None, BF16, 256, 50.0, 1024), None),  # soft-capped logits
    (([0, 1, 9], [20, 8], None, BF16, 64, None, 8), (((1, 9),), [0, 1])),  # a lowered threshold
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(("args", "expected"), PLAN_TABLE)
def test_plan_route_table(args: tuple, expected: tuple | None, device: str) -> None:
    """The route from the step's host lists alone: on 'meta' the device tensors cannot be read, so a route
    computed there proves plan_route reads none (the read-back that stalled async scheduling is gone)."""
    from gearshift.engine.kernels import plan_route

    qsl, seq_lens, window, dtype, head_dim, softcap, min_query_len = args
    meta = host_step(qsl, seq_lens, device)
    route = plan_route(meta, window, dtype, head_dim, softcap, min_query_len=min_query_len)
    if expected is None:
        assert route is None
        return
    rows, skip = expected
    assert route is not None and route.dense_rows == rows
    if skip is None:
        assert route.seq_skip is None
        return
    assert route.seq_skip is not None and route.seq_skip.device.type == device
    assert route.seq_skip.dtype == torch.int32 and route.seq_skip.shape == (len(seq_lens),)
    if device == "cpu":
        assert route.seq_skip.tolist() == skip


def test_route_of_the_runners_metadata_reads_no_device_tensor() -> None:
    """ModelRunner.prepare's real metadata, its tensors on the 'meta' device (no data: every read raises),
    routes as on the CPU: the runner carries on the host everything plan_route needs."""
    from gearshift.engine.kernels import plan_route
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput
    from test_input_prep import bare_runner

    out = SchedulerOutput(seqs=[ScheduledSeq(1, [5], 40, [200, 201, 202], True),  # a decode
                                ScheduledSeq(0, [0] * 1500, 0, list(range(94)), True),  # a fresh prompt
                                ScheduledSeq(2, [0] * 1200, 900, list(range(94, 232)), True)],  # over a prefix
                          num_decodes=1)
    routes = []
    for device in ("cpu", "meta"):
        runner = bare_runner(16)
        runner.device = torch.device(device)
        meta = runner.prepare(out)[2]
        routes.append(plan_route(meta, None, BF16, 64, None))
    with pytest.raises(NotImplementedError, match="meta tensor"):
        meta.query_start_loc.tolist()  # what the route used to read: impossible here
    on_cpu, on_meta = routes
    assert on_cpu is not None and on_meta is not None
    assert on_cpu.dense_rows == on_meta.dense_rows == ((1, 1501),)
    assert on_cpu.seq_skip.tolist() == [0, 1, 0] and on_meta.seq_skip.is_meta


def test_host_lists_are_required_only_when_a_step_could_route() -> None:
    """Metadata without host lists (CUDA-graph capture, hand-built kernel tests) is fine for steps that
    cannot route (plan_route returns before needing them); a long step without them is a named error,
    never a silent device read."""
    from gearshift.engine.kernels import plan_route

    meta = host_step([0, 4096], [4096], "meta")
    meta.query_start_loc_host = meta.seq_lens_host = None
    with pytest.raises(ValueError, match="query_start_loc_host"):
        plan_route(meta, None, BF16, 128, None)
    assert plan_route(meta, None, F32, 128, None) is None  # not dense-capable: nothing to read
    short = host_step([0, 1, 513], [9, 512], "meta")
    short.query_start_loc_host = short.seq_lens_host = None
    assert plan_route(short, None, BF16, 128, None) is None


def test_graph_captured_steps_never_route() -> None:
    """The CUDA-graph runners build their captured metadata without host lists: every bucket they capture
    (decode batches; mixed steps below DENSE_MIN_QUERY_LEN tokens) must give no route, at the engine's own
    threshold, so a capture never needs host lists nor reads the device."""
    from gearshift.engine.cuda_graphs import DecodeGraphs, MixedGraphs, batch_buckets, mixed_token_buckets
    from gearshift.engine.kernels import plan_route
    from gearshift.engine.kernels.prefill_route import DENSE_MIN_QUERY_LEN

    dev, routes = torch.device("meta"), []

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata, *rows: torch.Tensor) -> torch.Tensor:
        assert meta.query_start_loc_host is None and meta.query_start_loc.is_meta
        routes.append(plan_route(meta, None, BF16, 128, None))
        return ids

    tokens = mixed_token_buckets(8192, DENSE_MIN_QUERY_LEN)
    mixed = MixedGraphs(forward, dev, tokens, batch_buckets(256), max_blocks=64, block_size=16)
    decode = DecodeGraphs(forward, dev, 256, max_blocks=64, block_size=16)
    for t in tokens:
        for s in batch_buckets(256):
            if s <= t:
                mixed._forward(t, s)
    for b in decode.buckets:
        decode._forward(b)
    assert len(routes) > 10 and all(r is None for r in routes)


@pytest.mark.gpu
def test_plan_route_makes_no_cuda_sync() -> None:
    """On CUDA, routing a long prefill beside a decode (seq_skip built and copied up) makes no call torch
    counts as a synchronization (set_sync_debug_mode "error" raises on one): async scheduling's overlap holds."""
    from gearshift.engine.kernels import plan_route
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput
    from test_input_prep import bare_runner

    runner = bare_runner(16)
    runner.device = torch.device("cuda")
    out = SchedulerOutput(seqs=[ScheduledSeq(1, [5], 40, [200, 201, 202], True),
                                ScheduledSeq(0, [0] * 1500, 0, list(range(94)), True)], num_decodes=1)
    meta = runner.prepare(out)[2]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route = plan_route(meta, None, BF16, 128, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert route is not None and route.dense_rows == ((1, 1501),) and route.seq_skip.tolist() == [0, 1]


def _step_kv(step: Step, case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's keys and values [T, Hkv, D] (the new tokens' K/V the layer writes before attending), as
    the model hands them over: strided views into one fused projection output [T, 2 * Hkv, D]."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(step.q.shape[0], 2 * case.heads[1], case.head_dim, generator=gen)
    k, v = fused.to(case.dtype).to(step.q.device).split(case.heads[1], dim=1)
    assert not k.is_contiguous()
    return k, v


@dataclass(frozen=True)
class RouteCase:
    case: Case
    dense: tuple[int, ...]  # the sequences expected to go dense
    window: int | None = None
    softcap: float | None = None
    min_query_len: int = 8


ROUTE_CPU = [
    # one prompt, GQA 9/3 (SmolLM2's heads): SDPA's output returned as is
    RouteCase(Case(seqs=((40, 40),), heads=(9, 3), dtype=F16), dense=(0,)),
    # several prefills: two fresh ones dense, a chunk over a cached prefix and a short fresh one paged
    RouteCase(Case(seqs=((12, 12), (9, 30), (20, 20), (5, 5)), heads=(6, 2), dtype=BF16), dense=(0, 2)),
    # a prefill mixed with decodes (decodes first, as the scheduler orders them), head_dim 128, block 32
    RouteCase(Case(seqs=((1, 33), (1, 70), (24, 24), (1, 5)), heads=(8, 2), head_dim=128, block_size=32,
                   dtype=BF16), dense=(2,)),
    # sliding windows: one covering the whole prompt (dense), one that bites (paged, windowed)
    RouteCase(Case(seqs=((1, 40), (16, 16), (30, 30)), heads=(4, 1), dtype=F16), dense=(1,), window=16),
    # soft-capping: nothing dense, the unified kernel caps
    RouteCase(Case(seqs=((20, 20), (1, 9)), heads=(4, 2), dtype=F16), dense=(), softcap=5.0),
]
ROUTE_GPU = [
    RouteCase(Case(seqs=((4096, 4096),), heads=(32, 8), head_dim=128, dtype=BF16), dense=(0,), min_query_len=1024),
    RouteCase(Case(seqs=tuple((1, 300 + 50 * i) for i in range(16)) + ((1500, 1500), (700, 2000), (1200, 1200)),
                   heads=(32, 8), head_dim=128, dtype=BF16), dense=(16, 18), min_query_len=1024),
    # a window covering the first prompt (dense) and not the second (paged, windowed)
    RouteCase(Case(seqs=((1, 3000), (2048, 2048), (2049, 2049)), heads=(9, 3), dtype=F16), dense=(1,),
              window=2048, min_query_len=1024),
]


@pytest.mark.parametrize(("rc", "device"), _params(ROUTE_CPU, ROUTE_GPU))
def test_prefill_route_matches_unified_kernel_and_torch(rc: RouteCase, device: str) -> None:
    """The engine's layer step with the route == the same step all through the unified kernel == the torch
    path (the CPU engine's attention, itself tested against dense attention in tests/test_attention.py)."""
    from gearshift.engine.attention import paged_attention_torch
    from gearshift.engine.kernels import attention_step, plan_route

    case = rc.case
    step = make_step(case, device, seed=4)
    key, value = _step_kv(step, case, seed=5)
    route = plan_route(step.meta, rc.window, case.dtype, case.head_dim, rc.softcap, min_query_len=rc.min_query_len)
    qsl = step.meta.query_start_loc.tolist()
    assert (route.dense_rows if route else ()) == tuple((qsl[i], qsl[i + 1]) for i in rc.dense)
    outs = []
    for r in (route, None):
        kc, vc = step.k_cache.clone(), step.v_cache.clone()
        outs.append(attention_step(step.q, key, value, kc, vc, step.meta, step.scale, r, window=rc.window,
                                   softcap=rc.softcap))
    # on the test's device: the torch path runs on CUDA tensors too (and is quick there at 4096 tokens)
    expected = paged_attention_torch(step.q, key, value, step.k_cache.clone(), step.v_cache.clone(), step.meta,
                                     step.scale, window=rc.window, softcap=rc.softcap)
    routed, unified = outs
    assert routed.shape == step.q.shape and routed.dtype == case.dtype and routed.is_contiguous()
    assert_close(routed, expected, case.dtype)
    assert_close(unified, expected, case.dtype)
    assert_close(routed, unified, case.dtype)


@cpu_in_process
def test_unified_kernel_leaves_skipped_sequences_alone() -> None:
    """seq_skip: the dense sequences' rows are not computed twice, and not overwritten."""
    case = Case(seqs=((1, 20), (10, 10), (6, 25)), heads=(4, 2), dtype=F16)
    step = make_step(case, "cpu", seed=6)
    out = torch.full_like(step.q, 7.0)
    skip = torch.tensor([0, 1, 0], dtype=torch.int32)
    paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale, out=out, seq_skip=skip)
    expected = ref_paged_attention(step.q, step.k_cache, step.v_cache, step.query_lens, step.seq_lens,
                                   step.meta.block_tables, step.scale)
    assert torch.equal(out[1:11], torch.full_like(out[1:11], 7.0))
    assert_close(torch.cat([out[:1], out[11:]]), torch.cat([expected[:1], expected[11:]]), case.dtype)
    with pytest.raises(ValueError, match="seq_skip must be"):
        paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale, seq_skip=skip[:2])


@pytest.mark.gpu
def test_dense_prefill_runs_flash_sdpa() -> None:
    """The point of the route: on CUDA, a long 16-bit GQA prefill runs flash SDPA (this fails if torch
    would fall back to another backend for these shapes)."""
    from gearshift.engine.kernels.prefill_route import dense_causal
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2048, 32, 128, device="cuda", dtype=BF16, generator=gen)
    kv = torch.randn(2048, 2, 8, 128, device="cuda", dtype=BF16, generator=gen)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = dense_causal(q, kv[:, 0], kv[:, 1], 128**-0.5)
    assert out.shape == q.shape and out.is_contiguous()
