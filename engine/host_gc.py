"""Python's cyclic garbage collector sized to the engine's batch.

A decode step at batch B allocates about 6 B short-lived container objects (a ScheduledSeq and its token
list per row; per request a RequestOutput, a CompletionOutput, its outputs list and its token ids), all
freed by the next step. At the default generation-0 threshold (700 net allocations) a step at batch 256
ran two or three young-generation collections, each walking the step's live outputs while they were still
cold from the forward: ~0.2 ms a step, 6-7% of the host work (bench/host_overhead.py, 2026-12-01). A
threshold above one step's allocations lets them die by reference count before any collection sees them.
The threshold is only ever raised (a process may have set its own), and only generation 0's: older
generations and reference cycles are collected as before, just a little later.
"""

from __future__ import annotations

import gc

OBJECTS_PER_ROW = 8  # allocations a decode row makes in a step (6), with headroom


def fit_gc_to_batch(max_num_seqs: int) -> int:
    """Raise the generation-0 threshold above one step's allocations at `max_num_seqs` rows; returns it."""
    gen0, gen1, gen2 = gc.get_threshold()
    wanted = OBJECTS_PER_ROW * max_num_seqs
    if gen0 and wanted > gen0:  # 0: collection disabled by the process, leave it so
        gc.set_threshold(wanted, gen1, gen2)
        return wanted
    return gen0
