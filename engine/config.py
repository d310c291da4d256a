"""EngineConfig: the one declaration of every engine and server setting.

Each field states its type (a Literal is its choice list), its default and a `setting(...)`: help text, the
engines it applies to, its spec.engineArgs key (if the operator takes it from users), bounds. From it come
`gearshift serve`'s options, the operator's engineArgs validation, the flags written into pods and the
CRD's engineArgs schema (engine/settings.py). Adding a setting: one field here, then use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Literal

from gearshift.engine.settings import setting, validate
from gearshift.engine.thread_wait import DEFAULT as DEFAULT_THREAD_WAIT
from gearshift.engine.thread_wait import ENV as THREAD_WAIT_ENV
from gearshift.engine.thread_wait import ThreadWait

EngineName = Literal["paged", "gguf"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class EngineConfig:
    model: str = setting(help="a .gguf file, a Hugging Face model directory, or a URI (hf://, https://, file://, pvc://)")
    engine: EngineName = setting(
        "paged", help="paged (continuous batching, many users) or gguf (llama.cpp, one or a few users)")
    served_model_name: str | None = setting(None, help="the model name clients send (default: file stem)")
    # Model / engine
    dtype: DType = setting("auto", engines=("paged",), key="dtype", help="weights and activations dtype")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", help="where the paged engine runs")
    max_model_len: int | None = setting(None, key="maxModelLen", minimum=1,
                                        help="context length in tokens (default: the model's, capped by the KV cache)")
    # Upper bounds: a value past them cannot work (threads: 100000 OpenMP threads crash the process;
    # max_num_seqs sizes per-step buffers and the GC threshold; max_waiting: each queued request holds one
    # of max_connections' connections, so a longer queue never forms), so say so at apply time.
    max_num_seqs: int = setting(64, key="maxNumSeqs", minimum=1, maximum=4096, help="sequences decoded together")
    max_num_batched_tokens: int = setting(2048, engines=("paged",), key="maxNumBatchedTokens", minimum=1,
                                          help="token budget of one step (prefill chunks + decodes)")
    kv_cache_memory: int | None = setting(None, engines=("paged",), key="kvCacheMemory", bytes=True,
                                          help="bytes for the KV cache, e.g. 512Mi, 4Gi (default: a share of free memory)")
    block_size: int = setting(16, engines=("paged",), key="blockSize", minimum=1, help="tokens per KV block")
    enable_prefix_caching: bool = setting(True, engines=("paged",), flag="--prefix-caching",
                                          help="reuse the KV blocks of a shared prompt prefix")
    threads: int | None = setting(None, key="threads", minimum=1, maximum=1024,
                                  help="CPU threads (default: the CPUs this process may really use)")
    thread_wait: ThreadWait = setting(
        DEFAULT_THREAD_WAIT, key="threadWait", env=THREAD_WAIT_ENV,
        help="idle CPU threads spin briefly (CPUs the pod owns) or sleep (oversubscribed nodes); "
             "an OMP_WAIT_POLICY in the environment wins")
    seed: int = setting(0, key="seed", minimum=0, help="sampling seed")
    enforce_eager: bool = setting(False, engines=("paged",), key="enforceEager", help="no CUDA graphs / torch.compile")
    async_scheduling: Literal["auto", "on", "off"] = setting(
        "auto", engines=("paged",),
        help="schedule and launch step N+1 before step N's tokens reach the host (greedy steps; others run "
             "synchronously); auto: on for CUDA, off on CPU, where the forward is synchronous and nothing "
             "overlaps; off with tensor parallelism")
    tensor_parallel_size: int = setting(
        1, engines=("paged",), minimum=1,
        help="devices one replica shards the model over (Megatron tensor parallel: one process per device, "
             "gloo on CPU, NCCL on GPUs); the operator sets it from spec.hardware.count")
    quantization: Literal["none", "int8", "int4"] = setting(
        "none", engines=("paged",), key="quantization",
        help="CPU only: int8 weights (per-channel) with int8 matmuls, fp32 activations; 2-4x fp32's speed; "
             "int4: 4-bit weights in groups of 32 (a GGUF's own Q4_0/Q4_1 blocks), bf16 activations, "
             "needs avx512_bf16")
    # Server
    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(8000, minimum=1, maximum=65535, help="port to listen on")
    api_key: str | None = setting(None, env="GEARSHIFT_API_KEY", help="require `Authorization: Bearer KEY`")
    max_waiting: int = setting(256, key="maxWaiting", minimum=1, maximum=1024,
                               help="queued requests beyond this get 429 (at most max_connections' default)")
    request_timeout: float = setting(600.0, positive=True, help="seconds a request may live end to end")
    drain_timeout: float = setting(30.0, positive=True, help="SIGTERM grace for in-flight requests, seconds")
    max_request_body: int = setting(8 * 2**20, bytes=True,
                                    help="bytes a request body may have (larger: 413), e.g. 8Mi")
    max_connections: int = setting(1024, minimum=1,
                                   help="open client connections; beyond this a new one gets 503 and is closed")
    read_timeout: float = setting(30.0, positive=True,
                                  help="seconds a client may take to send a request's headers, and its body (408)")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", help="server log level")

    def __post_init__(self) -> None:
        validate(self)  # types, choices, bounds; kv_cache_memory "4Gi" -> int bytes
        self.api_key = self.api_key or None  # an empty key (an unset Secret) is no key
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


if __name__ == "__main__":  # the CRD's engineArgs properties: print them, or --write them into the CRD
    import sys
    from pathlib import Path

    from gearshift.engine.settings import engine_args_crd_lines, rewrite_crd

    if sys.argv[1:2] == ["--write"]:
        crd = Path(sys.argv[2] if len(sys.argv) > 2 else "crds/inferenceservices.yaml")
        crd.write_text(rewrite_crd(crd.read_text(), EngineConfig))
    else:
        print(engine_args_crd_lines(EngineConfig), end="")
