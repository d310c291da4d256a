"""What the attention layers need for one step, built once per step by the model runner.

Shapes: T = tokens scheduled this step (all sequences, flat varlen), B = sequences in the step.
KV cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
A slot is block_id * block_size + offset.

The step's per-sequence lengths are kept twice: as device tensors (what the kernels read) and as the host
lists they were made from (what per-step host decisions read, e.g. kernels/prefill_route.plan_route).
Reading the device copies back (`.tolist()`, `.item()`) would wait for the step still running on a GPU and
undo async scheduling's overlap (engine/async_step.py), so host code never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative new-token counts (cu_seqlens_q)
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # The same values as query_start_loc [B+1] and seq_lens [B], on the host. ModelRunner.prepare always
    # fills them; None in metadata that is never routed (CUDA-graph capture, hand-built kernel tests).
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
