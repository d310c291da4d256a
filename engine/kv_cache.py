"""The paged engine's KV cache: how many blocks a memory budget holds and the context that leaves (a pure
plan, table-tested), the default budget, and the cache tensor itself. ModelRunner owns the result.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch
from gearshift.engine.errors import GearshiftError
from gearshift.engine.model.config import ModelConfig


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose pages become resident only when first written: an anonymous mapping
    reads as zeros (the kernel's zero page) until touched, so a KV cache sized for the worst case costs
    memory only for the blocks requests really fill. torch.zeros would write (and keep) every page."""
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = elem
    for n in shape:
        nbytes *= n
    # Private, not mmap's default shared mapping: shared anonymous memory is shmem, and reading it
    # allocates pages; a private one maps the zero page on read and allocates only on write.
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def kv_budget(kv_cache_memory: int | None, device: torch.device) -> int:
    """Bytes for the cache: the configured kv_cache_memory, else 80% of the GPU's free memory, else 15% of
    the host's available memory within [256 MiB, 4 GiB]."""
    if kv_cache_memory:
        return int(kv_cache_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)  # leave room for activations and the graphs' pools
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 << 30
    return int(min(max(avail * 0.15, 256 << 20), 4 << 30))


def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """One block's K and V over every layer."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int
    max_model_len: int  # prompt + output tokens one sequence may hold


def plan_kv_cache(budget: int, per_block: int, block_size: int, requested_len: int | None,
                  wanted_len: int) -> KVCachePlan:
    """Blocks that `budget` bytes hold, and the context length: `wanted_len` (the requested max_model_len,
    else the model's) cut to the cache's capacity. A requested length the cache cannot hold is an error."""
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise GearshiftError(f"kv_cache_memory {budget} bytes holds fewer than 2 blocks of {per_block} bytes; raise it")
    capacity = num_blocks * block_size
    if requested_len is not None and requested_len > capacity:
        raise GearshiftError(
            f"max_model_len {requested_len} needs {requested_len * per_block // block_size} "
            f"bytes of KV cache; kv_cache_memory allows {capacity} tokens"
        )
    return KVCachePlan(num_blocks, min(wanted_len, capacity))


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The cache [layers, 2, blocks, block_size, Hkv, D] in one tensor, and per layer its (k, v) views.
    Zeros, not empty: the torch path gathers whole blocks and masks the unused tail, and never-written
    memory can hold NaN bit patterns, which a zero attention weight does not cancel (0 * NaN = NaN)."""
    shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    cache = lazy_zeros(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)
    return cache, [(cache[i, 0], cache[i, 1]) for i in range(cfg.num_layers)]
