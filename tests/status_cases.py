"""Every shape of status the operator can compute, for the schema checks (local jsonschema and the real
API server's dry run): a valid spec at each stage of a pod's life, each Degraded reason, an invalid
spec with and without an earlier status, each blocked reason, and scaled to zero."""

from __future__ import annotations

from typing import Any

from gearshift.operator.policy import decide
from gearshift.operator.spec import parse_spec
from gearshift.operator.status import compute_status

T0 = "2026-01-01T00:00:00Z"
SPEC = parse_spec({"metadata": {"name": "m", "namespace": "ns"},
                   "spec": {"model": {"uri": "https://h.example/m.gguf"}, "replicas": 2}})
PLAN = decide(SPEC)


def _dep(replicas: int = 1, ready: int = 0, conditions: list | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "m", "generation": 1}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas, "availableReplicas": ready, "conditions": conditions or []}}


def _pod(phase: str = "Running", engine: dict | None = None, fetch: dict | None = None, **st: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, **st}
    if fetch is not None:
        status["initContainerStatuses"] = [{"name": "fetch", **fetch}]
    if engine is not None:
        status["containerStatuses"] = [{"name": "engine", **engine}]
    return {"metadata": {"name": "m-1", "creationTimestamp": T0}, "status": status}


PODS: dict[str, list[dict[str, Any]]] = {
    "no pods": [],
    "downloading": [_pod(fetch={"state": {"running": {}}})],
    "download failed": [_pod("Pending", fetch={"lastState": {"terminated": {"exitCode": 2, "message": "HTTP 404"}},
                                                "state": {"waiting": {"reason": "PodInitializing"}}})],
    "terminated without exit code": [_pod(fetch={"state": {"terminated": {"reason": "Error"}}})],
    "loading": [_pod(engine={"ready": False, "state": {"running": {}}})],
    "ready": [_pod(engine={"ready": True, "state": {"running": {}}})],
    "crash loop": [_pod(engine={"ready": False, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}})],
    "image pull": [_pod("Pending", engine={"ready": False, "state": {"waiting": {"reason": "ErrImagePull"}}})],
    "restarted": [_pod(engine={"ready": False, "restartCount": 1, "state": {"running": {}},
                               "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}})],
    "unschedulable": [_pod("Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                                   "reason": "Unschedulable"}])],
    "failed": [_pod("Failed")],
}
DEPLOYMENTS: dict[str, dict[str, Any] | None] = {
    "no deployment": None,
    "rolling": _dep(replicas=2, ready=1),
    "ready": _dep(replicas=1, ready=1),
    "scaled to zero": _dep(replicas=0),
    "deadline": _dep(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]),
    "replica failure": _dep(conditions=[{"type": "ReplicaFailure", "status": "True"}]),
}


def all_statuses() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for dname, dep in DEPLOYMENTS.items():
        for pname, pods in PODS.items():
            out.append((f"{dname}, {pname}", compute_status(
                name="m", generation=1, spec=SPEC, plan=PLAN, error=None, deployment=dep, pods=pods,
                previous=None, now=T0)))
    valid = out[0][1]
    for previous in ({}, valid, {"engine": None, "engineReason": None}):
        out.append((f"invalid spec after {previous}", compute_status(
            name="m", generation=2, spec=None, plan=None, error="spec.engine: gguf needs a .gguf model file",
            deployment=None, pods=[], previous=previous, now=T0)))
    for reason in ("ChildConflict", "ApplyRejected"):
        out.append((reason, compute_status(
            name="m", generation=1, spec=SPEC, plan=PLAN, error=None, deployment=None, pods=[], previous=None,
            now=T0, blocked=(reason, "Service ns/m already exists"))))
    return out
