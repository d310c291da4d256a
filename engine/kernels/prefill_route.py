"""Which sequences of a GPU step attend densely (torch SDPA, flash on CUDA) and which through the unified
paged kernel; and the dense attention itself.

Why (issue 15 item 2): the unified kernel tiles keys by 32 through the block table and ran a 4096-token
causal prefill at ~190 TFLOP/s on an H200 where torch's flash SDPA ran ~380 (bench/kernels.py,
2026-11-26: 0.49x). A prefill with no cached prefix attends only over this step's own keys, which lie
contiguous in k/v [T, Hkv, D] (the projection's output): it needs no paging. vLLM sends such prefills to
flash-attn varlen; we call `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` per sequence
(flash on CUDA for 16-bit; GQA without repeating K/V). Chosen over a Triton flash-attention forward of our
own because flash SDPA is already at the target by definition, and no GPU was lent to tune a kernel on.
The KV cache is still written for every token (later steps read it), as before.

What stays in the unified kernel, because SDPA's flash path cannot express it or does not pay:
- a cached prefix (prefix hits, later chunks of a chunked prefill): the keys are paged;
- soft-capped logits (Gemma 2); a sliding window shorter than the sequence (a window that covers the
  whole sequence is plain causal and goes dense);
- fp32 (flash is 16-bit only) and head dims flash does not take (> 256 or not a multiple of 8);
- prefills shorter than DENSE_MIN_QUERY_LEN: each dense sequence costs its own launches (~20 us of host
  time each, per layer), while the unified kernel takes all of a step's short sequences in one.

Mixed steps split: the dense sequences' rows come from SDPA, the rest (decodes, prefix chunks) from one
unified launch told to skip the dense ones (`seq_skip`), so no row is computed twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.device_copy import to_device

# From this many query tokens on, a no-prefix prefill goes dense. 1024: at 4096 the unified kernel took
# 2x flash's time (0.73 vs 0.36 ms an 8B layer), so from ~1k tokens on the attention's compute (tens of
# us) outweighs one more launch; and it bounds the extra launches to max_num_batched_tokens / 1024 (2 at
# the default 2048) per layer, which keeps small, host-bound models from paying per-sequence launches.
# To revisit on a lent GPU: bench/kernels.py's "prefill 2 x 1024" and "prefill 4 x 512" rows.
DENSE_MIN_QUERY_LEN = 1024
_DENSE_DTYPES = (torch.float16, torch.bfloat16)


def dense_capable(dtype: torch.dtype, head_dim: int, softcap: float | None) -> bool:
    """Whether this layer's attention can run dense at all (flash SDPA's limits; no logit soft-capping)."""
    return softcap is None and dtype in _DENSE_DTYPES and head_dim % 8 == 0 and head_dim <= 256


def dense_prefill_seqs(query_start_loc: Sequence[int], seq_lens: Sequence[int], window: int | None,
                       min_query_len: int = DENSE_MIN_QUERY_LEN) -> list[int]:
    """Indices of the sequences that attend densely: no cached prefix (context == query length), at least
    min_query_len queries, and no sliding window shorter than the sequence. query_start_loc [B+1],
    seq_lens [B] (context after the step), as in AttentionMetadata, on the host."""
    dense = []
    for i, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        if q_len >= min_query_len and seq_len == q_len and (window is None or window >= q_len):
            dense.append(i)
    return dense


@dataclass(frozen=True)
class PrefillRoute:
    """One step's split for one window: built once per step, used by every layer with that window."""

    dense_rows: tuple[tuple[int, int], ...]  # [start, end) token rows of each dense sequence
    # [B] int32 on the device, 1 = a dense sequence the unified kernel skips; None: nothing is left for
    # the unified kernel (every sequence with queries is dense), so it is not launched
    seq_skip: torch.Tensor | None


def plan_route(meta: AttentionMetadata, window: int | None, dtype: torch.dtype, head_dim: int,
               softcap: float | None, min_query_len: int = DENSE_MIN_QUERY_LEN) -> PrefillRoute | None:
    """The route of this step, or None when every sequence stays in the paged kernels. Reads only host
    facts (max_query_len and the host lists query_start_loc_host / seq_lens_host the runner built the
    step from), never a device tensor: a read-back here would wait for the step still running and stall
    async scheduling (engine/async_step.py). seq_skip goes up by a pinned, non-blocking copy."""
    if meta.max_query_len < min_query_len or not dense_capable(dtype, head_dim, softcap):
        return None
    qsl, seq_lens = meta.query_start_loc_host, meta.seq_lens_host
    if qsl is None or seq_lens is None:
        raise ValueError("plan_route needs the step's host lists (AttentionMetadata.query_start_loc_host and "
                         "seq_lens_host; ModelRunner.prepare fills them)")
    dense = dense_prefill_seqs(qsl, seq_lens, window, min_query_len)
    if not dense:
        return None
    skip = [0] * len(seq_lens)
    for i in dense:
        skip[i] = 1
    rest = any(qsl[i + 1] > qsl[i] and not skip[i] for i in range(len(seq_lens)))
    seq_skip = to_device(torch.tensor(skip, dtype=torch.int32), meta.seq_lens.device) if rest else None
    return PrefillRoute(tuple((qsl[i], qsl[i + 1]) for i in dense), seq_skip)


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's causal attention over its own keys: q [L, Hq, D], k/v [L, Hkv, D] (any row stride,
    head_dim contiguous) -> [L, Hq, D], a view of SDPA's output (contiguous when flash wrote it)."""
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, L, D] views, no copies
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])  # [1, Hq, L, D]
    return out.squeeze(0).transpose(0, 1)
