"""cpu_malloc.keep_large_buffers: a freed step-sized buffer stays in the heap instead of being unmapped."""

from __future__ import annotations

import sys

import pytest
import torch
from gearshift.engine.cpu_malloc import keep_large_buffers


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_logits_sized_buffer_is_kept_not_unmapped() -> None:
    size = 48 << 20  # over glibc's largest mmap threshold (32 MiB): without the setting it is munmapped on free
    assert keep_large_buffers(4 * size)
    alive, freed = [], []
    for _ in range(6):  # six steps, each with a logits-sized buffer written and dropped
        logits = torch.ones(size // 4)
        alive.append(_rss_bytes())
        del logits
        freed.append(_rss_bytes())
    # Kept, not unmapped (the munmap cost ~4 ms a step at 256 x 49k fp32). How much stays depends on what
    # else the heap holds between steps: bench/host_overhead.py prints the peak RSS both ways.
    assert all(a - f < size // 4 for a, f in zip(alive, freed, strict=True))
