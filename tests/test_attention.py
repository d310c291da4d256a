"""The torch paged-attention path against dense causal attention written out by hand.

One mixed step: decodes, a prefill over a cached prefix, and a fresh prefill, with scattered block
tables and GQA. The reference holds each sequence's whole K/V contiguously and never sees the cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from gearshift.engine import cpu_kernels
from gearshift.engine.attention import build_plan, paged_attention_torch
from gearshift.engine.attention_metadata import AttentionMetadata
from paged_steps import scattered_decodes

HQ, HKV, D, BS, NBLOCKS = 6, 2, 16, 4, 64


def _dense(q, k, v, start):
    """q [Lq, Hq, D] at positions start.., k/v [L, Hkv, D] for positions 0..L-1 -> [Lq, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    qpos = torch.arange(q.shape[0])[:, None] + start
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize(("dtype", "native"), [(torch.float32, False), (torch.float32, True),
                                               (torch.bfloat16, False)])
def test_mixed_step_matches_dense_attention(dtype, native):
    """native: decodes through the compiled CPU kernel (engine/csrc), the engine's fp32 CPU default."""
    gen = torch.Generator().manual_seed(0)
    # (cached prefix length, new tokens): two decodes, a chunk over a prefix, a fresh prefill, a decode
    seqs = [(9, 1), (30, 1), (13, 7), (0, 11), (1, 1)]
    free = torch.randperm(NBLOCKS, generator=gen).tolist()
    tables, full_k, full_v = [], [], []
    k_cache = torch.zeros(NBLOCKS, BS, HKV, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    for start, n in seqs:
        nb = -(-(start + n) // BS)
        tables.append([free.pop() for _ in range(nb)])
        full_k.append(torch.randn(start + n, HKV, D, generator=gen).to(dtype))
        full_v.append(torch.randn(start + n, HKV, D, generator=gen).to(dtype))
        for p in range(start):  # the prefix is already in the cache
            k_cache[tables[-1][p // BS], p % BS] = full_k[-1][p]
            v_cache[tables[-1][p // BS], p % BS] = full_v[-1][p]
    snapshot = k_cache.clone()
    qs = [torch.randn(n, HQ, D, generator=gen).to(dtype) for _, n in seqs]
    slots = [tables[i][p // BS] * BS + p % BS for i, (s, n) in enumerate(seqs) for p in range(s, s + n)]
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([s + n for s, n in seqs], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(s + n for s, n in seqs),
    )
    q = torch.cat(qs)
    k = torch.cat([fk[s:] for fk, (s, _) in zip(full_k, seqs, strict=True)])
    v = torch.cat([fv[s:] for fv, (s, _) in zip(full_v, seqs, strict=True)])
    plan = build_plan(meta, BS, q.device, native=native)
    if native:
        assert cpu_kernels.kernels() is not None, "the native CPU kernels failed to build (see the log)"
        assert plan.native is not None and not plan.decodes
    out = paged_attention_torch(q, k, v, k_cache, v_cache, meta, scale=D**-0.5, plan=plan)
    assert out.shape == (sum(n for _, n in seqs), HQ, D) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (start, n) in enumerate(seqs):
        ref = _dense(qs[i], full_k[i], full_v[i], start)
        got = out[qsl[i] : qsl[i + 1]].double()
        assert (got - ref).abs().max().item() < tol, f"seq {i} (prefix {start}, new {n})"
    # The new K/V landed in exactly their slots; every other slot kept its contents.
    flat_new, flat_old = k_cache.view(-1, HKV, D), snapshot.view(-1, HKV, D)
    assert torch.equal(flat_new[torch.tensor(slots)], k)
    untouched = torch.ones(NBLOCKS * BS, dtype=torch.bool)
    untouched[torch.tensor(slots)] = False
    assert torch.equal(flat_new[untouched], flat_old[untouched])


def test_native_decode_matches_torch_gather_path():
    """SmolLM2's shape (9 query heads over 3, head_dim 64), 40 decodes of contexts 1..700 over scattered
    blocks, rows not contiguous (prefill chunks between them): native kernel == gathered SDPA path."""
    assert cpu_kernels.kernels() is not None
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d, bs = 9, 3, 64, 16
    ctx = [1, 2, 15, 16, 17, 700] + torch.randint(1, 700, (34,), generator=gen).tolist()
    meta, _, num_blocks = scattered_decodes(ctx, bs, gen)
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    t = int(meta.query_start_loc[-1])
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen)
    v = torch.randn(t, hkv, d, generator=gen)
    outs = []
    for native in (False, True):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(paged_attention_torch(q, k, v, kc, vc, meta, d**-0.5, build_plan(meta, bs, q.device, native)))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_cache_under_fp32_q_matches_an_fp32_cache_of_the_same_values(native: bool):
    """--quantization int8 on CPUs with native bf16: fp32 q/k/v, bf16 caches. Decodes (gathered or native)
    and prefill chunks over a cached prefix read the bf16 cache widened to fp32: the same output as an fp32
    cache holding the same (bf16-representable) values, in fp32."""
    assert cpu_kernels.kernels() is not None
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, bs, num_blocks = 9, 3, 64, 16, 6
    # a decode at context 37 (blocks 3, 0, 5), a 5-token chunk at positions 20..24 (blocks 1, 4), a first decode
    meta = AttentionMetadata(torch.tensor([5 * bs + 4, *range(4 * bs + 4, 4 * bs + 9), 2 * bs]),
                             torch.tensor([0, 1, 6, 7], dtype=torch.int32), torch.tensor([37, 25, 1], dtype=torch.int32),
                             torch.tensor([[3, 0, 5], [1, 4, 0], [2, 0, 0]], dtype=torch.int32), 5, 37)
    caches = [torch.randn(num_blocks, bs, hkv, d, generator=gen).bfloat16() for _ in range(2)]
    t = int(meta.query_start_loc[-1])
    q = torch.randn(t, hq, d, generator=gen)
    k, v = (torch.randn(t, hkv, d, generator=gen).bfloat16().float() for _ in range(2))  # exact in bf16
    plan = build_plan(meta, bs, q.device, native)
    assert plan.prefills[0].ctx_blocks is not None and (plan.native is not None) == native
    want = paged_attention_torch(q, k, v, *(c.float() for c in caches), meta, d**-0.5, plan)
    kc, vc = (c.clone() for c in caches)
    got = paged_attention_torch(q, k, v, kc, vc, meta, d**-0.5, plan)
    assert got.dtype == torch.float32 and kc.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "quantization", "device", "fast_bf16", "want"), [
    (torch.float32, "int8", "cpu", True, torch.bfloat16),  # int8's fp32 activations, native bf16: half the bytes
    (torch.float32, "int8", "cpu", False, torch.float32),  # AVX2: bf16 emulated, the cache stays fp32
    (torch.float32, None, "cpu", True, torch.float32),  # --dtype float32 asked for fp32 everywhere
    (torch.bfloat16, "int4", "cpu", True, torch.bfloat16),
    (torch.bfloat16, None, "cuda", True, torch.bfloat16),
    (torch.float32, "int8", "cuda", True, torch.float32),
])
def test_kv_cache_dtype(dtype, quantization, device, fast_bf16, want):
    from gearshift.engine.dtypes import kv_cache_dtype

    assert kv_cache_dtype(dtype, quantization, device, fast_bf16) == want
