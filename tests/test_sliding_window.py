"""Sliding-window (and soft-capped) attention on both attention paths against a dense reference, and the
cache blocks outside the window: poisoned with NaN, they must change nothing (they are never read).

One mixed step: a long decode, a short decode, a prefill chunk over a cached prefix and a fresh prefill,
with scattered block tables. Torch path on CPU; the Triton kernels under the interpreter (or compiled on a
GPU), through gearshift.engine.kernels.paged_attention, both the decode-only and the unified kernel.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gearshift.engine.attention import build_plan, paged_attention_torch  # noqa: E402
from gearshift.engine.attention_metadata import AttentionMetadata  # noqa: E402

BS, HQ, HKV, D = 4, 4, 2, 16


def reference(q, k_cache, v_cache, qlens, slens, tables, scale, window, softcap) -> torch.Tensor:
    """Per sequence, per query: softmax over exactly the keys its window allows, in fp64."""
    out, start = [], 0
    for i, (lq, sl) in enumerate(zip(qlens, slens, strict=True)):
        blocks = tables[i, : math.ceil(sl / BS)].long()
        k = k_cache[blocks].reshape(-1, HKV, D)[:sl].double().repeat_interleave(HQ // HKV, 1)  # [L, Hq, D]
        v = v_cache[blocks].reshape(-1, HKV, D)[:sl].double().repeat_interleave(HQ // HKV, 1)
        qi = q[start : start + lq].double()
        s = torch.einsum("qhd,khd->hqk", qi, k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        qpos = torch.arange(sl - lq, sl)[:, None]
        kpos = torch.arange(sl)[None, :]
        ok = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
        out.append(torch.einsum("hqk,khd->qhd", s.masked_fill(~ok, float("-inf")).softmax(-1), v))
        start += lq
    return torch.cat(out).float()


def make_step(qlens: list[int], slens: list[int], device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nblk = [math.ceil(s / BS) for s in slens]
    num_blocks = sum(nblk) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = torch.zeros(len(slens), max(nblk), dtype=torch.int32), 0
    for i, n in enumerate(nblk):
        tables[i, :n] = torch.tensor(perm[used : used + n])
        used += n
    k_cache = torch.randn(num_blocks, BS, HKV, D, generator=g)
    v_cache = torch.randn(num_blocks, BS, HKV, D, generator=g)
    t = sum(qlens)
    q, k, v = (torch.randn(t, h, D, generator=g) for h in (HQ, HKV, HKV))
    slots = []
    for i, (lq, sl) in enumerate(zip(qlens, slens, strict=True)):
        slots += [int(tables[i, p // BS]) * BS + p % BS for p in range(sl - lq, sl)]
    qsl = [0]
    for lq in qlens:
        qsl.append(qsl[-1] + lq)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(slens, dtype=torch.int32, device=device), block_tables=tables.to(device),
        max_query_len=max(qlens), max_seq_len=max(slens))
    return q, k, v, k_cache, v_cache, meta


def poison_outside_windows(k_cache, v_cache, meta, qlens, slens, window, poison: float) -> None:
    """`poison` into every cache block no query of its sequence can see (wholly before all windows)."""
    shared = set()
    for i, (lq, sl) in enumerate(zip(qlens, slens, strict=True)):
        first_visible = max(0, sl - lq + 1 - window)
        n = math.ceil(sl / BS)
        for b in range(n):
            blk = int(meta.block_tables[i, b])
            if (b + 1) * BS <= first_visible:
                k_cache[blk] = poison
                v_cache[blk] = poison
            else:
                shared.add(blk)
    assert shared  # the tables do not overlap, so nothing visible was poisoned


STEPS = [  # (query lengths, context lengths after the step)
    ([1, 1, 6, 9], [37, 5, 23, 9]),  # decodes, a chunk over a cached prefix, a fresh prefill
    ([1, 1, 1], [41, 8, 19]),  # decode only (the Triton decode kernel)
]


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("step", STEPS)
def test_torch_path_matches_reference_and_skips_blocks_outside_the_window(step, window, softcap) -> None:
    qlens, slens = step
    q, k, v, kc, vc, meta = make_step(qlens, slens)
    from gearshift.engine.attention import store_kvcache_torch

    store_kvcache_torch(k, v, kc, vc, meta.slot_mapping)
    want = reference(q, kc, vc, qlens, slens, meta.block_tables, 0.3, window, softcap)
    if window:  # finite: the decodes' padding columns read block 0 masked (a cache never holds NaN)
        poison_outside_windows(kc, vc, meta, qlens, slens, window, 1e4)
    plan = build_plan(meta, BS, q.device, window=window)
    got = paged_attention_torch(q, k, v, kc, vc, meta, 0.3, plan, window, softcap)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-4
    if window:  # the decodes' gather spans only the blocks their windows touch
        for grp in plan.decodes:
            assert grp.blocks.shape[1] <= math.ceil(window / BS) + 1


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("step", STEPS)
def test_native_cpu_decode_matches_reference_and_skips_blocks_outside_the_window(step, window) -> None:
    from gearshift.engine import cpu_kernels
    from gearshift.engine.attention import store_kvcache_torch

    if cpu_kernels.kernels() is None:
        pytest.skip("the native CPU kernels could not be built here")
    qlens, slens = step
    q, k, v, kc, vc, meta = make_step(qlens, slens)
    store_kvcache_torch(k, v, kc, vc, meta.slot_mapping)
    want = reference(q, kc, vc, qlens, slens, meta.block_tables, 0.3, window, None)
    if window:  # NaN: the kernel walks only the blocks the window touches
        poison_outside_windows(kc, vc, meta, qlens, slens, window, float("nan"))
    plan = build_plan(meta, BS, q.device, native=True, window=window)
    assert plan.native is not None and not plan.decodes
    got = paged_attention_torch(q, k, v, kc, vc, meta, 0.3, plan, window)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("step", STEPS)
def test_triton_kernels_match_reference_and_skip_blocks_outside_the_window(step, window, softcap) -> None:
    pytest.importorskip("triton")
    from gearshift.engine.kernels import paged_attention, store_kvcache
    from gearshift.engine.kernels.loader import interpreter_active

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreter_active():
        pytest.skip("triton imported before TRITON_INTERPRET was set in this process")
    qlens, slens = step
    q, k, v, kc, vc, meta = make_step(qlens, slens, device)
    q, k, v, kc, vc = (t.to(device) for t in (q, k, v, kc, vc))
    store_kvcache(k, v, kc, vc, meta.slot_mapping)
    want = reference(q.cpu(), kc.cpu(), vc.cpu(), qlens, slens, meta.block_tables.cpu(), 0.3, window, softcap)
    if window:  # NaN: a masked-off load never reads it, and anything read would show
        poison_outside_windows(kc, vc, meta, qlens, slens, window, float("nan"))
    got = paged_attention(q, kc, vc, meta, 0.3, window=window, softcap=softcap).cpu()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 2e-4
