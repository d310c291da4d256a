"""Mixture-of-experts pieces: routing with each family's normalisation, the batched expert path against a
per-token reference, and the Triton grouped GEMM (under the interpreter on CPU) against torch.
The whole MoE models are checked against transformers in test_families.py (Mixtral, Qwen3-MoE)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gearshift.engine.model.moe import SparseMoE, experts_torch, route, sort_by_expert  # noqa: E402


def test_route_normalises_as_each_family_does() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 3.0, 1.0]])
    w, ids = route(logits, 2, normalize=True)  # Mixtral: a softmax over the top-k logits
    assert ids[0].tolist() == [0, 1]
    assert torch.allclose(w[0], torch.softmax(torch.tensor([2.0, 1.0]), 0))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    w2, ids2 = route(logits, 2, normalize=False)  # Qwen3-MoE without norm_topk_prob: raw softmax shares
    assert torch.equal(ids2, ids) and torch.allclose(w2[0], torch.softmax(logits[0], 0)[:2])
    assert (w2.sum(-1) < 1).all()


def test_sort_by_expert_groups_rows_without_a_token_loop() -> None:
    ids = torch.tensor([[3, 0], [0, 2], [3, 1]])
    order, counts = sort_by_expert(ids, 5)
    assert counts.tolist() == [2, 1, 1, 2, 0]
    assert ids.flatten()[order].tolist() == [0, 0, 1, 2, 3, 3]


def _reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: obviously right, slow."""
    w, ids = route(moe.gate(x), moe.top_k, moe.normalize)
    f = moe.experts_down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(ids[t, j])
            gu = moe.experts_gate_up[e] @ x[t]
            out[t] += w[t, j] * (moe.experts_down[e] @ (torch.nn.functional.silu(gu[:f]) * gu[f:]))
    return out


def _moe(seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(hidden=32, intermediate=24, num_experts=6, top_k=2, normalize=True)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return moe


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_batched_experts_equal_the_per_token_reference(tokens: int) -> None:
    moe = _moe()
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        assert (moe(x) - _reference(moe, x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("counts", [[5, 0, 17, 1, 0, 33], [0, 0, 0, 0, 0, 1], [16, 16, 16, 16, 16, 16]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_gemm_matches_torch(counts: list[int], dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from gearshift.engine.kernels.loader import interpreter_active, kernel_module

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not interpreter_active():
        pytest.skip("triton imported before TRITON_INTERPRET was set in this process")
    mod = kernel_module("moe_gemm", device)
    g = torch.Generator().manual_seed(0)
    n, e, d, f = sum(counts), len(counts), 48, 40
    x = torch.randn(n, d, generator=g).to(device, dtype)
    gate_up = (torch.randn(e, 2 * f, d, generator=g) * 0.2).to(device, dtype)
    down = (torch.randn(e, d, f, generator=g) * 0.2).to(device, dtype)
    c = torch.tensor(counts, device=device)
    got = mod.grouped_experts(x, gate_up, down, c, "silu").float().cpu()
    # The reference rounds where the kernel path does (the [N, 2F] and [N, F] intermediates in `dtype`).
    want = experts_torch(x.cpu(), gate_up.cpu(), down.cpu(), counts, "silu").float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2 * want.abs().max().item()  # a few bf16 ulps
    assert (got - want).abs().max().item() < tol


def test_block_layout_covers_every_row_once() -> None:
    pytest.importorskip("triton")
    from gearshift.engine.kernels.loader import interpreter_active, kernel_module

    if not torch.cuda.is_available() and not interpreter_active():
        pytest.skip("triton imported before TRITON_INTERPRET was set in this process")
    mod = kernel_module("moe_gemm", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    counts = torch.tensor([5, 0, 17, 1, 0, 33])
    expert, start, end = mod.block_layout(counts, 16, int(counts.sum()))
    seen = []
    for ex, s, en in zip(expert.tolist(), start.tolist(), end.tolist(), strict=True):
        if ex < len(counts):
            seen += [(r, ex) for r in range(s, min(s + 16, en))]
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts).tolist()
    assert sorted(seen) == list(enumerate(owner))
