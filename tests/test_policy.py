"""The engine policy as a table: inputs -> engine and reason; sizing; incompatible pairs -> InvalidSpec."""

from __future__ import annotations

from typing import Any

import pytest
from gearshift.engine.config import EngineConfig
from gearshift.operator.policy import (
    CPU_KV_CACHE_FRACTION,
    CROSSOVER_CONCURRENCY,
    DEFAULTS,
    GGUF_REQUEST_SECONDS,
    ObservedGear,
    decide,
    gguf_max_waiting,
)
from gearshift.operator.spec import InvalidSpec, parse_spec

GGUF = "pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_HTTP = "https://models.example/smollm2.Q4_1.gguf"
SAFETENSORS_DIR = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
SAFETENSORS_FILE = "https://models.example/model.safetensors"
GPU = {"accelerator": "nvidia.com/gpu", "count": 1}
X = CROSSOVER_CONCURRENCY


def isvc(uri: str = GGUF, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": {"uri": uri}, **spec}}


# (engine, uri, concurrency, hardware) -> (engine chosen, words the reason must hold)
TABLE = [
    ("auto", GGUF, 1, {}, "gguf", ["1 concurrent request on CPU", f"below the paged engine's crossover ({X})"]),
    ("auto", GGUF, 2, {}, "gguf", ["2 concurrent requests on CPU", f"crossover ({X})"]),
    ("auto", GGUF_HTTP, X - 1, {}, "gguf", [f"{X - 1} concurrent requests", "below"]),
    ("auto", GGUF, X, {}, "paged", [f"{X} concurrent requests on CPU", "at or above the crossover"]),
    ("auto", GGUF, 32, {}, "paged", ["32 concurrent requests", "batching overtakes"]),
    ("auto", GGUF, 1, GPU, "paged", ["accelerator (nvidia.com/gpu x1)", "runs on GPUs"]),
    ("auto", GGUF, 64, {**GPU, "count": 2}, "paged", ["nvidia.com/gpu x2"]),
    ("auto", SAFETENSORS_DIR, 1, {}, "paged", ["safetensors weights", "paged engine only"]),
    ("auto", SAFETENSORS_FILE, 1, {}, "paged", ["safetensors"]),
    ("auto", SAFETENSORS_DIR, 100, GPU, "paged", ["safetensors"]),
    ("paged", GGUF, 1, {}, "paged", ["engine paged was requested", "1 concurrent request on CPU"]),
    ("paged", SAFETENSORS_DIR, 4, GPU, "paged", ["engine paged was requested", "on nvidia.com/gpu x1"]),
    ("gguf", GGUF, 1, {}, "gguf", ["engine gguf was requested"]),
    ("gguf", GGUF, 200, {}, "gguf", ["engine gguf was requested", "200 concurrent requests"]),
]


@pytest.mark.parametrize(("engine", "uri", "concurrency", "hardware", "want", "words"), TABLE)
def test_policy_table(engine: str, uri: str, concurrency: int, hardware: dict, want: str, words: list[str]) -> None:
    plan = decide(parse_spec(isvc(uri, engine=engine, concurrency=concurrency, hardware=hardware)))
    assert plan.engine == want
    for w in words:
        assert w in plan.reason, (w, plan.reason)
    assert plan.reason.count(".") <= 2 and "\n" not in plan.reason  # one sentence for a status field
    assert plan.device == ("cuda" if hardware.get("accelerator") else "cpu")


@pytest.mark.parametrize(("engine", "uri", "hardware", "words"), [
    ("gguf", SAFETENSORS_DIR, {}, ["gguf needs a .gguf model file", "safetensors"]),
    ("gguf", SAFETENSORS_FILE, {}, ["gguf needs a .gguf"]),
    ("gguf", GGUF, GPU, ["CPU only", "remove spec.hardware.accelerator"]),
])
def test_incompatible_engine_is_invalid_spec_not_a_guess(engine: str, uri: str, hardware: dict,
                                                         words: list[str]) -> None:
    with pytest.raises(InvalidSpec) as e:
        decide(parse_spec(isvc(uri, engine=engine, hardware=hardware)))
    assert e.value.field == "spec.engine"
    for w in words:
        assert w in str(e.value)


def test_crossover_is_the_switch_point() -> None:
    engines = [decide(parse_spec(isvc(concurrency=c))).engine for c in range(1, 2 * X + 1)]
    assert engines == ["gguf"] * (X - 1) + ["paged"] * (X + 1)


def test_sizing_from_hardware() -> None:
    plan = decide(parse_spec(isvc(concurrency=16, hardware={"cpu": "3500m", "memory": "8Gi"})))
    assert plan.engine == "paged"
    assert plan.max_num_seqs == 16
    assert plan.threads == 4  # 3.5 cores rounds up: a thread per core the pod may burst to
    assert plan.kv_cache_memory == int(8 * 2**30 * CPU_KV_CACHE_FRACTION)
    assert plan.requests == {"cpu": "3500m", "memory": "8Gi"}
    assert plan.limits == {"memory": "8Gi"}  # no CPU limit: throttling stalls decoding


def test_threads_from_a_huge_cpu_request_stop_at_what_the_engine_takes() -> None:
    # 5000 cores would be 5000 OpenMP threads: the engine refuses past 1024 (100000 crashed it)
    plan = decide(parse_spec(isvc(concurrency=16, hardware={"cpu": "5000", "memory": "8Gi"})))
    assert plan.threads == 1024
    EngineConfig(model="m", threads=plan.threads, max_num_seqs=plan.max_num_seqs)  # the pod's flags pass


def test_gguf_sizing_has_no_kv_budget_and_defaults() -> None:
    plan = decide(parse_spec(isvc(concurrency=2)))
    assert plan.engine == "gguf"
    assert plan.kv_cache_memory is None
    assert plan.requests == DEFAULTS["gguf"]
    assert plan.threads == 1
    assert plan.max_num_seqs == 2


def test_gpu_sizing_requests_the_accelerator_and_leaves_kv_to_the_engine() -> None:
    plan = decide(parse_spec(isvc(SAFETENSORS_DIR, concurrency=64, hardware={**GPU, "count": 2})))
    assert plan.requests["nvidia.com/gpu"] == "2" and plan.limits["nvidia.com/gpu"] == "2"
    assert plan.tensor_parallel == 2  # one engine process per GPU, the model sharded over both
    assert plan.requests["cpu"] == DEFAULTS["paged-gpu"]["cpu"]
    assert plan.kv_cache_memory is None  # sized from free GPU memory by the engine


def test_autoscaling_target_raises_max_sequences() -> None:
    plan = decide(parse_spec(isvc(concurrency=4, autoscaling={"minReplicas": 1, "maxReplicas": 3,
                                                              "targetConcurrency": 12})))
    assert plan.max_num_seqs == 12


def test_engine_args_override_sizing() -> None:
    plan = decide(parse_spec(isvc(concurrency=16, engineArgs={"maxNumSeqs": 5, "threads": 3,
                                                              "kvCacheMemory": "1Gi", "dtype": "float32"})))
    assert (plan.max_num_seqs, plan.threads, plan.kv_cache_memory) == (5, 3, 2**30)
    assert plan.engine_args == {"dtype": "float32"}


def test_engine_args_for_the_other_engine() -> None:
    # Chosen by the user: an argument the engine does not take is an error naming it.
    with pytest.raises(InvalidSpec) as e:
        decide(parse_spec(isvc(engine="gguf", engineArgs={"dtype": "float32"})))
    assert e.value.field == "spec.engineArgs.dtype"
    # Chosen by the policy: left out while gguf serves, used again once concurrency moves to paged.
    low = decide(parse_spec(isvc(concurrency=1, engineArgs={"dtype": "float32", "maxModelLen": 512})))
    assert low.engine == "gguf" and low.engine_args == {"maxModelLen": 512}
    high = decide(parse_spec(isvc(concurrency=X, engineArgs={"dtype": "float32", "maxModelLen": 512})))
    assert high.engine == "paged" and high.engine_args == {"dtype": "float32", "maxModelLen": 512}


# (declared concurrency, request timeout) -> the gguf pod's --max-waiting: a full queue waits at most half the
# timeout at the reference 2.5 s a request (the soak's 256 queued x ~2.5 s went past 600 s), never fewer
# than the declared concurrency, never more than the engine's default queue
@pytest.mark.parametrize(("concurrency", "timeout", "want"), [
    (1, 600.0, 120), (3, 600.0, 120), (120, 600.0, 120), (200, 600.0, 200), (1000, 600.0, 256),
    (1, 60.0, 12), (1, 1.0, 1), (2, 1.0, 2), (1, 6000.0, 256),
])
def test_gguf_queue_is_bounded_by_the_request_timeout(concurrency: int, timeout: float, want: int) -> None:
    assert gguf_max_waiting(concurrency, timeout) == want
    assert gguf_max_waiting(concurrency, timeout) * GGUF_REQUEST_SECONDS <= max(timeout / 2, concurrency * 2.5)


def test_gguf_plans_get_the_bounded_queue_and_paged_plans_the_engines_default() -> None:
    gguf = decide(parse_spec(isvc(concurrency=2)))
    assert (gguf.engine, gguf.max_waiting) == ("gguf", 120)
    assert decide(parse_spec(isvc(engine="gguf", concurrency=300))).max_waiting == 256
    observed = decide(parse_spec(isvc(concurrency=1, gearShift={"mode": "auto"})),
                      observed=ObservedGear("gguf", "observed p95 1 ...", 1))
    assert observed.max_waiting == 120
    paged = decide(parse_spec(isvc(concurrency=32)))
    assert paged.engine == "paged" and paged.max_waiting is None
