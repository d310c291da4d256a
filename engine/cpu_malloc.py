"""glibc malloc settings for the paged engine on CPU: large step buffers reused from the heap, not mmapped.

glibc serves any allocation over its mmap threshold (at most 32 MiB, however it is set) with a fresh mmap
and returns it with munmap on free. A step's logits are [batch, vocab] fp32: 50 MiB at batch 256 with a 49k
vocabulary, so every step paid page faults to zero 12.8k fresh pages in the forward and ~4 ms of munmap when
the logits were dropped (bench/host_overhead.py, 2-core AMD EPYC). With mmap off for malloc and the heap
trimmed only above `trim_bytes`, the freed buffer is handed back to the next step as it is.

Cost: up to `trim_bytes` of freed heap stays resident after a burst instead of going back to the OS. It is
applied once the weights are loaded, so load-time temporaries are released as before (RSS after load is
unchanged). The KV cache is mapped by the runner itself and is not affected.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_MAX = -4


def keep_large_buffers(trim_bytes: int) -> bool:
    """Make malloc reuse large freed buffers (see the module doc). False where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = min(max(trim_bytes, 64 << 20), (1 << 31) - 1)  # an int; at least 64 MiB
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
    log.debug("malloc: mmap off, trim threshold %d MiB (%s)", trim >> 20, "set" if ok else "refused")
    return ok


def release_free_heap() -> int:
    """Give freed heap pages back to the OS now (glibc malloc_trim); returns 1 if some were. A load that
    makes many mid-sized temporaries (--quantization int4 repacks 120 matrices) leaves ~270 MiB of freed
    but resident heap on SmolLM2 otherwise: glibc's mmap threshold rises after the first large free, so
    later temporaries come from the heap, and the heap shrinks only from its top."""
    try:
        return int(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return 0
