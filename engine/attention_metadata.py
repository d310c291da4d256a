"""What the attention layers need for one step, built once per step by the model runner.

Shapes: T = tokens scheduled this step (all sequences, flat varlen), B = sequences in the step.
KV cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
A slot is block_id * block_size + offset.
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

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
