"""CUDA graphs for pure-decode steps: one graph per batch-size bucket (1, 2, 4, 8, 16, 32, ...).

A decode step of n sequences replays the graph of the smallest bucket >= n. The model runner prepares
the step as for an eager forward (`ModelRunner.prepare`: input_ids, positions, AttentionMetadata) and
hands those tensors here; `run` copies them into the static buffers the graphs read: input_ids /
positions / slot_mapping [B], query_start_loc [B+1], seq_lens [B], block_tables [B, max_blocks]. Rows past
n are padding sequences of query length 0 (slot -1, seq_len 0), which the Triton kernels skip. The decode
kernel's work split depends only on the batch shape, never on context lengths, so one capture stays right
for every replay. This module knows nothing of the runner: it gets a forward function and the sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from gearshift.engine.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)

# input_ids [b], positions [b], metadata of b decode rows -> float32 logits [b, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, forward: Forward, device: torch.device, max_num_seqs: int, max_blocks: int,
                 block_size: int) -> None:
        self.forward = forward
        self.device = dev = device
        self.max_bs = b = max_num_seqs
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(b, max_blocks, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.buckets = batch_buckets(b)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            max_query_len=1, max_seq_len=self.max_blocks * self.block_size,
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.forward(self.input_ids[:b], self.positions[:b], self._meta(b))  # [b, vocab] float32

    def capture(self) -> None:
        # Capture with one real-looking sequence (length 1, block 0, slot 0) and padding elsewhere.
        self.query_start_loc.copy_(torch.ones_like(self.query_start_loc))
        self.query_start_loc[0] = 0
        self.seq_lens[0] = 1
        self.slot_mapping[0] = 0
        pool = None
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            self._forward(b)  # warm up: Triton compiles outside the capture
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[b] = self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, input_ids: torch.Tensor, meta: AttentionMetadata, sampled_rows: int) -> bool:
        """A pure-decode step (one new token per sequence, every one sampled) that fits the buffers."""
        n = meta.num_seqs
        return (n <= self.max_bs and input_ids.shape[0] == n and sampled_rows == n
                and meta.block_tables.shape[1] <= self.max_blocks)

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copy a prepared decode step of n rows into the static buffers (device to device) and pad them
        to the bucket: rows n..b have query length 0, slot -1, seq_len 0 and an all-zero block table.
        Returns the bucket b."""
        n = meta.num_seqs
        b = next(x for x in self.buckets if x >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:b].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:b].zero_()
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.query_start_loc[: n + 1].copy_(meta.query_start_loc)
        self.query_start_loc[n + 1: b + 1].fill_(n)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:b].zero_()
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.block_tables[:n, width:].zero_()
        self.block_tables[n:b].zero_()
        return b

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] of a prepared pure-decode step (`can_run` said yes)."""
        b = self.stage(input_ids, positions, meta)
        self.graphs[b].replay()
        return self.logits[b][: meta.num_seqs].clone()
