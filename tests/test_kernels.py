"""The Triton kernels against a plain torch reference (gather blocks -> GQA repeat -> einsum -> mask).

CPU cases run the kernels under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton's first import in the process: importing kernel_harness.py (the reference and the step
builder this file shares with test_prefill_route.py) does that when the machine has no GPU and
nothing imported triton yet. Otherwise (a GPU machine, or triton imported earlier by another module)
one test re-runs this file's CPU cases in a fresh interpreting pytest process. Shapes stay small: the
interpreter runs every program in Python. The `gpu` cases run the compiled kernels on bigger shapes,
plus a CUDA-graph capture/replay of the decode path.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.kernels import paged_attention, store_kvcache
from gearshift.engine.kernels.loader import kernel_module
from kernel_harness import (  # importing it switches Triton's interpreter on where it can (see there)
    BF16,
    F16,
    F32,
    INTERPRETING,
    Case,
    _params,
    assert_close,
    cpu_in_process,
    make_step,
    ref_paged_attention,
)

# Small enough for the interpreter. SmolLM2's shape is 9 query heads over 3 kv heads, head_dim 64.
CPU_CASES = [
    # prefill only; the second crosses a block boundary
    Case(seqs=((5, 5), (19, 19)), heads=(2, 2)),
    # prefix-cached prefills: queries shorter than the context, GQA ratio 3 (SmolLM2), fp16
    Case(seqs=((3, 20), (6, 37)), heads=(9, 3), dtype=F16),
    # decodes and prefill chunks mixed in one step, bf16, head_dim 128, block size 32
    Case(seqs=((1, 33), (7, 7), (1, 1), (9, 40)), heads=(6, 2), head_dim=128, block_size=32, dtype=BF16),
    # a padding sequence (no query, no context) between real ones, head_dim 32
    Case(seqs=((4, 18), (0, 0), (1, 16)), heads=(3, 1), head_dim=32, dtype=F16),
    # a head_dim that is not a power of two (padded and masked inside the kernels)
    Case(seqs=((3, 20), (1, 9)), heads=(4, 2), head_dim=80, dtype=F16),
    # pure decode (split-KV path): more splits than tiles, fewer splits than tiles, one split
    Case(seqs=((1, 1), (1, 16), (1, 17), (1, 70)), heads=(9, 3), splits=8),
    Case(seqs=((1, 65), (1, 100)), heads=(2, 2), dtype=F16, splits=2),
    Case(seqs=((1, 31), (1, 40)), heads=(6, 2), head_dim=128, block_size=32, dtype=BF16, splits=1),
    # pure decode with the default split choice; CUDA-graph padding: a sequence with no query, and one
    # with a query but an empty context (its row must come out zeros, not NaN)
    Case(seqs=((1, 5), (0, 0), (1, 48), (1, 0)), heads=(4, 1), dtype=F32),
    # a longer bf16 prefill: many q blocks of one sequence, beside a decode
    Case(seqs=((130, 150), (1, 40)), heads=(8, 2), dtype=BF16),
]

# On a GPU: realistic sizes, every dtype.
GPU_CASES = (
    [
        Case(seqs=((1, 1000), (300, 300), (50, 2000), (1, 17), (128, 129)), heads=(9, 3), dtype=d)
        for d in (F16, BF16, F32)
    ]
    + [
        Case(seqs=tuple((1, 100 + 37 * i) for i in range(64)), heads=(32, 8), head_dim=128, dtype=d)
        for d in (F16, BF16)
    ]
    + [
        Case(
            seqs=((512, 4096), (1, 4096), (1000, 1000)),
            heads=(32, 8),
            head_dim=128,
            block_size=32,
            dtype=BF16,
        ),
        Case(seqs=tuple((1, 3000 + i) for i in range(8)), heads=(9, 3), block_size=32, dtype=F16, splits=16),
    ]
)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "device"), _params(CPU_CASES, GPU_CASES))
def test_paged_attention_matches_reference(case: Case, device: str) -> None:
    step = make_step(case, device)
    out = paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale, num_splits=case.splits)
    expected = ref_paged_attention(
        step.q.cpu(),
        step.k_cache.cpu(),
        step.v_cache.cpu(),
        step.query_lens,
        step.seq_lens,
        step.meta.block_tables.cpu(),
        step.scale,
    )
    assert out.shape == step.q.shape and out.dtype == case.dtype
    assert_close(out, expected, case.dtype)


STORE_CASES_CPU = [
    Case(seqs=((7, 7),), heads=(3, 3), dtype=F32),
    Case(seqs=((5, 5),), heads=(1, 1), head_dim=128, block_size=32, dtype=BF16),
    Case(seqs=((6, 6),), heads=(9, 3), dtype=F16),
]
STORE_CASES_GPU = [Case(seqs=((4099, 4099),), heads=(8, 8), head_dim=128, dtype=d) for d in (F16, BF16, F32)]


@pytest.mark.parametrize(("case", "device"), _params(STORE_CASES_CPU, STORE_CASES_GPU))
def test_store_kvcache_writes_slots_and_skips_padding(case: Case, device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    num_tokens = case.seqs[0][0]
    num_kv_heads, head_dim, bs = case.heads[1], case.head_dim, case.block_size
    num_blocks = math.ceil(num_tokens / bs) * 2 + 1
    # key/value as strided views into one fused qkv projection, like the model produces them
    qkv = torch.randn(num_tokens, (case.heads[0] + 2 * num_kv_heads) * head_dim, generator=gen).to(case.dtype)
    qkv = qkv.to(device)
    q_width = case.heads[0] * head_dim
    kv_width = num_kv_heads * head_dim
    key = qkv[:, q_width : q_width + kv_width].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_width + kv_width :].view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens].to(torch.int64)
    slots[1::3] = -1  # padding tokens (e.g. CUDA-graph padding) must not be written anywhere
    slots = slots.to(device)
    sentinel = torch.full((num_blocks, bs, num_kv_heads, head_dim), 7.0, dtype=case.dtype, device=device)
    k_cache, v_cache = sentinel.clone(), sentinel.clone()

    store_kvcache(key, value, k_cache, v_cache, slots)

    expected_k, expected_v = sentinel.clone(), sentinel.clone()
    real = slots >= 0
    expected_k.view(-1, num_kv_heads, head_dim)[slots[real]] = key[real]
    expected_v.view(-1, num_kv_heads, head_dim)[slots[real]] = value[real]
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


MIXED_CPU = [Case(seqs=((1, 18), (6, 6), (3, 35)), heads=(9, 3), dtype=F16)]
MIXED_GPU = [Case(seqs=((1, 700), (250, 250), (64, 1500)), heads=(32, 8), head_dim=128, dtype=BF16)]


@pytest.mark.parametrize(("case", "device"), _params(MIXED_CPU, MIXED_GPU))
def test_store_then_attend_like_a_model_step(case: Case, device: str) -> None:
    """One layer's step as the runner does it: write the new tokens' K/V, then attend over the cache."""
    step = make_step(case, device, seed=2)
    gen = torch.Generator().manual_seed(3)
    shape = (step.q.shape[0], case.heads[1], case.head_dim)
    key = torch.randn(shape, generator=gen).to(case.dtype).to(device)
    value = torch.randn(shape, generator=gen).to(case.dtype).to(device)
    ref_k, ref_v = step.k_cache.cpu().clone(), step.v_cache.cpu().clone()
    ref_k.view(-1, *shape[1:])[step.meta.slot_mapping.cpu()] = key.cpu()
    ref_v.view(-1, *shape[1:])[step.meta.slot_mapping.cpu()] = value.cpu()

    store_kvcache(key, value, step.k_cache, step.v_cache, step.meta.slot_mapping)
    out = paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale)

    expected = ref_paged_attention(
        step.q.cpu(), ref_k, ref_v, step.query_lens, step.seq_lens, step.meta.block_tables.cpu(), step.scale
    )
    assert_close(out, expected, case.dtype)


@pytest.mark.skipif(INTERPRETING, reason="this process interprets: the CPU cases ran above")
def test_cpu_cases_in_an_interpreting_process(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(Path(__file__).resolve()),
            str(Path(__file__).with_name("test_prefill_route.py").resolve()),  # its CPU cases need this too
            "-q",
            "-m",
            "not gpu",
            "-k",
            "not compile_for",  # this process runs that one
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    # Everything ran except this very test (skipped there: that process interprets).
    assert re.search(r"\d+ passed", summary) and re.search(r"\b1 skipped", summary), result.stdout[-4000:]


def test_kernels_compile_for_hopper_and_ampere(tmp_path: Path) -> None:
    """The interpreter skips the compiler's checks: compile every kernel variant to cubin for sm_90 (and
    the fp16 ones for sm_80, which lowers tl.dot differently) in a process without the interpreter.
    No GPU needed: Triton ships ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONSAFEPATH"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "-m",
            "gearshift.engine.kernels.compile_check",
            "--target",
            "90",
            "80:fp16",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    compiled = {(row[0], row[1], row[-5]) for row in rows}  # (kernel, dtype, sm)
    kernels = {"store_kvcache", "unified(q2)", "unified(q512)", "unified(q512,skip)", "decode_split", "decode_merge"}
    expected = {(k, dt, "90") for k in kernels for dt in ("fp16", "bf16", "fp32")}
    expected |= {(k, "fp16", "80") for k in kernels}
    assert compiled == expected and len(rows) == len(expected), result.stdout


@cpu_in_process
def test_cpu_tensors_run_the_triton_interpreter() -> None:
    """The CPU tests above must exercise the kernels, not some fallback: their module is interpreted."""
    for name in ("kv_store", "unified_attention", "decode_attention"):
        module = kernel_module(name, torch.device("cpu"))
        kernels = [v for k, v in vars(module).items() if k.endswith("_kernel")]
        assert module.INTERPRETED and kernels, name
        assert all(type(k).__name__ == "InterpretedFunction" for k in kernels), name


@cpu_in_process
def test_bad_arguments_are_named() -> None:
    step = make_step(Case(seqs=((2, 2),), heads=(2, 2)), "cpu")
    with pytest.raises(ValueError, match="share one of"):
        paged_attention(step.q.half(), step.k_cache, step.v_cache, step.meta, step.scale)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention(step.q[:, :1].expand(-1, 3, -1), step.k_cache, step.v_cache, step.meta, step.scale)
    bad_meta = AttentionMetadata(**{**vars(step.meta), "seq_lens": step.meta.seq_lens.long()})
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        paged_attention(step.q, step.k_cache, step.v_cache, bad_meta, step.scale)
    decode = make_step(Case(seqs=((1, 3),), heads=(2, 2)), "cpu")
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(decode.q, decode.k_cache, decode.v_cache, decode.meta, decode.scale, num_splits=3)
    with pytest.raises(ValueError, match="must be"):
        store_kvcache(step.q, step.q, step.k_cache, step.v_cache, step.meta.slot_mapping[:1])


@pytest.mark.gpu
def test_compiled_on_cuda() -> None:
    module = kernel_module("unified_attention", torch.device("cuda"))
    assert not module.INTERPRETED


@pytest.mark.gpu
def test_decode_path_replays_in_a_cuda_graph() -> None:
    """The runner captures decode steps in CUDA graphs: a captured launch must stay right when the
    replayed step has different (longer) contexts, since split ranges are computed in-kernel."""
    case = Case(seqs=tuple((1, 50 + 13 * i) for i in range(16)), heads=(9, 3), dtype=F16)
    step = make_step(case, "cuda")
    meta, out = step.meta, torch.empty_like(step.q)
    max_blocks = meta.block_tables.shape[1]

    def run() -> None:
        paged_attention(step.q, step.k_cache, step.v_cache, meta, step.scale, out=out)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    # Next step: every context grows (still within the table's blocks); write the inputs in place.
    longer = [min(s + 20, max_blocks * case.block_size) for s in step.seq_lens]
    meta.seq_lens.copy_(torch.tensor(longer, dtype=torch.int32))
    step.q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    expected = ref_paged_attention(
        step.q.cpu(),
        step.k_cache.cpu(),
        step.v_cache.cpu(),
        step.query_lens,
        longer,
        meta.block_tables.cpu(),
        step.scale,
    )
    assert_close(out, expected, case.dtype)

