"""Host-built step inputs onto the device without waiting for the stream (the runner's input prep and the
prefill route's seq_skip both use it)."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A step's host-built input onto the device without waiting for the stream: async scheduling
    launches a step while the one before still runs, and a blocking copy (or a non-blocking one from
    pageable memory, which CUDA may stage synchronously) would wait for it. Pinned, then non-blocking; the
    pinned buffer is held until the copy is done (torch's caching host allocator). On a CUDA-less device
    (cpu: `t` itself; meta: shape only) a plain `.to`."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)
