"""The one configuration dataclass for a model server, shared by the CLI, both engines and the server."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Literal

from gearshift.engine.errors import GearshiftError

EngineName = Literal["paged", "gguf"]
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(value: str | int | None) -> int | None:
    """'4Gi', '512MiB', '2G', '1048576' -> bytes (Kubernetes quantity style, B suffix optional)."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(value))
    if not m:
        raise GearshiftError(f"cannot read {value!r} as a size: use e.g. 512Mi, 4Gi, 2G")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass
class EngineConfig:
    model: str  # a .gguf file, a Hugging Face model directory, or a URI the fetcher resolved
    engine: EngineName = "paged"
    served_model_name: str | None = None  # default: the model file or directory's stem
    # Model / engine
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # default: the model's context, capped by kv cache
    max_num_seqs: int = 64  # sequences decoded together
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: a share of free memory
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    threads: int | None = None  # CPU threads; None: the CPUs this process may really use
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs / torch.compile
    # Server
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int = 256  # requests queued beyond this get 429
    request_timeout: float = 600.0  # seconds a request may live end to end
    drain_timeout: float = 30.0  # SIGTERM grace for in-flight requests

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.engine not in ("paged", "gguf"):
            raise GearshiftError(f"engine must be 'paged' or 'gguf', got {self.engine!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise GearshiftError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise GearshiftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise GearshiftError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.served_model_name is None:
            base = os.path.basename(self.model.rstrip("/"))
            self.served_model_name = base[:-5] if base.endswith(".gguf") else base

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def usable_cpus() -> int:
    """CPUs this process may really use: affinity, then the cgroup v2/v1 quota, never the host count."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.999)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2: "max 100000" or "200000 100000"
            q, p = f.read().split()
            return None if q == "max" else int(q) / int(p)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        return None if q <= 0 else q / p
    except (OSError, ValueError):
        return None
