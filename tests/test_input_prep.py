"""The runner's vectorised pure-decode input preparation gives exactly what the general path gives."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from gearshift.engine.model_runner import ModelRunner
from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput


def bare_runner(block_size: int) -> ModelRunner:
    """prepare() reads only the block size and the device: no model is needed to test it."""
    runner = object.__new__(ModelRunner)
    runner.block_size, runner.device = block_size, torch.device("cpu")
    return runner


@pytest.mark.parametrize("seed", range(6))
def test_decode_fast_path_equals_the_general_path(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    runner = bare_runner(bs)
    free = list(range(20_000))
    rng.shuffle(free)
    seqs = []
    for i in range(rng.randint(1, 40)):
        start = rng.randint(0, 300)  # the position of the one token this step
        table = [free.pop() for _ in range(-(-(start + 1) // bs))]  # covers [0, start + 1) exactly
        seqs.append(ScheduledSeq(i, [rng.randrange(50_000)], start, table, True))
    out = SchedulerOutput(seqs=seqs, num_decodes=len(seqs))
    fast = runner.prepare(out)
    general = runner.prepare(dataclasses.replace(out, num_decodes=0))  # the per-sequence loop
    assert fast[3] is None and general[3] is None  # every row samples
    for a, b in zip(fast[:2], general[:2], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for f in dataclasses.fields(fast[2]):
        a, b = getattr(fast[2], f.name), getattr(general[2], f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def test_a_table_longer_than_the_context_takes_the_general_path() -> None:
    runner = bare_runner(4)
    out = SchedulerOutput(seqs=[ScheduledSeq(0, [5], 2, [7, 8, 9], True), ScheduledSeq(1, [6], 5, [3, 4], True)],
                          num_decodes=2)
    ids, pos, meta, rows = runner.prepare(out)
    assert meta.block_tables.tolist() == [[7, 8], [3, 4]]  # cut to this step's two blocks
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 4 * 4 + 1]


@pytest.mark.parametrize("num_decodes", [0, 2, 3])
def test_host_lists_hold_what_the_device_tensors_hold(num_decodes: int) -> None:
    """query_start_loc_host / seq_lens_host (what host decisions such as the prefill route read instead of
    the device tensors) are the device tensors' values, on the general path and the pure-decode one."""
    runner = bare_runner(4)
    decodes = [ScheduledSeq(0, [5], 2, [7], True), ScheduledSeq(1, [6], 9, [3, 4, 5], True),
               ScheduledSeq(2, [8], 0, [1], True)]
    prefills = [ScheduledSeq(3, [1, 2, 3, 4, 5], 3, [9, 10], True), ScheduledSeq(4, [7] * 6, 0, [11, 12], False)]
    seqs = decodes[:num_decodes] + (prefills if num_decodes < 3 else [])
    meta = runner.prepare(SchedulerOutput(seqs=seqs, num_decodes=num_decodes))[2]
    assert meta.query_start_loc_host == meta.query_start_loc.tolist()
    assert meta.seq_lens_host == meta.seq_lens.tolist()
    assert all(type(x) is int for x in meta.query_start_loc_host + meta.seq_lens_host)  # plain ints, no numpy
