"""Engine policy: which engine serves a spec, why (one sentence for status), and how it is sized.

Pure and table-tested (tests/test_policy.py). Rules, in order:
1. An explicit engine wins if it can serve the model on the requested hardware; an incompatible pair
   (gguf engine with safetensors weights, gguf engine on an accelerator) is InvalidSpec, never a guess.
2. safetensors weights -> paged (the llama.cpp runner reads GGUF only).
3. An accelerator -> paged (the image's llama.cpp is a CPU build; our Triton kernels run on GPUs).
4. GGUF on CPU -> gguf below CROSSOVER_CONCURRENCY concurrent requests, paged at or above it (the
   conservative crossover: the node's CPU is not known here); with
   spec.gearShift.mode auto the engine the observed load chose (operator/observe.py) instead of the declared
   concurrency, sized for the observed concurrency.
5. A GGUF model whose architecture the paged engine does not implement (read locally by plan/up, or
   reported by a paged pod as UnsupportedModel) with engine auto on CPU -> gguf, and the reason says so.
6. hardware.count accelerators per replica -> the paged engine shards the model over all of them (tensor
   parallel, one engine process per GPU): the plan's tensor_parallel, passed as --tensor-parallel-size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from gearshift.engine.config import EngineConfig
from gearshift.engine.crossover import CONSERVATIVE_CROSSOVER
from gearshift.operator.spec import ENGINE_ARGS, InferenceServiceSpec, InvalidSpec, parse_quantity

# The concurrency per replica at which the paged engine's continuous batching overtakes the llama.cpp
# runner in total output tokens/s on CPU, as the policy uses it at create time: the conservative figure of
# engine/crossover.py's measured table (4, an AVX2-only CPU; 2 on a CPU with AVX512-BF16). Before a pod
# runs the operator does not know the node's CPU (finding out would take node read access cluster-wide);
# once pods serve, the observed path (operator/gear.py) uses the crossover each pod reports for its CPU.
# (It was 6 before the native CPU kernels, 8 with passive OpenMP waits, which cost llama.cpp 3.4x, and
# briefly 12 while the paged server stepped its engine on a second OpenMP team.)
CROSSOVER_CONCURRENCY = CONSERVATIVE_CROSSOVER

# Share of the memory limit given to the paged engine's KV cache on CPU; the rest holds the weights
# (dequantized from GGUF on load), activations and the Python process.
CPU_KV_CACHE_FRACTION = 0.25

# The gguf runner decodes one request at a time, so a request queued behind W others waits W request times
# before its first token, and the server ends it at request_timeout (408, or an error event in a stream).
# Its waiting queue (--max-waiting) is bounded so that the expected wait at a full queue stays within half
# the timeout (the other half for the request itself and for requests slower than the reference):
# W = request_timeout / (2 x GGUF_REQUEST_SECONDS), 120 at the default 600 s. The reference request time
# is measured: the 2026-11-30 soak (README "Soak"; 256 clients, SmolLM2-135M Q4_1 on 2 CPUs, 32 output
# tokens) drained its queue at ~2.5 s a request, so the engine's default queue of 256 waited ~640 s, past
# the 600 s timeout; bench/serve.py's 128-token requests took ~1.35 s at 95 tok/s. Beyond the bound a
# request gets 429 with Retry-After at once instead of a timeout after minutes. The declared concurrency
# (max sequences) is always admitted: a team that declares more than that on gguf is told by GearAdvice.
GGUF_REQUEST_SECONDS = 2.5
_ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
# spec.hardware.cpu sets the threads unless engineArgs does: never past what the engine accepts.
_MAX_THREADS = int(next(f.metadata["setting"].maximum for f in fields(EngineConfig) if f.name == "threads"))


def gguf_max_waiting(concurrency: int, request_timeout: float = _ENGINE_DEFAULTS["request_timeout"]) -> int:
    """The gguf pod's --max-waiting: the time bound above, at least the concurrency, at most the engine's
    default queue."""
    bound = math.floor(request_timeout / (2 * GGUF_REQUEST_SECONDS))
    return min(_ENGINE_DEFAULTS["max_waiting"], max(concurrency, bound, 1))


# Requests when spec.hardware leaves them out: enough to load a small model.
DEFAULTS = {
    "gguf": {"cpu": "1", "memory": "1Gi"},
    "paged": {"cpu": "2", "memory": "4Gi"},
    "paged-gpu": {"cpu": "4", "memory": "16Gi"},
}


@dataclass(frozen=True)
class EnginePlan:
    engine: str  # paged | gguf
    reason: str  # one sentence for status.engineReason
    device: str  # cpu | cuda
    model_format: str  # gguf | safetensors
    max_num_seqs: int
    kv_cache_memory: int | None  # bytes; None: the engine sizes it from free memory
    threads: int | None  # CPU threads for the engine; None: the CPUs the pod may use
    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    engine_args: dict[str, Any] = field(default_factory=dict)  # those that apply to `engine`
    tensor_parallel: int = 1  # devices one replica shards the model over (spec.hardware.count)
    max_waiting: int | None = None  # gguf: the queue bound (gguf_max_waiting); None: the engine's default


@dataclass(frozen=True)
class ObservedGear:
    """The engine an `auto` resource was shifted to from observed load (status.gearShift)."""
    engine: str
    reason: str  # starts with "observed"
    concurrency: int  # the observed p95 per replica at the shift: max sequences are sized for it


def decide(spec: InferenceServiceSpec, unsupported_architecture: str | None = None,
           observed: ObservedGear | None = None) -> EnginePlan:
    """The engine and its sizing for `spec`; raises InvalidSpec for an engine that cannot serve it.

    unsupported_architecture: the model's architecture when it is known that the paged engine does not
    implement it (None: unknown, or supported)."""
    fmt = spec.model.uri.format
    hw = spec.hardware
    accel = f"{hw.accelerator} x{hw.count}" if hw.accelerator else None
    c = spec.concurrency
    requests = f"{c} concurrent request{'s' if c != 1 else ''}"

    if spec.engine == "gguf":
        if fmt != "gguf":
            raise InvalidSpec("spec.engine", f"gguf needs a .gguf model file, but {spec.model.uri.display} is {fmt}; "
                                             "use engine paged or auto")
        if accel:
            raise InvalidSpec("spec.engine", "gguf runs on CPU only (the image's llama.cpp is a CPU build); "
                                             "remove spec.hardware.accelerator or use engine paged or auto")
        engine, reason = "gguf", f"engine gguf was requested; {requests} on CPU"
    elif spec.engine == "paged":
        engine, reason = "paged", f"engine paged was requested; {requests} on {accel or 'CPU'}"
    elif fmt == "safetensors":
        engine, reason = "paged", "safetensors weights are served by the paged engine only"
    elif unsupported_architecture and not accel:
        engine, reason = "gguf", (f"the paged engine does not implement architecture {unsupported_architecture!r}: "
                                  f"falling back to the gguf engine (llama.cpp) for {requests} on CPU")
    elif accel:
        engine, reason = "paged", f"an accelerator ({accel}) is requested and the paged engine runs on GPUs"
    elif observed is not None:
        engine, reason = observed.engine, observed.reason
    elif c < CROSSOVER_CONCURRENCY:
        engine, reason = "gguf", f"{requests} on CPU: below the paged engine's crossover ({CROSSOVER_CONCURRENCY})"
    else:
        engine, reason = "paged", (f"{requests} on CPU: at or above the crossover ({CROSSOVER_CONCURRENCY}) "
                                   "where the paged engine's batching overtakes the llama.cpp runner")
    plan = _size(spec, engine, reason, fmt)
    if observed is not None and reason == observed.reason and "maxNumSeqs" not in spec.engine_args:
        plan = replace(plan, max_num_seqs=max(plan.max_num_seqs, observed.concurrency))
    if engine == "gguf":
        plan = replace(plan, max_waiting=gguf_max_waiting(plan.max_num_seqs))
    return plan


def _size(spec: InferenceServiceSpec, engine: str, reason: str, fmt: str) -> EnginePlan:
    hw = spec.hardware
    device = "cuda" if hw.accelerator else "cpu"
    args = _engine_args_for(spec, engine)
    defaults = DEFAULTS["paged-gpu" if device == "cuda" else engine]
    cpu = hw.cpu or defaults["cpu"]
    memory = hw.memory or defaults["memory"]
    requests = {"cpu": cpu, "memory": memory}
    limits = {"memory": memory}  # no CPU limit: throttling stalls token generation; memory limit = request
    if hw.accelerator:
        requests[hw.accelerator] = str(hw.count)
        limits[hw.accelerator] = str(hw.count)

    # Each replica decodes its share of the declared concurrency together; with autoscaling the HPA
    # target is the per-pod load, so a pod must hold at least that many.
    seqs = spec.concurrency
    if spec.autoscaling and spec.autoscaling.target_concurrency:
        seqs = max(seqs, spec.autoscaling.target_concurrency)
    seqs = int(args.pop("maxNumSeqs", seqs))

    threads = args.pop("threads", None)
    if threads is None:
        threads = min(_MAX_THREADS, max(1, math.ceil(parse_quantity(cpu, "spec.hardware.cpu"))))

    kv: int | None = None
    if "kvCacheMemory" in args:
        kv = int(parse_quantity(args.pop("kvCacheMemory"), "spec.engineArgs.kvCacheMemory"))
    elif engine == "paged" and device == "cpu":
        kv = int(parse_quantity(memory, "spec.hardware.memory") * CPU_KV_CACHE_FRACTION)
    return EnginePlan(engine=engine, reason=reason, device=device, model_format=fmt, max_num_seqs=seqs,
                      kv_cache_memory=kv, threads=int(threads), requests=requests, limits=limits,
                      engine_args=args, tensor_parallel=max(1, hw.count))


def _engine_args_for(spec: InferenceServiceSpec, engine: str) -> dict[str, Any]:
    """engineArgs that apply to `engine`. One for the other engine is an error when the user chose the
    engine, and is left out when the policy did (it applies again if the policy switches back)."""
    out: dict[str, Any] = {}
    for key, value in spec.engine_args.items():
        if engine in ENGINE_ARGS[key].setting.engines:
            out[key] = value
        elif spec.engine != "auto":
            raise InvalidSpec(f"spec.engineArgs.{key}", f"does not apply to engine {engine}")
    return out
