"""The GPU attention entry points the model runner calls: validation, path choice, launch.

`paged_attention` serves any step: pure-decode steps (every query length 1) take the split-KV decode
kernels, everything else (prefill chunks, prefix-cached prefills, decodes mixed with prefills) the
unified varlen kernel. `attention_step` is what the engine calls per layer: the K/V write, then long
prefills with no cached prefix through dense SDPA and the rest through `paged_attention`
(prefill_route.py says which and why). Tensors on CUDA run compiled kernels; CPU tensors run them under
Triton's interpreter (tests), see loader.py.
"""

from __future__ import annotations

import functools

import torch
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.kernels.loader import kernel_module
from gearshift.engine.kernels.prefill_route import PrefillRoute, dense_causal

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DECODE_SPLITS = 16


def store_kvcache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64; -1 = padding token, skipped
) -> None:
    """Write each token's key/value rows into its cache slot (block_id * block_size + offset)."""
    _check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    kernel_module("kv_store", key.device).store_kvcache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, Hq, D]; allocated when None
    num_splits: int | None = None,  # decode path only; None = chosen from the GPU's size
    window: int | None = None,  # sliding window: a query at position i sees keys i - window < j <= i
    softcap: float | None = None,  # attention logits -> softcap * tanh(logits / softcap) (Gemma 2)
    seq_skip: torch.Tensor | None = None,  # [B] int32, 1 = leave this sequence's rows alone (non-decode steps)
) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's paged context -> [T, Hq, D].

    Query token i of sequence s (query_start_loc[s] <= i < query_start_loc[s+1]) sits at position
    seq_lens[s] - q_len_s + (i - query_start_loc[s]) and sees keys 0..that position, which must already
    be in the cache (call store_kvcache for this step's tokens first). Rows of padding sequences
    (query length 0) are not written.
    """
    _check_attention_args(q, k_cache, v_cache, meta)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor with contiguous head_dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if q.shape[0] == 0 or meta.num_seqs == 0:
        return out
    if seq_skip is not None and (seq_skip.dtype != torch.int32 or seq_skip.shape != (meta.num_seqs,)
                                 or seq_skip.device != q.device):
        raise ValueError(f"seq_skip must be a [{meta.num_seqs}] int32 tensor on {q.device}")
    if meta.is_pure_decode:
        if seq_skip is not None:
            raise ValueError("seq_skip is for steps with prefills (a pure-decode step has nothing dense)")
        splits = num_splits if num_splits is not None else _default_splits(q.device, meta.num_seqs, k_cache)
        if splits < 1 or splits & (splits - 1):
            raise ValueError(f"num_splits must be a power of two >= 1, got {splits}")
        return kernel_module("decode_attention", q.device).decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale, splits, out,
            window, softcap,
        )
    return kernel_module("unified_attention", q.device).unified_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale,
        out,
        window,
        softcap,
        seq_skip,
    )


def attention_step(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D] this step's keys
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    route: PrefillRoute | None,  # prefill_route.plan_route(meta, ...) for this layer's window; None: all paged
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One layer's step as the engine runs it on the GPU: write this step's K/V into the cache, then attend
    (the route's dense prefills by SDPA, every other sequence by the paged kernels) -> [T, Hq, D]."""
    store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    if route is None:
        return paged_attention(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
    if route.seq_skip is None and route.dense_rows == ((0, q.shape[0]),):
        return dense_causal(q, k, v, scale).contiguous()  # one long prompt: SDPA's own output, no copy
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if route.seq_skip is not None:
        paged_attention(q, k_cache, v_cache, meta, scale, out=out, window=window, softcap=softcap,
                        seq_skip=route.seq_skip)
    for start, end in route.dense_rows:
        out[start:end] = dense_causal(q[start:end], k[start:end], v[start:end], scale)
    return out


def _default_splits(device: torch.device, num_seqs: int, k_cache: torch.Tensor) -> int:
    # Enough programs for ~2 waves over the GPU's SMs; depends only on the batch shape (never on the
    # step's context lengths), so a CUDA graph captured for a batch size stays right for every replay.
    programs = num_seqs * k_cache.shape[2]
    target = 2 * _multiprocessor_count(device)
    splits = 1
    while splits < MAX_DECODE_SPLITS and programs * splits < target:
        splits *= 2
    return splits


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits so the merge path is exercised


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"tensors on different devices: {devices}")


def _check_attention_args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> None:
    _check_same_device(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=meta.block_tables,
        seq_lens=meta.seq_lens,
        query_start_loc=meta.query_start_loc,
    )
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [T, Hq, D] and equal caches [blocks, block_size, Hkv, D]; got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share one of fp16/bf16/fp32; got {q.dtype}, {k_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    for name, t in (
        ("block_tables", meta.block_tables),
        ("seq_lens", meta.seq_lens),
        ("query_start_loc", meta.query_start_loc),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"meta.{name} must be int32, got {t.dtype}")
    if meta.query_start_loc.shape[0] != meta.num_seqs + 1:
        raise ValueError(
            f"meta.query_start_loc has {meta.query_start_loc.shape[0]} entries for {meta.num_seqs} sequences"
        )
