"""Triton kernel: causal attention over the paged KV cache for a flat varlen batch of any query lengths.

One launch serves a mixed step (decodes and prefill chunks together). Each program owns one kv head and
a "q block": BLOCK_Q consecutive query tokens of one sequence times the G = Hq / Hkv query heads that
share the kv head, folded into BLOCK_M = BLOCK_Q * G rows (GQA folding, as vLLM's unified triton
attention does), so K/V tiles are read once per kv head. Online softmax in fp32 (exp2 domain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, key_pos, key_ok, kv_head, dims, dim_ok,
                  k_stride_0, k_stride_1, k_stride_2, v_stride_0, v_stride_1, v_stride_2,
                  BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr):
    """Gather one tile of keys [D, TILE] (transposed for q @ k) and values [TILE, D] through the block table."""
    block = tl.load(table_row + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    in_block = key_pos % BLOCK_SIZE
    k = tl.load(
        k_cache_ptr
        + block[None, :] * k_stride_0
        + in_block[None, :] * k_stride_1
        + kv_head * k_stride_2
        + dims[:, None],
        mask=dim_ok[:, None] & key_ok[None, :],
        other=0.0,
    )  # [D, TILE]
    v = tl.load(
        v_cache_ptr
        + block[:, None] * v_stride_0
        + in_block[:, None] * v_stride_1
        + kv_head * v_stride_2
        + dims[None, :],
        mask=key_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [TILE, D]
    if DOT_FP32:  # the interpreter gets bf16 tl.dot wrong: see loader.py
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _scores(qk, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """q.k products -> log2-domain logits; with soft-capping (Gemma 2) cap * tanh(s / cap) in between."""
    if HAS_SOFTCAP:
        x = qk * (qk_scale / 1.4426950408889634) / softcap
        return (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (softcap * 1.4426950408889634)  # tanh via sigmoid
    return qk * qk_scale


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence s owns q blocks from query_start_loc[s] // BLOCK_Q + s on (an upper bound that keeps
    # the grid computable from T and B alone); binary search the last s starting at or before q_block.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _unified_attention_kernel(
    out_ptr,  # [T, Hq, D]
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32: context after this step
    query_start_loc_ptr,  # [B+1] int32
    seq_skip_ptr,  # [B] int32, 1 = attended elsewhere (a dense prefill), its rows left alone; used when HAS_SKIP
    num_seqs,
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window (keys q_pos - window < j <= q_pos); used when HAS_WINDOW
    softcap,  # logit cap; used when HAS_SOFTCAP
    q_stride_0,
    q_stride_1,
    out_stride_0,
    out_stride_1,
    block_table_stride,
    k_stride_0,
    k_stride_1,
    k_stride_2,
    v_stride_0,
    v_stride_1,
    v_stride_2,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
    TILE: tl.constexpr,  # keys per inner iteration (any power of two; may span cache blocks)
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= BLOCK_Q * GROUP, power of two, >= 16 (tl.dot minimum)
    DOT_FP32: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    if HAS_SKIP:
        if tl.load(seq_skip_ptr + seq) != 0:
            return
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    q_pos = local_block * BLOCK_Q + rows // GROUP  # [BLOCK_M] position within this step's queries
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_ok = (rows < BLOCK_Q * GROUP) & (q_pos < q_len)
    dim_ok = dims < HEAD_DIM
    token = (q_start + q_pos).to(tl.int64)

    q = tl.load(
        q_ptr + token[:, None] * q_stride_0 + head[:, None] * q_stride_1 + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, D]
    if DOT_FP32:
        q = q.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys already cached before this step's queries
    # Causality: the last query row of this q block sees keys [0, context_len + its q_pos].
    last_pos = tl.minimum(local_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = context_len + last_pos + 1
    key_limit = context_len + q_pos + 1  # [BLOCK_M] exclusive bound per row
    kv_first = 0  # the first key any row of this q block may see
    if HAS_WINDOW:  # keys (and whole tiles) before the first row's window are never loaded
        kv_first = tl.maximum(context_len + local_block * BLOCK_Q + 1 - window, 0)
    kv_start = (kv_first // TILE) * TILE

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    offs = tl.arange(0, TILE)
    table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    for start in range(kv_start, kv_end, TILE):
        key_pos = start + offs  # [TILE]
        key_ok = (key_pos < kv_end) & (key_pos >= kv_first)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row, key_pos, key_ok, kv_head, dims, dim_ok,
                             k_stride_0, k_stride_1, k_stride_2, v_stride_0, v_stride_1, v_stride_2,
                             BLOCK_SIZE, DOT_FP32)  # [D, TILE], [TILE, D]
        s = _scores(tl.dot(q, k, input_precision="ieee"), qk_scale, softcap, HAS_SOFTCAP)  # [BLOCK_M, TILE]
        visible = row_ok[:, None] & (key_pos[None, :] < key_limit[:, None])
        if HAS_WINDOW:
            visible = visible & (key_pos[None, :] >= key_limit[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked (padding) rows: write zeros, not NaN
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + token[:, None] * out_stride_0 + head[:, None] * out_stride_1 + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


# Triton's interpreter (TRITON_INTERPRET=1, CPU tests) multiplies bfloat16's raw uint16 storage in tl.dot:
# there, and only there, bf16 operands are upcast to fp32 first (same products; fp32 accumulation anyway).
INTERPRETED = type(_unified_attention_kernel).__name__ == "InterpretedFunction"


def kv_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """The cache strides every paged kernel takes: k's block, slot and head strides, then v's."""
    return (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))


def variant_flags(q: torch.Tensor, window: int | None, softcap: float | None) -> dict[str, bool]:
    """The compile-time switches the attention kernels share (each picks a compiled variant)."""
    return {"DOT_FP32": INTERPRETED and q.dtype == torch.bfloat16, "HAS_WINDOW": window is not None,
            "HAS_SOFTCAP": softcap is not None}


@dataclass(frozen=True)
class UnifiedLaunch:
    grid: tuple[int, int]  # (q blocks: an upper bound over all sequences, Hkv)
    group: int  # G = Hq / Hkv query heads per kv head
    block_q: int  # query tokens per program
    block_m: int  # rows per program: BLOCK_Q * G, a power of two >= 16
    tile: int  # keys per inner step
    head_dim_padded: int


def plan_unified(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, num_seqs: int,
                 max_query_len: int) -> UnifiedLaunch:
    """The launch shape of one step: pure, from the shapes alone."""
    group = num_q_heads // num_kv_heads
    # Decode-heavy steps want small q blocks (little waste per sequence); prefill wants tall ones.
    rows = 16 if max_query_len * group <= 16 else 64
    block_m = max(rows, triton.next_power_of_2(group))
    block_q = block_m // group
    return UnifiedLaunch(grid=(num_tokens // block_q + num_seqs, num_kv_heads), group=group, block_q=block_q,
                         block_m=block_m, tile=32 if head_dim <= 128 else 16,
                         head_dim_padded=max(16, triton.next_power_of_2(head_dim)))


def unified_attention(
    q: torch.Tensor,  # [T, Hq, D], head_dim contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    max_query_len: int,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]
    window: int | None = None,
    softcap: float | None = None,
    seq_skip: torch.Tensor | None = None,  # [B] int32, 1 = skip this sequence (see prefill_route.py)
) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    plan = plan_unified(num_tokens, num_q_heads, k_cache.shape[2], head_dim, num_seqs, max_query_len)
    _unified_attention_kernel[plan.grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        seq_lens if seq_skip is None else seq_skip,  # any int32 pointer when unused
        num_seqs, scale * LOG2E, window or 0, softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *kv_strides(k_cache, v_cache),
        GROUP=plan.group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=plan.head_dim_padded,
        BLOCK_SIZE=k_cache.shape[1],
        TILE=plan.tile,
        BLOCK_Q=plan.block_q,
        BLOCK_M=plan.block_m,
        **variant_flags(q, window, softcap),
        HAS_SKIP=seq_skip is not None,
        num_warps=4,
        num_stages=2,
    )
    return out
