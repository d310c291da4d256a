"""Triton grouped GEMM for mixture-of-experts layers: every expert's matmul in one launch.

Input rows arrive sorted by expert (engine/model/moe.py): expert e owns rows [offset[e], offset[e] +
count[e]). Each program computes a BLOCK_M x BLOCK_N tile of Y = X @ W[e]^T for one M-block of one
expert; the M-blocks are laid out per expert (ceil(count / BLOCK_M) each) by torch ops on the device, so
no host sync and no loop over tokens or experts in Python. Upper bound of M-blocks: cdiv(N, BLOCK_M) + E;
the unused ones return at once.

    grouped_experts(x [N, D], gate_up [E, 2F, D], down [E, D, F], counts [E], act) -> [N, D]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm_kernel(
    y_ptr,  # [N, Nout]
    x_ptr,  # [N, K] rows grouped by expert
    w_ptr,  # [E, Nout, K]
    block_expert_ptr,  # [NB] int32: the expert of each M-block (E: unused block)
    block_start_ptr,  # [NB] int32: its first row
    block_end_ptr,  # [NB] int32: one past the expert's last row
    K,
    NOUT,
    NUM_EXPERTS,
    x_stride,
    w_stride_e,
    w_stride_n,
    y_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    mb = tl.program_id(0)
    nb = tl.program_id(1)
    expert = tl.load(block_expert_ptr + mb)
    if expert >= NUM_EXPERTS:
        return
    row_start = tl.load(block_start_ptr + mb)
    row_end = tl.load(block_end_ptr + mb)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < NOUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * w_stride_e
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_base + cols[None, :] * w_stride_n + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BK, BN]
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    tl.store(y_ptr + rows[:, None].to(tl.int64) * y_stride + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


INTERPRETED = type(_grouped_gemm_kernel).__name__ == "InterpretedFunction"


def block_layout(counts: torch.Tensor, block_m: int, num_rows: int) -> tuple[torch.Tensor, ...]:
    """counts [E] -> (expert, first row, row end) per M-block [NB], NB = cdiv(num_rows, block_m) + E.
    Pure torch on counts' device (no .item(): the launch shape depends on N and E only)."""
    e = counts.shape[0]
    nb = -(-num_rows // block_m) + e
    counts = counts.to(torch.int64)
    ends = counts.cumsum(0)
    offsets = ends - counts
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_ends = blocks.cumsum(0)
    b = torch.arange(nb, device=counts.device)
    expert = torch.searchsorted(block_ends, b, right=True)  # [NB], E past the last used block
    safe = expert.clamp(max=e - 1)
    local = b - (block_ends[safe] - blocks[safe])
    start = offsets[safe] + local * block_m
    return expert.to(torch.int32), start.to(torch.int32), ends[safe].to(torch.int32)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] grouped by expert (counts [E]), w [E, Nout, K] -> y [N, Nout] (row i: x[i] @ w[e(i)].T)."""
    n, k = x.shape
    e, nout, _ = w.shape
    x = x.contiguous()
    y = torch.empty(n, nout, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    bm, bn, bk = 16, 64, 32
    expert, start, end = block_layout(counts, bm, n)
    grid = (expert.shape[0], triton.cdiv(nout, bn))
    _grouped_gemm_kernel[grid](y, x, w, expert, start, end, k, nout, e, x.stride(0), w.stride(0), w.stride(1),
                               y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y


def grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
                    act: str) -> torch.Tensor:
    """The experts' gated MLPs over rows grouped by expert: two grouped GEMMs around the activation."""
    f = down.shape[2]
    h = grouped_gemm(x, gate_up, counts)  # [N, 2F]
    gate, up = h[:, :f], h[:, f:]
    a = (F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up
    return grouped_gemm(a, down, counts)  # [N, D]
