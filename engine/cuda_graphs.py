"""CUDA graphs for pure-decode steps: one graph per batch-size bucket (1, 2, 4, 8, 16, 32, ...).

A decode step of n sequences replays the graph of the smallest bucket >= n. The graph reads static
input tensors that `run` fills: input_ids / positions / slot_mapping [B], query_start_loc [B+1],
seq_lens [B], block_tables [B, max_blocks]. Rows past n are padding sequences of query length 0
(slot -1, seq_len 0), which the Triton kernels skip. The decode kernel's work split depends only on
the batch shape, never on context lengths, so one capture stays right for every replay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.scheduler_output import SchedulerOutput

if TYPE_CHECKING:
    from gearshift.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        dev = runner.device
        self.max_bs = runner.config.max_num_seqs
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        b = self.max_bs
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.buckets = batch_buckets(self.max_bs)
        self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            max_query_len=1, max_seq_len=self.max_blocks * self.runner.block_size,
        )

    def _forward(self, b: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.input_ids[:b], self.positions[:b], self._meta(b), self.runner.kv_caches)
        return model.compute_logits(hidden)  # every decode row samples: [b, vocab] float32

    def _capture(self) -> None:
        # Capture with one real-looking sequence (length 1, block 0, slot 0) and padding elsewhere.
        self.query_start_loc.copy_(torch.ones_like(self.query_start_loc))
        self.query_start_loc[0] = 0
        self.seq_lens[0] = 1
        self.slot_mapping[0] = 0
        pool = None
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            self._forward(b)  # warm up: Triton compiles outside the capture
            torch.cuda.synchronize(self.runner.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[b] = self._forward(b)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.runner.device)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, out: SchedulerOutput) -> bool:
        return (
            len(out.seqs) <= self.max_bs
            and all(len(s.token_ids) == 1 and s.sample for s in out.seqs)
            and all(len(s.block_table) <= self.max_blocks for s in out.seqs)
        )

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        n = len(out.seqs)
        b = next(x for x in self.buckets if x >= n)
        bs = self.runner.block_size
        ids = [s.token_ids[0] for s in out.seqs]
        pos = [s.start_pos for s in out.seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(out.seqs, pos, strict=True)]
        tables = torch.zeros(n, self.max_blocks, dtype=torch.int32)
        for i, s in enumerate(out.seqs):
            tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        pad = b - n
        # One host->device copy per static tensor; padding rows: query length 0, slot -1, seq_len 0.
        self.input_ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        qsl = list(range(n + 1)) + [n] * pad
        self.query_start_loc[: b + 1].copy_(torch.tensor(qsl, dtype=torch.int32), non_blocking=True)
        self.seq_lens[:b].copy_(torch.tensor([p + 1 for p in pos] + [0] * pad, dtype=torch.int32),
                                non_blocking=True)
        self.block_tables[:n].copy_(tables, non_blocking=True)
        self.block_tables[n:b].zero_()
        self.graphs[b].replay()
        return self.logits[b][:n].clone()
