"""Triton kernels for the paged engine's GPU path: KV-cache write and paged attention.

Importing this package needs neither triton nor a GPU; the kernel modules load on first call
(compiled for CUDA tensors, interpreted for CPU tensors).

- store_kvcache(key, value, k_cache, v_cache, slot_mapping)       write K/V rows; slot -1 = skip
- paged_attention(q, k_cache, v_cache, meta, scale) -> out       any step (decode, prefill, mixed)
- attention_step(q, k, v, k_cache, v_cache, meta, scale, route)  the engine's layer step: store + attend,
  long no-prefix prefills by dense SDPA (plan_route says which; prefill_route.py says why)
"""

from __future__ import annotations

from gearshift.engine.kernels.loader import triton_available
from gearshift.engine.kernels.paged_attention import attention_step, paged_attention, store_kvcache
from gearshift.engine.kernels.prefill_route import PrefillRoute, plan_route

__all__ = ["PrefillRoute", "attention_step", "paged_attention", "plan_route", "store_kvcache", "triton_available"]
