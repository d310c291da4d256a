"""Which device and dtypes a paged-engine runner uses: the activations' dtype for `dtype: auto`, the KV
cache's, and whether this CPU has native bf16. Pure choices, plus one read of /proc/cpuinfo at the edge
(cpu_has_fast_bf16); the runner (model_runner.py) applies them.
"""

from __future__ import annotations

import os
from typing import get_args

import torch
from gearshift.engine.config import DType
from gearshift.engine.errors import GearshiftError

_DTYPES = {name: getattr(torch, name) for name in get_args(DType) if name != "auto"}  # "float32" -> torch.float32


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below its native-bf16 level: under one, oneDNN emulates bf16 matmuls
# whatever the CPU has, so the engine takes an AVX2-only CPU's choices (bench/avx2_paths.py runs it so).
_ONEDNN_NO_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


def native_bf16(flags: list[str], onednn_max_isa: str) -> bool:
    """Native bf16 from /proc/cpuinfo's flags, unless oneDNN is capped below it (ONEDNN_MAX_CPU_ISA)."""
    if onednn_max_isa.strip().upper() in _ONEDNN_NO_BF16:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 only with native bf16 instructions (AVX512-BF16 / AMX); AVX2 emulates them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return native_bf16(flags, os.environ.get("ONEDNN_MAX_CPU_ISA", ""))


# oneDNN ISA caps below its int8 dot-product (VNNI) levels; AVX2_VNNI(_2) needs the CPU's VEX avx_vnni itself.
_ONEDNN_NO_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def cpu_has_int8_dot(flags: list[str] | None = None, onednn_max_isa: str | None = None) -> bool:
    """int8 dot-product instructions (VNNI: avx512_vnni or avx_vnni), unless oneDNN is capped below them
    (ONEDNN_MAX_CPU_ISA); without them oneDNN's packed u8 x s8 GEMM loses to torch._int_mm at decode sizes
    (quant_int8.plain_rows_for). flags / onednn_max_isa: /proc/cpuinfo's and the environment's when None."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if onednn_max_isa is None else onednn_max_isa).strip().upper()
    if cap in _ONEDNN_NO_VNNI:
        return False
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            return False
    if cap.startswith("AVX2_VNNI"):
        return "avx_vnni" in flags
    return "avx512_vnni" in flags or "avx_vnni" in flags


def kv_cache_dtype(dtype: torch.dtype, quantization: str | None, device_type: str, fast_bf16: bool) -> torch.dtype:
    """The KV cache's dtype: the activations' (`dtype`), except bf16 under --quantization int8's fp32
    activations on a CPU with native bf16: its decode attention is memory-bound at many streams and bf16
    halves the K/V bytes it reads (written rounded once, widened back to fp32 as read; where bf16 is
    emulated the widening costs more than it saves, and the cache stays fp32)."""
    if quantization == "int8" and device_type == "cpu" and fast_bf16 and dtype == torch.float32:
        return torch.bfloat16
    return dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GearshiftError("device 'cuda' was requested but no CUDA GPU is visible")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
