"""Status from children's state: conditions, reasons, observedGeneration, stable transition times."""

from __future__ import annotations

from typing import Any

from gearshift.operator.policy import decide
from gearshift.operator.spec import parse_spec
from gearshift.operator.status import CONDITION_TYPES, compute_status, differs, newly_degraded

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
SPEC = parse_spec({"metadata": {"name": "m", "namespace": "ns"},
                   "spec": {"model": {"uri": "https://h.example/m.gguf"}, "replicas": 2}})
PLAN = decide(SPEC)


def deployment(replicas: int = 2, ready: int = 0, updated: int = 0, total: int | None = None,
               available: int | None = None, generation: int = 1, observed: int = 1,
               conditions: list | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "m", "generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": updated if total is None else total,
                       "readyReplicas": ready, "updatedReplicas": updated,
                       "availableReplicas": ready if available is None else available,
                       "conditions": conditions or []}}


def pod(name: str = "m-1", created: str = T0, engine: dict | None = None, fetch: dict | None = None,
        phase: str = "Running", **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase, **status}
    if fetch is not None:
        st["initContainerStatuses"] = [{"name": "fetch", **fetch}]
    if engine is not None:
        st["containerStatuses"] = [{"name": "engine", **engine}]
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": st}


def status(dep: dict | None = None, pods: list | None = None, previous: dict | None = None,
           error: str | None = None, generation: int = 1, now: str = T0) -> dict[str, Any]:
    return compute_status(name="m", generation=generation, spec=None if error else SPEC,
                          plan=None if error else PLAN, error=error, deployment=dep, pods=pods or [],
                          previous=previous, now=now)


def conds(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st["conditions"]}


def test_new_resource_is_progressing() -> None:
    st = status()
    c = conds(st)
    assert [x["type"] for x in st["conditions"]] == list(CONDITION_TYPES)
    assert c["Ready"]["status"] == "False" and c["Progressing"]["reason"] == "Creating"
    assert c["ModelReady"]["reason"] == "NoPods"
    assert st["engine"] == "gguf" and "below the paged engine's crossover" in st["engineReason"]
    assert st["url"] == "http://m.ns.svc:8000/v1"
    assert st["selector"] == "app.kubernetes.io/name=gearshift,app.kubernetes.io/instance=m"
    assert all(x["observedGeneration"] == 1 for x in st["conditions"]) and st["observedGeneration"] == 1


def test_downloading_then_loading_then_ready() -> None:
    dl = conds(status(deployment(updated=1, total=1), [pod(fetch={"state": {"running": {}}})]))
    assert dl["ModelReady"]["reason"] == "Downloading" and dl["Ready"]["status"] == "False"
    loading = conds(status(deployment(updated=1, total=1), [pod(engine={"ready": False, "state": {"running": {}}})]))
    assert loading["ModelReady"]["reason"] == "Loading"
    assert loading["Degraded"]["status"] == "False"
    ready_pods = [pod("m-1", engine={"ready": True, "state": {"running": {}}}),
                  pod("m-2", engine={"ready": True, "state": {"running": {}}})]
    st = status(deployment(ready=2, updated=2), ready_pods)
    c = conds(st)
    assert c["Ready"]["status"] == "True" and c["Ready"]["reason"] == "Available"
    assert "2/2 replicas ready" in c["Ready"]["message"]
    assert c["ModelReady"]["status"] == "True" and c["Progressing"]["reason"] == "RolloutComplete"
    assert (st["replicas"], st["readyReplicas"]) == (2, 2)


def test_download_failure_surfaces_the_error() -> None:
    failed = {"state": {"waiting": {"reason": "PodInitializing"}},
              "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message":
                            "gearshift fetch: error: download of https://h.example/m.gguf failed: HTTP 404 Not Found\n"}},
              "restartCount": 3}
    c = conds(status(deployment(updated=1, total=1), [pod(fetch=failed, phase="Pending")]))
    assert c["ModelReady"]["status"] == "False" and c["ModelReady"]["reason"] == "DownloadFailed"
    assert "HTTP 404 Not Found" in c["ModelReady"]["message"]
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "DownloadFailed"
    assert c["Ready"]["reason"] == "DownloadFailed"


def test_crash_loop_and_image_pull_are_degraded() -> None:
    crash = {"ready": False, "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                                      "message": "back-off 5m0s"}}}
    c = conds(status(deployment(updated=1), [pod(engine=crash)]))
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "CrashLoopBackOff")
    assert "container engine" in c["Degraded"]["message"]
    pull = {"ready": False, "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
    assert conds(status(deployment(), [pod(engine=pull, phase="Pending")]))["Degraded"]["reason"] == "ImagePullBackOff"


def test_killed_engine_is_degraded_until_ready_again() -> None:
    restarted = {"ready": False, "restartCount": 1, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 137, "reason": "Error"}}}
    before = status(deployment(replicas=1, ready=0, updated=1), [pod(engine=restarted)])
    c = conds(before)
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "ContainerRestarted"
    assert "exit code 137" in c["Degraded"]["message"]
    healed = dict(restarted, ready=True)
    after = conds(status(deployment(replicas=1, ready=1, updated=1), [pod(engine=healed)], previous=before, now=T1))
    assert after["Degraded"]["status"] == "False" and after["Ready"]["status"] == "True"
    assert after["Degraded"]["lastTransitionTime"] == T1


def test_oom_kill_names_the_memory_limit_then_heals_and_the_event_fires_once() -> None:
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    looping = {"ready": False, "restartCount": 3, "lastState": oom,
               "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}}
    killed = pod(engine=looping)
    killed["spec"] = {"containers": [{"name": "engine", "resources": {"limits": {"memory": "96Mi"}}}]}
    before = status(deployment(replicas=1, updated=1), [killed])
    c = conds(before)
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "OOMKilled")  # not CrashLoopBackOff
    assert c["Ready"]["reason"] == "OOMKilled"
    assert "memory limit 96Mi" in c["Degraded"]["message"] and "restarted 3x" in c["Degraded"]["message"]
    assert newly_degraded({}, before) == ("OOMKilled", c["Degraded"]["message"])
    again = status(deployment(replicas=1, updated=1), [pod(engine=dict(looping, restartCount=4))], previous=before)
    assert newly_degraded(before, again) is None  # same reason: no second Event
    restarted = {"ready": False, "restartCount": 1, "state": {"running": {}}, "lastState": oom}
    transient = status(deployment(replicas=1, updated=1), [pod(engine=restarted)])
    assert conds(transient)["Degraded"]["reason"] == "OOMKilled"
    healed = status(deployment(replicas=1, ready=1, updated=1), [pod(engine=dict(restarted, ready=True))],
                    previous=transient, now=T1)
    assert conds(healed)["Degraded"]["status"] == "False" and conds(healed)["Ready"]["status"] == "True"
    assert newly_degraded(transient, healed) is None


def test_unschedulable_and_progress_deadline() -> None:
    sched = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
              "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    c = conds(status(deployment(), [pod(phase="Pending", conditions=sched)]))
    assert c["Degraded"]["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in c["Degraded"]["message"]
    stuck = deployment(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": 'ReplicaSet "m-1" has timed out progressing.'}])
    assert conds(status(stuck))["Degraded"]["reason"] == "ProgressDeadlineExceeded"


def test_rollout_in_progress_keeps_serving() -> None:
    # An engine switch: the old pod still serves while the new one loads.
    old = pod("m-old", created=T0, engine={"ready": True, "state": {"running": {}}})
    new = pod("m-new", created=T1, engine={"ready": False, "state": {"running": {}}})
    st = status(deployment(replicas=1, ready=1, updated=1, total=2, available=1, generation=2, observed=2),
                [old, new], generation=2)
    c = conds(st)
    assert c["Progressing"]["status"] == "True" and c["Progressing"]["reason"] == "RollingOut"
    assert c["Ready"]["status"] == "True" and c["ModelReady"]["status"] == "True"
    stale = conds(status(deployment(replicas=1, ready=1, updated=1, generation=3, observed=2), [old]))
    assert stale["Progressing"]["reason"] == "RollingOut"  # the Deployment has not seen the new spec yet


def test_terminating_pods_are_ignored() -> None:
    gone = pod(engine={"ready": False, "restartCount": 9, "state": {"waiting": {"reason": "CrashLoopBackOff"}}})
    gone["metadata"]["deletionTimestamp"] = T1
    c = conds(status(deployment(), [gone]))
    assert c["Degraded"]["status"] == "False" and c["ModelReady"]["reason"] == "NoPods"


def test_invalid_spec() -> None:
    ready = status(deployment(replicas=1, ready=1, updated=1), [pod(engine={"ready": True})])
    st = status(deployment(replicas=1, ready=1, updated=1), [pod(engine={"ready": True})], previous=ready,
                error="spec.engine: gguf needs a .gguf model file", generation=2, now=T1)
    c = conds(st)
    assert c["Ready"] == {"type": "Ready", "status": "False", "reason": "InvalidSpec",
                          "message": "spec.engine: gguf needs a .gguf model file", "observedGeneration": 2,
                          "lastTransitionTime": T1}
    assert c["Degraded"]["status"] == "True" and c["Progressing"]["reason"] == "InvalidSpec"
    assert c["ModelReady"]["status"] == "True"  # the previous model still serves
    assert st["engine"] == ready["engine"] and st["observedGeneration"] == 2


def test_unchanged_world_gives_an_identical_status() -> None:
    pods = [pod(engine={"ready": True, "state": {"running": {}}})]
    first = status(deployment(replicas=1, ready=1, updated=1), pods, now=T0)
    again = status(deployment(replicas=1, ready=1, updated=1), pods, previous=first, now=T1)
    assert again == first  # transition times kept: no write at rest
    assert not differs(first, again)
    assert differs(first, status(deployment(replicas=1, ready=0, updated=1), pods, previous=first, now=T1))


def test_scaled_to_zero() -> None:
    c = conds(status(deployment(replicas=0)))
    assert c["Ready"]["reason"] == "ScaledToZero"
