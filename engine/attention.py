"""Paged attention: write this step's K/V into the cache, then attend causally over each sequence's context.

Two paths behind one function, `paged_attention(q, k, v, k_cache, v_cache, meta, scale)`:
- CUDA tensors: the Triton kernels of `gearshift.engine.kernels` (imported lazily: CPU never needs Triton).
- otherwise the torch path below, which is also the reference the kernels are tested against.

Torch path, per step (the gather plan is built once, by the first layer, and reused by every layer):
- decodes (query length 1), fp32 with the native kernel available (gearshift.engine.cpu_kernels): one call
  that reads each context's K/V in place, once;
- otherwise decodes go in batched SDPAs (one, or two when splitting by context length saves
  >= 20% of the padding) over their contexts gathered from the cache and padded to the group's longest,
  GQA folded into the query-length axis (no K/V repeat);
- each prefill chunk gets its own SDPA: causal over the new tokens alone when it has no cached prefix,
  else over the gathered context with a causal mask shifted by the prefix length.

Shapes: q [T, Hq, D]; k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gearshift.engine import cpu_kernels
from gearshift.engine.attention_metadata import AttentionMetadata


@dataclass
class _Prefill:
    rows: slice  # this sequence's rows in the flat batch
    ctx_blocks: torch.Tensor | None  # [nblk] int64 cache blocks of the whole context; None: no cached prefix
    mask: torch.Tensor | None  # [Lq, nblk * block_size] bool, True = may attend; None: plain causal


@dataclass
class _DecodeGroup:
    rows: torch.Tensor | slice  # [Bd] int64 rows of these decode tokens, or a slice when contiguous
    blocks: torch.Tensor  # [Bd, nblk] int64 cache blocks of each context, 0-padded
    mask: torch.Tensor  # [Bd, 1, 1, nblk * block_size] bool, True = a real context position


@dataclass
class _NativeDecodes:
    rows: torch.Tensor  # [Bd] int64 rows of the decode tokens in the flat batch
    block_tables: torch.Tensor  # [Bd, nblk] int32, contiguous
    seq_lens: torch.Tensor  # [Bd] int32


@dataclass
class TorchAttentionPlan:
    decodes: list[_DecodeGroup]  # decodes batched by similar context length (less padding to gather)
    prefills: list[_Prefill]
    native: _NativeDecodes | None = None  # all decodes, for the native kernel (then `decodes` is empty)


def _split_by_length(idx: list[int], lens: list[int]) -> list[list[int]]:
    """Sort decodes by context length and cut once where it saves >= 20% of the padded gather work."""
    idx = sorted(idx, key=lambda i: lens[i])
    n = len(idx)
    whole = n * lens[idx[-1]]
    best_cost, best_k = whole, 0
    for k in range(1, n):
        cost = k * lens[idx[k - 1]] + (n - k) * lens[idx[-1]]
        if cost < best_cost:
            best_cost, best_k = cost, k
    if best_k and best_cost <= 0.8 * whole:
        return [idx[:best_k], idx[best_k:]]
    return [idx]


def build_plan(meta: AttentionMetadata, block_size: int, device: torch.device,
               native: bool = False) -> TorchAttentionPlan:
    """native: route decodes to gearshift.engine.cpu_kernels.paged_decode (fp32 caches, kernel loaded)."""
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    bt = meta.block_tables.to(device=device, dtype=torch.int64)
    decode_idx = [i for i in range(len(seq_lens)) if qsl[i + 1] - qsl[i] == 1]
    decodes: list[_DecodeGroup] = []
    native_decodes = None
    if native and decode_idx:
        nblk = (max(seq_lens[i] for i in decode_idx) + block_size - 1) // block_size
        idx = torch.tensor(decode_idx, dtype=torch.int64, device=device)
        native_decodes = _NativeDecodes(
            rows=torch.tensor([qsl[i] for i in decode_idx], dtype=torch.int64, device=device),
            block_tables=meta.block_tables.index_select(0, idx)[:, :nblk].contiguous(),
            seq_lens=meta.seq_lens.index_select(0, idx).contiguous(),
        )
        decode_idx = []
    for group in _split_by_length(decode_idx, seq_lens) if decode_idx else []:
        group.sort()  # keep flat-batch order: rows [0, Bd) stay a slice when decodes come first
        # Gather whole blocks (contiguous rows of block_size * Hkv * D), not single slots: fewer, larger copies.
        nblk = (max(seq_lens[i] for i in group) + block_size - 1) // block_size
        blocks = bt[torch.tensor(group, dtype=torch.int64, device=device), :nblk]
        lens = torch.tensor([seq_lens[i] for i in group], device=device)
        mask = (torch.arange(nblk * block_size, device=device)[None, :] < lens[:, None])[:, None, None, :]
        first = qsl[group[0]]
        row_list = [qsl[i] for i in group]
        rows = (slice(first, first + len(group)) if row_list == list(range(first, first + len(group)))
                else torch.tensor(row_list, dtype=torch.int64, device=device))
        decodes.append(_DecodeGroup(rows, blocks, mask))
    prefills: list[_Prefill] = []
    for i in range(len(seq_lens)):
        lq = qsl[i + 1] - qsl[i]
        if lq <= 1:  # a decode, handled above, or a padding sequence (query length 0)
            continue
        length = seq_lens[i]
        start = length - lq
        if start == 0:
            prefills.append(_Prefill(slice(qsl[i], qsl[i + 1]), None, None))
            continue
        nblk = (length + block_size - 1) // block_size
        pos = torch.arange(nblk * block_size, device=device)
        # causal, shifted by the cached prefix; padding past `length` is > every query position
        mask = pos[None, :] <= (start + torch.arange(lq, device=device))[:, None]
        prefills.append(_Prefill(slice(qsl[i], qsl[i + 1]), bt[i, :nblk], mask))
    return TorchAttentionPlan(decodes, prefills, native_decodes)


def store_kvcache_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] -> the cache rows slot_mapping [T] (slot = block * block_size + offset)."""
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    plan: TorchAttentionPlan | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (this step's) -> out [T, Hq, D]; writes k/v into the cache first."""
    store_kvcache_torch(k, v, k_cache, v_cache, meta.slot_mapping)
    if plan is None:
        plan = build_plan(meta, k_cache.shape[1], q.device)
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty_like(q)
    if plan.native is not None:
        nd = plan.native
        cpu_kernels.kernels().paged_decode(q, k_cache, v_cache, nd.block_tables, nd.seq_lens, nd.rows, out, scale)
    for grp in plan.decodes:
        bd = grp.blocks.shape[0]
        qd = q[grp.rows] if isinstance(grp.rows, slice) else q.index_select(0, grp.rows)
        qd = qd.view(bd, hkv, g, d)  # the G query heads sharing a KV head play the query-length axis
        # index_select, not advanced indexing: measured ~2x faster for this gather on CPU.
        # [Bd * nblk, bs, Hkv, D] -> [Bd, L, Hkv, D] -> [Bd, Hkv, L, D]
        kd = k_cache.index_select(0, grp.blocks.flatten()).view(bd, -1, hkv, d).transpose(1, 2)
        vd = v_cache.index_select(0, grp.blocks.flatten()).view(bd, -1, hkv, d).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=grp.mask, scale=scale).reshape(bd, hq, d)
        if isinstance(grp.rows, slice):
            out[grp.rows] = od
        else:
            out.index_copy_(0, grp.rows, od)
    for p in plan.prefills:
        qp = q[p.rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
        if p.ctx_blocks is None:
            kp = k[p.rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, Lq, D]
            vp = v[p.rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp = k_cache.index_select(0, p.ctx_blocks).view(-1, hkv, d).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vp = v_cache.index_select(0, p.ctx_blocks).view(-1, hkv, d).transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.rows] = op.squeeze(0).transpose(0, 1)
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    plan: TorchAttentionPlan | None = None,
) -> torch.Tensor:
    """Dispatch: Triton kernels for CUDA tensors, the torch path otherwise. Shapes as in the module doc."""
    if q.is_cuda:
        from gearshift.engine import kernels  # lazy: Triton is a GPU-only dependency

        kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return kernels.paged_attention(q, k_cache, v_cache, meta, scale)
    return paged_attention_torch(q, k, v, k_cache, v_cache, meta, scale, plan)
