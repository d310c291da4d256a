"""engine/host_gc.py: the generation-0 threshold is raised to fit a step's allocations, never lowered."""

from __future__ import annotations

import gc

import pytest
from gearshift.engine.host_gc import OBJECTS_PER_ROW, fit_gc_to_batch


@pytest.mark.parametrize(("before", "max_num_seqs", "after"), [
    (700, 256, OBJECTS_PER_ROW * 256),  # the default threshold, a big batch: raised
    (700, 16, 700),  # a small batch fits under the default: unchanged
    (100_000, 256, 100_000),  # the process set a higher one: kept
    (0, 256, 0),  # the process disabled automatic collection: left disabled
])
def test_threshold(before: int, max_num_seqs: int, after: int) -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(before, 11, 12)
        assert fit_gc_to_batch(max_num_seqs) == after
        assert gc.get_threshold() == (after, 11, 12)  # older generations untouched
    finally:
        gc.set_threshold(*saved)
