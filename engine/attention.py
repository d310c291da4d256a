"""Paged attention: write this step's K/V into the cache, then attend causally over each sequence's context.

Two paths behind one function, `paged_attention(q, k, v, k_cache, v_cache, meta, scale)`:
- CUDA tensors: the Triton kernels of `gearshift.engine.kernels` (imported lazily: CPU never needs Triton).
- otherwise the torch path below, which is also the reference the kernels are tested against.

Torch path, per step (the gather plan is built once, by the first layer, and reused by every layer):
- decodes (query length 1), fp32 or bf16 with the native kernel available (gearshift.engine.cpu_kernels): one call
  that reads each context's K/V in place, once;
- otherwise decodes go in batched SDPAs (one, or two when splitting by context length saves
  >= 20% of the padding) over their contexts gathered from the cache and padded to the group's longest,
  GQA folded into the query-length axis (no K/V repeat);
- each prefill chunk gets its own SDPA: causal over the new tokens alone when it has no cached prefix,
  else over the gathered context with a causal mask shifted by the prefix length.

Shapes: q [T, Hq, D]; k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D].
The caches may hold bf16 under fp32 q (--quantization int8 on CPUs with native bf16): K/V are rounded to
bf16 when written and widened back to q's dtype when read (no-op casts when the dtypes match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gearshift.engine import cpu_kernels
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.kernels.prefill_route import PrefillRoute


@dataclass
class _Prefill:
    rows: slice  # this sequence's rows in the flat batch
    ctx_blocks: torch.Tensor | None  # [nblk] int64 cache blocks of the context; None: no cached prefix
    # [Lq, nblk * block_size] bool, True = may attend ([Lq, Lq] over the new tokens when ctx_blocks is
    # None and a window applies); None: plain causal
    mask: torch.Tensor | None


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


def _batch_lists(meta: AttentionMetadata, device: torch.device) -> tuple[list[int], list[int], torch.Tensor, list[int]]:
    """What both plan builders read first: query start offsets [B+1], sequence lengths [B], the block
    tables [B, max_blocks] on `device`, and the indices of the decodes (query length 1)."""
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    bt = meta.block_tables.to(device=device, dtype=torch.int64)
    return qsl, seq_lens, bt, [i for i in range(len(seq_lens)) if qsl[i + 1] - qsl[i] == 1]


def build_plan(meta: AttentionMetadata, block_size: int, device: torch.device,
               native: bool = False, window: int | None = None) -> TorchAttentionPlan:
    """native: route decodes to gearshift.engine.cpu_kernels.paged_decode (fp32/bf16 caches, kernel loaded).
    window: a sliding window (a query at position i sees keys i - window < j <= i); cache blocks wholly
    before every query's window are neither gathered nor read."""
    if window is not None:
        return _build_window_plan(meta, block_size, device, window, native)
    qsl, seq_lens, bt, decode_idx = _batch_lists(meta, device)
    decodes: list[_DecodeGroup] = []
    native_decodes = None
    if native and decode_idx:
        native_decodes = _native_decodes(meta, decode_idx, qsl, seq_lens, block_size, device)
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


def _native_decodes(meta: AttentionMetadata, decode_idx: list[int], qsl: list[int], seq_lens: list[int],
                    block_size: int, device: torch.device) -> _NativeDecodes:
    nblk = (max(seq_lens[i] for i in decode_idx) + block_size - 1) // block_size
    idx = torch.tensor(decode_idx, dtype=torch.int64, device=device)
    return _NativeDecodes(
        rows=torch.tensor([qsl[i] for i in decode_idx], dtype=torch.int64, device=device),
        block_tables=meta.block_tables.index_select(0, idx)[:, :nblk].contiguous(),
        seq_lens=meta.seq_lens.index_select(0, idx).contiguous(),
    )


def _build_window_plan(meta: AttentionMetadata, bs: int, device: torch.device, w: int,
                       native: bool = False) -> TorchAttentionPlan:
    """build_plan for a sliding-window layer: each decode gathers only the blocks its window touches (the
    native kernel, given the window, walks only those blocks too)."""
    qsl, seq_lens, bt, decode_idx = _batch_lists(meta, device)
    decodes: list[_DecodeGroup] = []
    native_decodes = None
    if native and decode_idx:
        native_decodes = _native_decodes(meta, decode_idx, qsl, seq_lens, bs, device)
    elif decode_idx:
        idx = torch.tensor(decode_idx, dtype=torch.int64, device=device)
        lens = meta.seq_lens.index_select(0, idx).to(device=device, dtype=torch.int64)  # [Bd]
        first = (lens - w).clamp(min=0) // bs  # [Bd] first block inside the window
        nwin = int(((lens + bs - 1) // bs - first).max())
        cols = first[:, None] + torch.arange(nwin, device=device)[None, :]  # [Bd, nwin]
        blocks = bt.index_select(0, idx).gather(1, cols.clamp(max=bt.shape[1] - 1))
        pos = (cols[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)  # [Bd, nwin * bs]
        mask = ((pos < lens[:, None]) & (pos >= lens[:, None] - w))[:, None, None, :]
        decodes.append(_DecodeGroup(idx.new_tensor([qsl[i] for i in decode_idx]), blocks, mask))
    prefills: list[_Prefill] = []
    for i in range(len(seq_lens)):
        lq = qsl[i + 1] - qsl[i]
        if lq <= 1:
            continue
        length = seq_lens[i]
        start = length - lq
        qpos = start + torch.arange(lq, device=device)[:, None]  # [Lq, 1]
        if start == 0:
            kpos = torch.arange(lq, device=device)[None, :]
            prefills.append(_Prefill(slice(qsl[i], qsl[i + 1]), None, (kpos <= qpos) & (kpos > qpos - w)))
            continue
        first, nblk = max(0, start + 1 - w) // bs, (length + bs - 1) // bs
        kpos = first * bs + torch.arange((nblk - first) * bs, device=device)[None, :]
        prefills.append(_Prefill(slice(qsl[i], qsl[i + 1]), bt[i, first:nblk], (kpos <= qpos) & (kpos > qpos - w)))
    return TorchAttentionPlan(decodes, prefills, native_decodes)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          softcap: float | None, gqa: bool = False) -> torch.Tensor:
    """SDPA over [..., H, L, D]; mask None means causal. With softcap (Gemma 2) the logits pass through
    cap * tanh(s / cap) before the softmax, which SDPA cannot do: explicit matmuls then."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=gqa)
    if gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [..., H, Lq, Lk]
    s = softcap * torch.tanh(s / softcap)
    if mask is None:
        lq, lk = s.shape[-2], s.shape[-1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(lk - lq)
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


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
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (this step's) -> out [T, Hq, D]; writes k/v into the cache first.
    plan: built for this layer's window (build_plan(..., window=window)); built here when None."""
    store_kvcache_torch(k, v, k_cache, v_cache, meta.slot_mapping)
    if plan is None:
        plan = build_plan(meta, k_cache.shape[1], q.device, window=window)
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty_like(q)
    if plan.native is not None:
        nd = plan.native
        cpu_kernels.kernels().paged_decode(q, k_cache, v_cache, nd.block_tables, nd.seq_lens, nd.rows, out, scale,
                                           window or 0)
    for grp in plan.decodes:
        bd = grp.blocks.shape[0]
        qd = q[grp.rows] if isinstance(grp.rows, slice) else q.index_select(0, grp.rows)
        qd = qd.view(bd, hkv, g, d)  # the G query heads sharing a KV head play the query-length axis
        # index_select, not advanced indexing: measured ~2x faster for this gather on CPU.
        # [Bd * nblk, bs, Hkv, D] -> [Bd, L, Hkv, D] -> [Bd, Hkv, L, D]
        kd = k_cache.index_select(0, grp.blocks.flatten()).view(bd, -1, hkv, d).transpose(1, 2).to(q.dtype)
        vd = v_cache.index_select(0, grp.blocks.flatten()).view(bd, -1, hkv, d).transpose(1, 2).to(q.dtype)
        od = _sdpa(qd, kd, vd, grp.mask, scale, softcap).reshape(bd, hq, d)
        if isinstance(grp.rows, slice):
            out[grp.rows] = od
        else:
            out.index_copy_(0, grp.rows, od)
    for p in plan.prefills:
        qp = q[p.rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
        if p.ctx_blocks is None:
            kp = k[p.rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, Lq, D]
            vp = v[p.rows].transpose(0, 1).unsqueeze(0)
            op = _sdpa(qp, kp, vp, p.mask, scale, softcap, gqa=True)
        else:
            kp = k_cache.index_select(0, p.ctx_blocks).view(-1, hkv, d).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vp = v_cache.index_select(0, p.ctx_blocks).view(-1, hkv, d).transpose(0, 1).unsqueeze(0)
            kp, vp = kp.to(q.dtype), vp.to(q.dtype)  # a bf16 cache under fp32 activations (int8)
            op = _sdpa(qp, kp, vp, p.mask, scale, softcap, gqa=True)
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
    plan: TorchAttentionPlan | PrefillRoute | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dispatch: Triton kernels for CUDA tensors, the torch path otherwise. Shapes as in the module doc.
    window: this layer's sliding window (None: whole context); softcap: attention-logit cap (Gemma 2).
    plan on CUDA: the step's kernels.PrefillRoute for this window (long prefills with no cached prefix go
    to flash SDPA, see kernels/prefill_route.py), or None (every sequence through the paged kernels)."""
    if q.is_cuda:
        from gearshift.engine import kernels  # lazy: Triton is a GPU-only dependency

        route = plan if isinstance(plan, kernels.PrefillRoute) else None
        return kernels.attention_step(q, k, v, k_cache, v_cache, meta, scale, route, window=window, softcap=softcap)
    return paged_attention_torch(q, k, v, k_cache, v_cache, meta, scale, plan, window, softcap)
