"""The CUDA-graph runners' input staging, on CPU: a prepared decode step of n sequences (or a mixed prefill +
decode step), copied into the static buffers of its bucket, gives the same logits as the eager step, and
the padding rows are what the Triton kernels skip (query length 0, slot -1, seq_len 0). Capture and replay need a GPU
(tests/test_gpu_engine.py); the CPU attention path does not take padding rows, so the real rows run here."""

from __future__ import annotations

import pytest
import torch
from gearshift.engine.config import EngineConfig
from gearshift.engine.cuda_graphs import (
    DecodeGraphs,
    MixedGraphs,
    batch_buckets,
    mixed_bucket,
    mixed_token_buckets,
)
from gearshift.engine.model_runner import ModelRunner
from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

BLOCK = 16


@pytest.fixture(scope="module")
def runner(smollm2_gguf) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32", max_model_len=256,
                                    kv_cache_memory="16Mi", block_size=BLOCK, max_num_seqs=8))


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(1) == [1]


def test_staged_decode_step_matches_the_eager_step(runner: ModelRunner) -> None:
    # Three sequences with contexts of 5, 20 and 40 tokens: prefill them, then one decode step each.
    lens = [5, 20, 40]
    seqs, next_block = [], 0
    for i, n in enumerate(lens):
        blocks = list(range(next_block, next_block + n // BLOCK + 1))
        next_block += len(blocks)
        seqs.append((i, blocks))
        runner.execute(SchedulerOutput(seqs=[ScheduledSeq(i, list(range(1, n + 1)), 0, blocks, True)]))
    decode = SchedulerOutput(seqs=[ScheduledSeq(i, [7 + i], n, blocks, True)
                                   for (i, blocks), n in zip(seqs, lens, strict=True)])
    input_ids, positions, meta, rows = runner.prepare(decode)
    assert rows is None or rows.shape[0] == 3

    graphs = DecodeGraphs(lambda ids, pos, m: runner.model.compute_logits(runner.model(ids, pos, m, runner.kv_caches)),
                          runner.device, max_num_seqs=8, max_blocks=-(-runner.max_model_len // BLOCK),
                          block_size=BLOCK)
    assert graphs.can_run(input_ids, meta, sampled_rows=3)
    assert not graphs.can_run(input_ids, meta, sampled_rows=2)  # a row that does not sample: eager
    b = graphs.stage(input_ids, positions, meta)
    assert b == 4
    assert graphs.slot_mapping[3] == -1 and graphs.seq_lens[3] == 0 and graphs.query_start_loc[4] == 3
    assert not graphs.block_tables[3].any() and not graphs.block_tables[:3, meta.block_tables.shape[1]:].any()
    staged = graphs._forward(3)  # the graph's inputs for the real rows (the K/V writes repeat the same values)
    eager = runner.execute(decode)
    torch.testing.assert_close(staged, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("tokens", "seqs", "bucket"), [
    (1, 1, (32, 1)), (32, 3, (32, 4)), (33, 3, (64, 4)), (200, 17, (256, 32)), (512, 64, (512, 64)),
    (513, 2, None),  # more tokens than the largest bucket: eager
    (100, 65, None),  # more sequences than max_num_seqs' buckets hold: eager
])
def test_mixed_step_buckets(tokens: int, seqs: int, bucket: tuple[int, int] | None) -> None:
    assert mixed_bucket(tokens, seqs, [32, 64, 128, 256, 512], batch_buckets(64)) == bucket


def test_mixed_token_buckets_stop_at_the_step_budget_and_below_dense_prefills() -> None:
    assert mixed_token_buckets(2048, 1024) == [32, 64, 128, 256, 512]
    assert mixed_token_buckets(100, 1024) == [32, 64]
    assert mixed_token_buckets(2048, 256) == [32, 64, 128]  # a 256-token fresh prompt would go dense
    assert mixed_token_buckets(16, 1024) == []


def test_staged_mixed_step_matches_the_eager_step(runner: ModelRunner) -> None:
    # A decode (context 20), a 9-token chunk over a 12-token cached prefix, a fresh 4-token prompt.
    runner.execute(SchedulerOutput(seqs=[ScheduledSeq(0, list(range(1, 20)), 0, [10, 11], True),
                                         ScheduledSeq(1, list(range(3, 15)), 0, [12, 13], True)]))
    mixed = SchedulerOutput(seqs=[ScheduledSeq(0, [9], 19, [10, 11], True),
                                  ScheduledSeq(1, list(range(30, 39)), 12, [12, 13], True),
                                  ScheduledSeq(2, [5, 6, 7, 8], 0, [14], True)])
    input_ids, positions, meta, rows = runner.prepare(mixed)
    assert rows is not None and rows.tolist() == [0, 9, 13]

    def forward(ids: torch.Tensor, pos: torch.Tensor, m, sample: torch.Tensor) -> torch.Tensor:
        return runner.model.compute_logits(runner.model(ids, pos, m, runner.kv_caches).index_select(0, sample))

    graphs = MixedGraphs(forward, runner.device, [16, 32], batch_buckets(8),
                         max_blocks=-(-runner.max_model_len // BLOCK), block_size=BLOCK)
    assert graphs.bucket_for(input_ids, meta, rows) == (16, 4)
    assert not graphs.can_run(input_ids, meta, rows)  # nothing captured (capture needs CUDA): eager
    decode = runner.prepare(SchedulerOutput(seqs=[ScheduledSeq(0, [9], 19, [10, 11], True)]))
    assert graphs.bucket_for(decode[0], decode[2], decode[3]) is None  # pure decode: DecodeGraphs' step
    assert graphs.stage(input_ids, positions, meta, rows) == (16, 4)
    assert graphs.slot_mapping[14:16].tolist() == [-1, -1] and graphs.input_ids[14:16].tolist() == [0, 0]
    assert graphs.query_start_loc[:5].tolist() == [0, 1, 10, 14, 14] and graphs.seq_lens[3] == 0
    assert graphs.sample_rows[:4].tolist() == [0, 9, 13, 0] and not graphs.block_tables[3].any()
    staged = graphs._forward(14, 3)  # the graph's inputs for the real rows (the K/V writes repeat the same values)
    eager = runner.execute(mixed)
    torch.testing.assert_close(staged, eager, rtol=1e-4, atol=1e-4)
