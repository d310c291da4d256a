"""InferenceService status from its children's state. Pure: same inputs, same status (no clock reads:
the caller passes `now`), so an unchanged world produces an unchanged status and no write.

Conditions (each with observedGeneration, reason, message, lastTransitionTime):
  Ready        a replica answers requests (or InvalidSpec: the spec cannot be served as written)
  ModelReady   the model is downloaded and loaded in at least one pod (DownloadFailed carries the error)
  Progressing  a rollout (new spec, engine switch) is under way
  Degraded     something needs a human: crash loops, OOM kills, image pulls, failed downloads, restarts,
               no node (a Warning Event each time it turns True or changes reason: newly_degraded)
  GearAdvice   which engine the observed load wants (added by operator/observe.py, not here)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gearshift.engine.model.config import UNSUPPORTED_MODEL, reported_architecture
from gearshift.operator.builders import INSTANCE_LABEL, url

CONDITION_TYPES = ("Ready", "ModelReady", "Progressing", "Degraded")
_BAD_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
                "CreateContainerError", "InvalidImageName", "RunContainerError"}
_MAX_MESSAGE = 400


def _short(text: str) -> str:
    """The last meaningful lines of a termination message (a log tail), bounded for status."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    msg = " | ".join(lines[-3:])
    return msg if len(msg) <= _MAX_MESSAGE else "..." + msg[-_MAX_MESSAGE:]


def _condition(ctype: str, ok: bool, reason: str, message: str, generation: int,
               previous: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    prev = previous.get(ctype)
    since = prev["lastTransitionTime"] if prev and prev.get("status") == status and prev.get(
        "lastTransitionTime") else now
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since}


def _live_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods not being deleted, newest first (the newest tell the current rollout's story)."""
    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    return sorted(live, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]),
                  reverse=True)


def _terminated(cs: dict[str, Any]) -> dict[str, Any] | None:
    state = cs.get("state") or {}
    return state.get("terminated") or (cs.get("lastState") or {}).get("terminated")


def unsupported_architecture(pods: list[dict[str, Any]]) -> str | None:
    """The architecture a paged engine container reported it cannot run (its termination message)."""
    for p in _live_pods(pods):
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            term = _terminated(cs) if cs.get("name") == "engine" else None
            arch = reported_architecture((term or {}).get("message"))
            if arch:
                return arch
    return None


def known_unsupported(previous: dict[str, Any], pods: list[dict[str, Any]], uri: str) -> str | None:
    """The architecture of the model at `uri` that the paged engine cannot run: reported by a pod now, or
    remembered in status from an earlier report (the gguf pods that replace the paged ones say nothing)."""
    arch = unsupported_architecture(pods)
    if arch:
        return arch
    seen = previous.get("unsupportedModel") or {}
    return seen.get("architecture") if seen.get("uri") == uri else None


def model_state(pods: list[dict[str, Any]]) -> tuple[bool, str, str]:
    """(loaded, reason, message) for the ModelReady condition."""
    live = _live_pods(pods)
    if not live:
        return False, "NoPods", "no pod is running the model yet"
    for p in live:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == "engine" and cs.get("ready"):
                return True, "Loaded", f"model loaded in pod {p['metadata']['name']}"
    pod = live[0]
    name = pod["metadata"]["name"]
    st = pod.get("status") or {}
    for cs in st.get("initContainerStatuses") or []:
        if cs.get("name") != "fetch":
            continue
        term = _terminated(cs)
        if term and term.get("exitCode", 0) != 0:
            return False, "DownloadFailed", f"pod {name}: {_short(term.get('message') or term.get('reason') or '')}"
        if "running" in (cs.get("state") or {}):
            return False, "Downloading", f"pod {name} is downloading the model"
    for cs in st.get("containerStatuses") or []:
        if cs.get("name") == "engine" and "running" in (cs.get("state") or {}):
            return False, "Loading", f"pod {name} is loading the model"
    return False, "Pending", f"pod {name} is {st.get('phase', 'Pending')}"


def _memory_limit(pod: dict[str, Any], container: str) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            return ((c.get("resources") or {}).get("limits") or {}).get("memory") or "none"
    return "unknown"


def oom_killed(pod: dict[str, Any]) -> str | None:
    """Why a container that is not ready was last killed by the kernel's OOM killer (its cgroup's memory
    limit), or None. A crash loop hides the cause in lastState; status and the Event name it instead."""
    name = pod["metadata"]["name"]
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = _terminated(cs)
        if cs.get("ready") or not term or term.get("reason") != "OOMKilled":
            continue
        return (f"pod {name} container {cs['name']} was OOM-killed (memory limit "
                f"{_memory_limit(pod, cs['name'])}, restarted {cs.get('restartCount', 0)}x): "
                "raise spec.hardware.memory if it recurs")
    return None


def newly_degraded(previous: dict[str, Any], status: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when `status` turns Degraded, or Degraded for a new reason, since `previous`:
    the one moment a Warning Event is worth sending (a crash loop must not stay silent, nor repeat)."""
    def degraded(st: dict[str, Any]) -> dict[str, Any]:
        return next((c for c in st.get("conditions") or [] if c.get("type") == "Degraded"), {})
    now, before = degraded(status), degraded(previous)
    if now.get("status") != "True":
        return None
    if before.get("status") == "True" and before.get("reason") == now.get("reason"):
        return None
    return now.get("reason") or "Degraded", now.get("message") or ""


def degraded_state(pods: list[dict[str, Any]], deployment: dict[str, Any] | None) -> tuple[bool, str, str]:
    """(degraded, reason, message): the first problem a human must look at."""
    for c in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return True, "ProgressDeadlineExceeded", _short(c.get("message", ""))
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return True, c.get("reason") or "ReplicaFailure", _short(c.get("message", ""))
    arch = unsupported_architecture(pods)
    if arch:  # before CrashLoopBackOff: the loop is the symptom, the architecture the cause
        return True, UNSUPPORTED_MODEL, f"the paged engine does not implement architecture {arch!r}"
    for p in _live_pods(pods):
        name = p["metadata"]["name"]
        st = p.get("status") or {}
        if st.get("phase") == "Failed":
            return True, "PodFailed", f"pod {name}: {_short(st.get('message') or st.get('reason') or 'failed')}"
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return True, "Unschedulable", f"pod {name}: {_short(c.get('message', ''))}"
        oom = oom_killed(p)
        if oom:  # before CrashLoopBackOff: the loop is the symptom, the memory limit the cause
            return True, "OOMKilled", _short(oom)
        statuses = (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _BAD_WAITING:
                return True, waiting["reason"], f"pod {name} container {cs['name']}: {_short(waiting.get('message') or waiting['reason'])}"
        for cs in st.get("initContainerStatuses") or []:
            term = _terminated(cs)
            if term and term.get("exitCode", 0) != 0:
                return True, "DownloadFailed", f"pod {name}: {_short(term.get('message') or term.get('reason') or '')}"
        for cs in st.get("containerStatuses") or []:
            term = (cs.get("lastState") or {}).get("terminated")
            if cs.get("restartCount", 0) > 0 and not cs.get("ready") and term:
                why = f"exit code {term.get('exitCode')}" + (f", {term['reason']}" if term.get("reason") else "")
                return True, "ContainerRestarted", (
                    f"pod {name} container {cs['name']} restarted {cs['restartCount']}x ({why}) and is not ready")
    return False, "AsExpected", "no problem seen"


def compute_status(*, name: str, generation: int, spec: Any, plan: Any, error: str | None,
                   deployment: dict[str, Any] | None, pods: list[dict[str, Any]],
                   previous: dict[str, Any] | None, now: str,
                   blocked: tuple[str, str] | None = None) -> dict[str, Any]:
    """The whole status object for one InferenceService.

    spec/plan: the parsed spec and engine plan, or None when `error` (an InvalidSpec message) is set.
    deployment/pods: the children as last seen (None / [] when absent). previous: the current status.
    blocked: (reason, message) when a valid spec's children could not be written (operator/blocked.py).
    Every value is of the type the CRD's status schema declares (never null): the API server rejects
    the whole patch otherwise, and the status would never be written.
    """
    previous = previous or {}
    prev_conds = {c["type"]: c for c in previous.get("conditions") or [] if "type" in c}
    rollout = _Rollout.of(deployment)

    def cond(ctype: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return _condition(ctype, ok, reason, message, generation, prev_conds, now)

    status: dict[str, Any] = {"observedGeneration": generation}
    if error is not None:
        status["engine"] = previous.get("engine")  # kept from the last valid spec; dropped when none
        status["engineReason"] = previous.get("engineReason")
        conditions = _invalid_conditions(cond, error, model_state(pods))
    else:
        status["engine"] = plan.engine
        status["engineReason"] = plan.reason
        status["url"] = url(spec)
        unsupported = known_unsupported(previous, pods, spec.model.uri.display)
        if unsupported:
            status["unsupportedModel"] = {"uri": spec.model.uri.display, "architecture": unsupported}
        conditions = _conditions(cond, spec, rollout, model_state(pods), degraded_state(pods, deployment))
        if blocked is not None:  # the children as written cannot be applied: nothing moves until fixed
            reason, message = blocked
            conditions = [cond("Ready", False, reason, message), conditions[1],
                          cond("Progressing", False, reason, "the spec is not applied until this is resolved"),
                          cond("Degraded", True, reason, message)]
    status["replicas"] = rollout.total
    status["readyReplicas"] = rollout.ready
    status["selector"] = f"app.kubernetes.io/name=gearshift,{INSTANCE_LABEL}={name}"
    status["conditions"] = conditions
    return writable(status)


_Cond = Callable[[str, bool, str, str], dict[str, Any]]  # (type, ok, reason, message) -> condition


@dataclass(frozen=True)
class _Rollout:
    """The Deployment's replica counts as last seen (all 0 when there is none)."""

    exists: bool
    desired: int
    ready: int
    updated: int
    total: int
    available: int
    current: bool  # the Deployment controller has seen its latest spec

    @classmethod
    def of(cls, deployment: dict[str, Any] | None) -> _Rollout:
        dep_status = (deployment or {}).get("status") or {}
        desired = ((deployment or {}).get("spec") or {}).get("replicas", 1) if deployment else 0
        current = bool(deployment) and dep_status.get("observedGeneration", 0) >= (
            deployment.get("metadata", {}).get("generation") or 0)
        return cls(deployment is not None, desired, dep_status.get("readyReplicas", 0),
                   dep_status.get("updatedReplicas", 0), dep_status.get("replicas", 0),
                   dep_status.get("availableReplicas", 0), current)

    @property
    def rolled_out(self) -> bool:
        return (self.current and self.updated >= self.desired and self.total == self.updated
                and self.available >= self.desired)


def _invalid_conditions(cond: _Cond, error: str, model: tuple[bool, str, str]) -> list[dict[str, Any]]:
    """An InvalidSpec: nothing is applied until the spec is fixed; the model's state is still reported."""
    return [cond("Ready", False, "InvalidSpec", error),
            cond("ModelReady", *model),
            cond("Progressing", False, "InvalidSpec", "the spec is not applied until it is fixed"),
            cond("Degraded", True, "InvalidSpec", error)]


def _conditions(cond: _Cond, spec: Any, rollout: _Rollout, model: tuple[bool, str, str],
                degraded: tuple[bool, str, str]) -> list[dict[str, Any]]:
    """Ready, ModelReady, Progressing, Degraded for a valid spec."""
    desired, ready, updated = rollout.desired, rollout.ready, rollout.updated
    if not rollout.exists:
        progressing = cond("Progressing", True, "Creating", "creating the workload")
    elif not rollout.rolled_out:
        progressing = cond("Progressing", True, "RollingOut",
                           f"{updated}/{desired} replicas updated, {ready} ready")
    else:
        progressing = cond("Progressing", False, "RolloutComplete", f"{desired} replicas up to date")
    if rollout.exists and desired == 0:
        ready_c = cond("Ready", False, "ScaledToZero", "replicas is 0")
    elif ready >= 1:
        ready_c = cond("Ready", True, "Available", f"{ready}/{desired} replicas ready at {url(spec)}")
    elif degraded[0]:
        ready_c = cond("Ready", False, degraded[1], degraded[2])
    else:
        ready_c = cond("Ready", False, "NoReadyReplicas", model[2])
    return [ready_c, cond("ModelReady", *model), progressing, cond("Degraded", *degraded)]


def writable(value: Any) -> Any:  # noqa: ANN401 - any JSON value
    """`value` without empty strings and nulls (keys dropped): a v1.20 API server reads "" in a merge
    patch of a custom resource's status as null, the schema's `type: string` then rejects the whole
    patch (HTTP 422) and no status is ever written. A dropped key keeps its stored value, if any."""
    if isinstance(value, dict):
        return {k: writable(v) for k, v in value.items() if v != "" and v is not None}
    if isinstance(value, list):
        return [writable(v) for v in value]
    return value


def differs(current: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """Whether writing `desired` would change the stored status (fields we own only)."""
    current = current or {}
    return any(current.get(k) != v for k, v in desired.items())
