"""Triton kernels: split-KV ("flash-decoding") attention for steps where every query length is 1.

A decode step has one query token per sequence, so the unified kernel would launch only B x Hkv programs,
each walking a whole context: too few to fill a GPU. Here stage 1 splits every context into NUM_SPLITS
contiguous tile ranges, one program each (grid B x Hkv x NUM_SPLITS; GQA heads folded into rows), and
writes unnormalised partial results with their running max and sum; stage 2 merges the splits
(log-sum-exp rescaling) into the output. The split ranges are computed in-kernel from seq_lens, so the
launch depends only on B, Hkv and NUM_SPLITS: fit for CUDA-graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gearshift.engine.kernels.unified_attention import (
    LOG2E,
    _load_kv_tile,
    _scores,
    kv_strides,
    variant_flags,
)


@triton.jit
def _decode_split_kernel(
    part_acc_ptr,  # [B, Hq, NUM_SPLITS, HEAD_DIM_PADDED] fp32, unnormalised
    part_max_ptr,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    part_sum_ptr,  # [B, Hq, NUM_SPLITS] fp32
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B+1] int32
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window; used when HAS_WINDOW
    softcap,  # logit cap; used when HAS_SOFTCAP
    q_stride_0,
    q_stride_1,
    block_table_stride,
    k_stride_0,
    k_stride_1,
    k_stride_2,
    v_stride_0,
    v_stride_1,
    v_stride_2,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # power of two >= max(16, GROUP)
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - token
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    head = kv_head * GROUP + rows
    row_ok = rows < tl.where(q_len > 0, GROUP, 0)  # a padding sequence (no query) reads nothing
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + token.to(tl.int64) * q_stride_0 + head[:, None] * q_stride_1 + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, D]
    if DOT_FP32:
        q = q.to(tl.float32)

    key_lo = 0
    if HAS_WINDOW:  # only the tiles the window touches are split and read
        key_lo = tl.maximum(seq_len - window, 0)
    first_tile = key_lo // TILE
    num_tiles = tl.cdiv(seq_len, TILE) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    offs = tl.arange(0, TILE)
    table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    for t in range(tile_lo, tile_hi):
        key_pos = t * TILE + offs
        key_ok = (key_pos < seq_len) & (key_pos >= key_lo)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, key_pos, key_ok, kv_head, dims, dim_ok,
                             k_stride_0, k_stride_1, k_stride_2, v_stride_0, v_stride_1, v_stride_2,
                             BLOCK_SIZE, DOT_FP32)  # [D, TILE], [TILE, D]
        s = _scores(tl.dot(q, k, input_precision="ieee"), qk_scale, softcap, HAS_SOFTCAP)  # [BLOCK_M, TILE]
        s = tl.where(row_ok[:, None] & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # An empty split (context shorter than NUM_SPLITS tiles) still writes max=-inf, sum=0: stage 2
    # then gives it zero weight without needing to know which splits ran.
    part = (seq.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
    head_ok = rows < GROUP
    tl.store(part_max_ptr + part, m_i, mask=head_ok)
    tl.store(part_sum_ptr + part, l_i, mask=head_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PADDED + dims[None, :], acc, mask=head_ok[:, None])


@triton.jit
def _decode_merge_kernel(
    out_ptr,  # [T, Hq, D]
    part_acc_ptr,  # [B, Hq, NUM_SPLITS, HEAD_DIM_PADDED]
    part_max_ptr,  # [B, Hq, NUM_SPLITS]
    part_sum_ptr,  # [B, Hq, NUM_SPLITS]
    query_start_loc_ptr,  # [B+1] int32
    out_stride_0,
    out_stride_1,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token == 0:
        return  # a padding sequence with no query
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    base = (seq.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS
    m = tl.load(part_max_ptr + base + splits)  # [NUM_SPLITS]
    sums = tl.load(part_sum_ptr + base + splits)
    acc = tl.load(part_acc_ptr + (base + splits)[:, None] * HEAD_DIM_PADDED + dims[None, :])  # [S, D]
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_all)  # empty splits: exp2(-inf) = 0
    denom = tl.sum(sums * w, axis=0)
    denom = tl.where(denom == 0.0, 1.0, denom)  # empty context: zeros, not NaN
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(
        out_ptr + token.to(tl.int64) * out_stride_0 + head * out_stride_1 + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


# Triton's interpreter (TRITON_INTERPRET=1, CPU tests) multiplies bfloat16's raw uint16 storage in tl.dot:
# there, and only there, bf16 operands are upcast to fp32 first (same products; fp32 accumulation anyway).
INTERPRETED = type(_decode_split_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class DecodeLaunch:
    split_grid: tuple[int, int, int]  # (B, Hkv, NUM_SPLITS): stage 1
    merge_grid: tuple[int, int]  # (B, Hq): stage 2
    group: int  # G = Hq / Hkv query heads per kv head, folded into rows
    block_m: int  # rows per stage-1 program: a power of two >= max(16, G)
    head_dim_padded: int
    merge_warps: int


def plan_decode(num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                num_splits: int) -> DecodeLaunch:
    """The launch shapes of both stages: pure, from the shapes alone."""
    group = num_q_heads // num_kv_heads
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    return DecodeLaunch(split_grid=(num_seqs, num_kv_heads, num_splits), merge_grid=(num_seqs, num_q_heads),
                        group=group, block_m=max(16, triton.next_power_of_2(group)),
                        head_dim_padded=head_dim_padded, merge_warps=1 if head_dim_padded <= 64 else 2)


def decode_attention(
    q: torch.Tensor,  # [T, Hq, D], head_dim contiguous, one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    scale: float,
    num_splits: int,  # power of two
    out: torch.Tensor,  # [T, Hq, D]
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0]
    plan = plan_decode(num_seqs, num_q_heads, k_cache.shape[2], head_dim, num_splits)
    part_acc = torch.empty(
        (num_seqs, num_q_heads, num_splits, plan.head_dim_padded), dtype=torch.float32, device=q.device
    )
    part_max = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    _decode_split_kernel[plan.split_grid](
        part_acc, part_max, part_sum, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, window or 0, softcap or 0.0,
        q.stride(0), q.stride(1), block_tables.stride(0), *kv_strides(k_cache, v_cache),
        NUM_Q_HEADS=num_q_heads,
        GROUP=plan.group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=plan.head_dim_padded,
        BLOCK_SIZE=k_cache.shape[1],
        TILE=32,
        BLOCK_M=plan.block_m,
        NUM_SPLITS=num_splits,
        **variant_flags(q, window, softcap),
        num_warps=4,
        num_stages=2,
    )
    _decode_merge_kernel[plan.merge_grid](
        out, part_acc, part_max, part_sum, query_start_loc, out.stride(0), out.stride(1),
        NUM_Q_HEADS=num_q_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=plan.head_dim_padded,
        NUM_SPLITS=num_splits,
        num_warps=plan.merge_warps,
    )
    return out
