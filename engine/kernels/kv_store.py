"""Triton kernel: write this step's new keys and values into the paged KV cache.

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
slot = block_id * block_size + offset; slot -1 marks a padding token (e.g. CUDA-graph padding): skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [T, Hkv, D]
    value_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,  # [T] int64
    key_stride_0,
    key_stride_1,
    value_stride_0,
    value_stride_1,
    k_cache_stride_0,
    k_cache_stride_1,
    k_cache_stride_2,
    v_cache_stride_0,
    v_cache_stride_1,
    v_cache_stride_2,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PADDED: tl.constexpr,  # power of two >= NUM_KV_HEADS (tl.arange needs one)
    HEAD_DIM_PADDED: tl.constexpr,  # power of two >= HEAD_DIM
    BLOCK_SIZE: tl.constexpr,
):
    # One program per token: all its kv heads at once ([HEADS_PADDED, HEAD_DIM_PADDED] tile).
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    k = tl.load(key_ptr + token * key_stride_0 + heads[:, None] * key_stride_1 + dims[None, :], mask=mask)
    v = tl.load(
        value_ptr + token * value_stride_0 + heads[:, None] * value_stride_1 + dims[None, :], mask=mask
    )
    k_dst = (
        block * k_cache_stride_0
        + offset * k_cache_stride_1
        + heads[:, None] * k_cache_stride_2
        + dims[None, :]
    )
    v_dst = (
        block * v_cache_stride_0
        + offset * v_cache_stride_1
        + heads[:, None] * v_cache_stride_2
        + dims[None, :]
    )
    tl.store(k_cache_ptr + k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# Whether @triton.jit ran under TRITON_INTERPRET=1 when this module was imported (see loader.py).
INTERPRETED = type(_store_kvcache_kernel).__name__ == "InterpretedFunction"


def _innermost_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels index the head dimension with stride 1 (the common case: views of a fused qkv).
    return t if t.stride(-1) == 1 else t.contiguous()


def store_kvcache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must be equal 4-D")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != key's {(num_kv_heads, head_dim)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    if num_tokens == 0:
        return
    key = _innermost_contiguous(key)
    value = _innermost_contiguous(value)
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=1 if num_kv_heads * head_dim <= 256 else 4,
    )
