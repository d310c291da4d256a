"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks top-k experts per token, their gated MLPs
run on the tokens routed to them, the outputs are summed with the routing weights.

Experts are stacked: gate_up [E, 2F, D], down [E, D, F]. The batched path sorts the T*k (token, expert)
pairs by expert, so each expert runs one matmul over a contiguous slice of rows (a loop over the experts
that received tokens, never over tokens); on CUDA one Triton grouped-GEMM launch does all the experts
(engine/kernels/moe_gemm.py).
"""

from __future__ import annotations

import torch
from gearshift.engine.model.layers import Linear, gated_act
from torch import nn


def route(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64).

    Softmax over all experts, then the top k; normalize: rescale them to sum to 1 (Mixtral always does,
    which equals a softmax over the top-k logits; Qwen3-MoE when norm_topk_prob)."""
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (order [T*k]: flat (token, slot) indices grouped by expert, counts [E] int64)."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


def experts_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int],
                  act: str) -> torch.Tensor:
    """x [N, D] rows grouped by expert (counts[e] rows for expert e) -> [N, D]; one matmul pair per expert
    that has rows."""
    out = torch.empty_like(x)
    start = 0
    f = down.shape[2]
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gu = x[rows] @ gate_up[e].t()  # [n, 2F]
        out[rows] = (gated_act(gu[:, :f], act) * gu[:, f:]) @ down[e].t()
        start += n
    return out


class SparseMoE(nn.Module):
    """[T, D] -> [T, D]. Parameter names follow the loader's canonical form: gate (router), and the
    stacked experts_gate_up / experts_down, filled expert by expert from the checkpoint."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, normalize: bool,
                 act: str = "silu") -> None:
        super().__init__()
        self.num_experts, self.top_k, self.normalize, self.act = num_experts, top_k, normalize, act
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden), requires_grad=False)
        self.experts_down = nn.Parameter(torch.empty(num_experts, hidden, intermediate), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        weights, ids = route(self.gate(x), self.top_k, self.normalize)  # [T, k] each
        order, counts = sort_by_expert(ids, self.num_experts)
        xs = x.index_select(0, order // self.top_k)  # [T*k, D] rows grouped by expert
        if x.is_cuda:
            from gearshift.engine.kernels.loader import kernel_module  # lazy: Triton on GPUs only

            ys = kernel_module("moe_gemm", x.device).grouped_experts(xs, self.experts_gate_up, self.experts_down,
                                                                      counts, self.act)
        else:
            ys = experts_torch(xs, self.experts_gate_up, self.experts_down, counts.tolist(), self.act)
        ys = ys * weights.flatten().index_select(0, order).to(ys.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, order // self.top_k, ys)  # sum each token's k outputs
