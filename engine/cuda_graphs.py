"""CUDA graphs for pure-decode steps: one graph per batch-size bucket (1, 2, 4, 8, 16, 32, ...); and for
mixed prefill + decode steps of few tokens, one per (token bucket, sequence bucket): MixedGraphs below.

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


class StaticStep:
    """The static buffers a captured step reads, for up to `tokens` tokens of up to `seqs` sequences, and
    the copy of a prepared step into them, padded to a bucket (the same for decode and mixed graphs)."""

    def __init__(self, device: torch.device, tokens: int, seqs: int, max_blocks: int) -> None:
        dev = device
        self.input_ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.zeros(seqs + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(seqs, max_blocks, dtype=torch.int32, device=dev)

    def stage_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   t: int, s: int) -> None:
        """Copy a prepared step (device to device) into the buffers, padded to t tokens of s sequences:
        tokens past the step's have slot -1 (never written), sequences past its have query length 0,
        seq_len 0 and an all-zero block table (the Triton kernels skip them)."""
        n, b = input_ids.shape[0], meta.num_seqs
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:t].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:t].zero_()
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:t].fill_(-1)
        self.query_start_loc[: b + 1].copy_(meta.query_start_loc)
        self.query_start_loc[b + 1 : s + 1].fill_(n)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.seq_lens[b:s].zero_()
        self.block_tables[:b, :width].copy_(meta.block_tables)
        self.block_tables[:b, width:].zero_()
        self.block_tables[b:s].zero_()


class DecodeGraphs(StaticStep):
    def __init__(self, forward: Forward, device: torch.device, max_num_seqs: int, max_blocks: int,
                 block_size: int) -> None:
        super().__init__(device, max_num_seqs, max_num_seqs, max_blocks)
        self.forward = forward
        self.device = device
        self.max_bs = b = max_num_seqs
        self.max_blocks = max_blocks
        self.block_size = block_size
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
        b = next(x for x in self.buckets if x >= meta.num_seqs)
        self.stage_step(input_ids, positions, meta, b, b)
        return b

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] of a prepared pure-decode step (`can_run` said yes)."""
        b = self.stage(input_ids, positions, meta)
        self.graphs[b].replay()
        return self.logits[b][: meta.num_seqs].clone()


# ---- mixed prefill + decode steps -----------------------------------------------------------------------
# A mixed step's forward is ~30-35 launches a decoder layer (norms, projections, RoPE, the K/V store, the
# unified attention kernel, the MLP), ~1,000-1,100 for 30-32 layers: 5-10 ms of host launch time, which
# exceeds the GPU's own time while the step's tokens are few (an 8B layer stack at ~250 tokens; a 135M
# model at any size up to the step budget). Whole-step graphs need every shape fixed, so a step is padded
# to a token bucket and a sequence bucket. Steps with a long fresh prompt (>= DENSE_MIN_QUERY_LEN new
# tokens) go dense by flash SDPA, a per-step route a graph cannot hold: they stay eager, and the token
# buckets stop below that length.
MIXED_TOKEN_BUCKETS = (32, 64, 128, 256, 512)


def mixed_token_buckets(max_num_batched_tokens: int, dense_min_query_len: int) -> list[int]:
    """The token buckets mixed-step graphs are captured for: each of MIXED_TOKEN_BUCKETS that a step can
    reach (<= the step budget) and that no dense prefill fits in (< dense_min_query_len)."""
    return [t for t in MIXED_TOKEN_BUCKETS if t <= max_num_batched_tokens and t < dense_min_query_len]


def mixed_bucket(num_tokens: int, num_seqs: int, token_buckets: list[int],
                 seq_buckets: list[int]) -> tuple[int, int] | None:
    """(tokens, sequences) a mixed step is padded to: the smallest bucket of each that holds it; None when
    either is past the largest (the step runs eager)."""
    t = next((b for b in token_buckets if b >= num_tokens), None)
    s = next((b for b in seq_buckets if b >= num_seqs), None)
    return None if t is None or s is None else (t, s)


# input_ids [T], positions [T], metadata of S sequences, rows to sample [S] -> float32 logits [S, vocab]
MixedForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor], torch.Tensor]


class MixedGraphs(StaticStep):
    """One graph per (token bucket, sequence bucket) for steps that are not pure decode. Padding: tokens
    past the step's belong to no sequence (slot -1: never written; no program attends for them), sequences
    past the step's have query length 0, and sampled rows past the step's read row 0 (their logits are
    dropped). The unified kernel's q-block height is fixed by the captured max_query_len (the bucket); any
    real step's query lengths run right under it."""

    def __init__(self, forward: MixedForward, device: torch.device, token_buckets: list[int],
                 seq_buckets: list[int], max_blocks: int, block_size: int) -> None:
        t, s = token_buckets[-1], seq_buckets[-1]
        super().__init__(device, t, s, max_blocks)
        self.forward = forward
        self.device = device
        self.token_buckets, self.seq_buckets = token_buckets, seq_buckets
        self.max_blocks, self.block_size = max_blocks, block_size
        self.sample_rows = torch.zeros(s, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.replays = 0  # steps served by a graph (tests and logs read it)

    def _forward(self, t: int, s: int) -> torch.Tensor:
        # No host lists (query_start_loc_host, seq_lens_host): a captured step never routes (max_query_len
        # t < DENSE_MIN_QUERY_LEN, so plan_route returns before it would need them); replays change the
        # buffers' values, which host lists fixed at capture would not follow.
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:t], query_start_loc=self.query_start_loc[: s + 1],
            seq_lens=self.seq_lens[:s], block_tables=self.block_tables[:s],
            max_query_len=t, max_seq_len=self.max_blocks * self.block_size,
        )
        return self.forward(self.input_ids[:t], self.positions[:t], meta, self.sample_rows[:s])  # [s, vocab]

    def capture(self) -> None:
        # Captured with every sequence empty (query length 0, no context) and every slot -1: nothing written.
        self.query_start_loc.zero_()
        self.seq_lens.zero_()
        self.slot_mapping.fill_(-1)
        pool = None
        shapes = [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]
        for t, s in sorted(shapes, reverse=True):  # largest first: smaller graphs reuse its memory pool
            self._forward(t, s)  # warm up outside the capture
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[(t, s)] = self._forward(t, s)
            pool = g.pool()
            self.graphs[(t, s)] = g
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for mixed steps (tokens, sequences) %s", sorted(self.graphs))

    def bucket_for(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                   sample_rows: torch.Tensor | None) -> tuple[int, int] | None:
        """The (tokens, sequences) bucket of a step with prefill tokens that fits the buffers (so no dense
        prefill: see above); None for pure-decode steps (DecodeGraphs) and steps that do not fit."""
        if meta.is_pure_decode or sample_rows is None or meta.block_tables.shape[1] > self.max_blocks:
            return None
        return mixed_bucket(input_ids.shape[0], meta.num_seqs, self.token_buckets, self.seq_buckets)

    def can_run(self, input_ids: torch.Tensor, meta: AttentionMetadata, sample_rows: torch.Tensor | None) -> bool:
        return self.bucket_for(input_ids, meta, sample_rows) in self.graphs

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              sample_rows: torch.Tensor) -> tuple[int, int]:
        """Copy a prepared step into the static buffers (device to device) and pad it to its bucket.
        sample_rows [N <= sequences]: the token rows that sample. Returns the bucket (tokens, sequences)."""
        n, b = input_ids.shape[0], meta.num_seqs
        shape = self.bucket_for(input_ids, meta, sample_rows)
        if shape is None:
            raise ValueError(f"a step of {n} tokens, {b} sequences fits no mixed-step bucket")
        t, s = shape
        self.stage_step(input_ids, positions, meta, t, s)
        self.sample_rows[: sample_rows.shape[0]].copy_(sample_rows)
        self.sample_rows[sample_rows.shape[0] : s].zero_()
        return t, s

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            sample_rows: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of the sampled rows of a prepared mixed step (`can_run` said yes)."""
        shape = self.stage(input_ids, positions, meta, sample_rows)
        self.graphs[shape].replay()
        self.replays += 1
        return self.logits[shape][: sample_rows.shape[0]].clone()
