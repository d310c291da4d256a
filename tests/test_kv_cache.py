"""The paged KV cache's plan (engine/kv_cache.py): blocks a budget holds, the context length that leaves,
the errors that name a budget too small; and the tensor's per-layer views. The lazily resident pages are
tested in test_llm_engine.py (test_kv_cache_pages_are_zero_and_resident_only_once_written)."""

from __future__ import annotations

import pytest
import torch
from gearshift.engine.errors import GearshiftError
from gearshift.engine.kv_cache import KVCachePlan, allocate_kv_cache, block_bytes, plan_kv_cache
from gearshift.engine.model.config import ModelConfig

PLANS = [
    # (budget, per_block, block_size, requested max_model_len, wanted_len) -> plan
    ((10_000, 1_000, 16, None, 4096), KVCachePlan(10, 160)),  # the cache cuts the model's context
    ((10_999, 1_000, 16, None, 4096), KVCachePlan(10, 160)),  # a part block is not a block
    ((1 << 30, 1_000, 16, None, 4096), KVCachePlan(1_073_741, 4096)),  # the model's context fits
    ((10_000, 1_000, 16, 160, 160), KVCachePlan(10, 160)),  # a requested length that just fits
    ((2_000, 1_000, 32, None, 8192), KVCachePlan(2, 64)),  # the smallest cache
]


@pytest.mark.parametrize(("args", "plan"), PLANS)
def test_plan_table(args: tuple[int | None, ...], plan: KVCachePlan) -> None:
    assert plan_kv_cache(*args) == plan


@pytest.mark.parametrize(("args", "message"), [
    ((1_999, 1_000, 16, None, 4096), "kv_cache_memory 1999 bytes holds fewer than 2 blocks of 1000 bytes"),
    ((10_000, 1_000, 16, 161, 161), "max_model_len 161 needs 10062 bytes of KV cache; kv_cache_memory allows 160 tokens"),
])
def test_a_budget_too_small_is_named(args: tuple[int | None, ...], message: str) -> None:
    with pytest.raises(GearshiftError, match=message):
        plan_kv_cache(*args)


def test_layers_view_one_zeroed_tensor() -> None:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4)
    assert block_bytes(cfg, 16, torch.bfloat16) == 2 * 3 * 16 * 2 * 4 * 2  # K and V, 3 layers, 2 bytes each
    cache, layers = allocate_kv_cache(cfg, 5, 16, torch.float32, torch.device("cpu"))
    assert cache.shape == (3, 2, 5, 16, 2, 4) and len(layers) == 3 and not bool(cache.any())
    layers[2][1][4, 15, 1, 3] = 7.0  # layer 2's v, last slot of block 4
    assert cache[2, 1, 4, 15, 1, 3] == 7.0 and cache.sum() == 7.0
