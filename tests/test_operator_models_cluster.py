"""The operator on the local control plane (real kube-apiserver, no kubelet) with models the paged engine
cannot run, and with several accelerators per replica (tensor parallel).

No node runs pods here, so the paged engine's exit is written where a kubelet writes it: the engine
container's lastState.terminated.message in the pod's status (the line `gearshift serve` prints, which
FallbackToLogsOnError makes the termination message; test_model_support.py runs that process for real).
"""

from __future__ import annotations

from typing import Any

import pytest
from gearshift.operator.policy import CROSSOVER_CONCURRENCY as CROSSOVER
from test_operator_cluster import (  # noqa: F401 - the module-scoped cluster fixture
    MODEL,
    cluster,
    condition,
    create,
    engine_args,
    events,
    get,
    isvc,
    owner,
    wait,
)

pytestmark = pytest.mark.slow

EXIT_LINE = ("gearshift serve: UnsupportedModel: architecture 'mamba' is not implemented by the paged engine "
             "(gguf); supported: llama, mistral, qwen2")


def _report_exit(c: dict[str, Any], pod: dict[str, Any]) -> None:
    """What the kubelet writes after the engine container exits 2 with EXIT_LINE as its log tail."""
    term = {"exitCode": 2, "reason": "Error", "message": "loading model\n" + EXIT_LINE,
            "startedAt": "2026-11-30T19:00:00Z", "finishedAt": "2026-11-30T19:00:05Z", "containerID": "x://1"}
    status = {"status": {"phase": "Running", "containerStatuses": [{
        "name": "engine", "ready": False, "restartCount": 1, "image": "gearshift:test", "imageID": "",
        "lastState": {"terminated": term},
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}}}]}}
    path = f"/api/v1/namespaces/{c['ns']}/pods/{pod['metadata']['name']}/status"
    c["admin"].request("PATCH", path, status, content_type="application/merge-patch+json")


def test_unsupported_architecture_degrades_then_falls_back_to_gguf(cluster: dict[str, Any]) -> None:  # noqa: F811 - the imported fixture
    c = cluster
    create(c, isvc("exotic", concurrency=CROSSOVER * 4))  # GGUF, auto, above the crossover: paged first
    dep = wait(lambda: get(c, "apps/v1", "Deployment", "exotic"), "the Deployment")
    assert engine_args(dep)[:3] == ["serve", "--engine", "paged"]

    def paged_pod() -> dict[str, Any] | None:
        pods = c["admin"].request("GET", f"/api/v1/namespaces/{c['ns']}/pods?labelSelector="
                                         "app.kubernetes.io/instance=exotic,gearshift.dev/engine=paged")["items"]
        return pods[0] if pods else None

    _report_exit(c, wait(paged_pod, "the paged pod"))

    def fell_back() -> dict[str, Any] | None:
        st = owner(c, "exotic").get("status") or {}
        return st if st.get("engine") == "gguf" else None

    st = wait(fell_back, "the fall back to gguf")
    assert "does not implement architecture 'mamba'" in st["engineReason"]
    assert "falling back to the gguf engine" in st["engineReason"]
    assert st["unsupportedModel"] == {"uri": MODEL, "architecture": "mamba"}
    dep = wait(lambda: (d := get(c, "apps/v1", "Deployment", "exotic")) and
               engine_args(d)[:3] == ["serve", "--engine", "gguf"] and d, "the gguf Deployment")
    assert wait(lambda: [e for e in events(c, "exotic", "EngineSelected") if "mamba" in e["message"]],
                "an EngineSelected event naming the architecture")


def test_explicit_paged_engine_reports_unsupported_model(cluster: dict[str, Any]) -> None:  # noqa: F811 - the imported fixture
    c = cluster
    create(c, isvc("exotic-paged", engine="paged"))

    def pod() -> dict[str, Any] | None:
        pods = c["admin"].request("GET", f"/api/v1/namespaces/{c['ns']}/pods?labelSelector="
                                         "app.kubernetes.io/instance=exotic-paged")["items"]
        return pods[0] if pods else None

    _report_exit(c, wait(pod, "the paged pod"))
    deg = wait(lambda: condition(owner(c, "exotic-paged"), "Degraded").get("reason") == "UnsupportedModel"
               and condition(owner(c, "exotic-paged"), "Degraded"), "Degraded=UnsupportedModel")
    assert deg["status"] == "True" and "architecture 'mamba'" in deg["message"]
    assert owner(c, "exotic-paged")["status"]["engine"] == "paged"  # the user's choice is not overridden


def test_gpu_count_is_passed_through_as_tensor_parallel(cluster: dict[str, Any]) -> None:  # noqa: F811 - the imported fixture
    c = cluster
    create(c, isvc("two-gpus", hardware={"accelerator": "nvidia.com/gpu", "count": 2}))
    dep = wait(lambda: get(c, "apps/v1", "Deployment", "two-gpus"), "the Deployment")
    args = engine_args(dep)
    assert args[:3] == ["serve", "--engine", "paged"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    engine = dep["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
