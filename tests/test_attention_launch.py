"""The attention kernels' launch plans (plan_unified, plan_decode): pure functions of the shapes, table
tests here; the kernels they launch are checked against a torch reference in test_kernels.py."""

from __future__ import annotations

import math
import os
import random
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as test_kernels.py: before triton's first import
pytest.importorskip("triton")

from gearshift.engine.kernels.decode_attention import DecodeLaunch, plan_decode  # noqa: E402
from gearshift.engine.kernels.unified_attention import UnifiedLaunch, plan_unified  # noqa: E402

UNIFIED = [
    # (T, Hq, Hkv, D, B, max_query_len) -> plan
    ((8, 8, 2, 64, 8, 1), UnifiedLaunch((2 + 8, 2), 4, 4, 16, 32, 64)),  # decodes: short q blocks
    ((300, 8, 2, 64, 2, 200), UnifiedLaunch((18 + 2, 2), 4, 16, 64, 32, 64)),  # prefill: tall ones
    ((4, 32, 1, 128, 4, 1), UnifiedLaunch((2 + 4, 1), 32, 2, 64, 32, 128)),  # G=32 decodes fill 64 rows
    ((5, 12, 4, 80, 5, 1), UnifiedLaunch((1 + 5, 4), 3, 5, 16, 32, 128)),  # G=3: 5 tokens in 16 rows
    ((64, 256, 2, 256, 1, 64), UnifiedLaunch((64 + 1, 2), 128, 1, 128, 16, 256)),  # G=128, wide heads
    ((3, 4, 4, 8, 3, 1), UnifiedLaunch((0 + 3, 4), 1, 16, 16, 32, 16)),  # MHA, tiny heads padded to 16
]


@pytest.mark.parametrize(("shape", "plan"), UNIFIED)
def test_unified_plan_table(shape: tuple[int, ...], plan: UnifiedLaunch) -> None:
    assert plan_unified(*shape) == plan


def test_unified_grid_covers_every_q_block() -> None:
    """Sequence s owns q blocks from query_start_loc[s] // BLOCK_Q + s on (the kernel's _find_seq): the
    grid reaches the last block of every sequence, whatever the mix of query lengths."""
    rng = random.Random(0)
    for _ in range(500):
        q_lens = [rng.choice([0, 1, 1, 2, rng.randint(1, 300)]) for _ in range(rng.randint(1, 9))]
        hkv = rng.choice([1, 2, 4, 8])
        plan = plan_unified(sum(q_lens), hkv * rng.choice([1, 2, 3, 4, 7, 8, 16]), hkv, 64, len(q_lens),
                            max(q_lens))
        assert plan.block_q * plan.group <= plan.block_m and plan.block_m & (plan.block_m - 1) == 0
        start = 0
        for s, q_len in enumerate(q_lens):
            assert start // plan.block_q + s + math.ceil(q_len / plan.block_q) <= plan.grid[0], (q_lens, plan)
            start += q_len


DECODE = [
    # (B, Hq, Hkv, D, NUM_SPLITS) -> plan
    ((8, 8, 2, 64, 16), DecodeLaunch((8, 2, 16), (8, 8), 4, 16, 64, 1)),
    ((3, 32, 1, 128, 4), DecodeLaunch((3, 1, 4), (3, 32), 32, 32, 128, 2)),  # G=32 rows
    ((2, 12, 4, 80, 8), DecodeLaunch((2, 4, 8), (2, 12), 3, 16, 128, 2)),  # D=80 padded to 128
    ((1, 4, 4, 8, 1), DecodeLaunch((1, 4, 1), (1, 4), 1, 16, 16, 1)),
]


@pytest.mark.parametrize(("shape", "plan"), DECODE)
def test_decode_plan_table(shape: tuple[int, ...], plan: DecodeLaunch) -> None:
    assert plan_decode(*shape) == plan
