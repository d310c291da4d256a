"""Triton kernels for the paged engine's GPU path: KV-cache write and paged attention.

Importing this package needs neither triton nor a GPU; the kernel modules load on first call
(compiled for CUDA tensors, interpreted for CPU tensors).

- store_kvcache(key, value, k_cache, v_cache, slot_mapping)       write K/V rows; slot -1 = skip
- paged_attention(q, k_cache, v_cache, meta, scale) -> out       any step (decode, prefill, mixed)
"""

from __future__ import annotations

from gearshift.engine.kernels.loader import triton_available
from gearshift.engine.kernels.paged_attention import paged_attention, store_kvcache

__all__ = ["paged_attention", "store_kvcache", "triton_available"]
