"""One pod on the test node: init containers in order, then the containers as local processes, probes,
restarts with back-off, and the pod's status written back to the API server."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gearshift.e2e.node.podspec import Launch, PodSpecError, launch, mounts, volume_dirs, volume_files
from gearshift.e2e.node.probes import ProbeState, new_state, probe_once

log = logging.getLogger("gearshift.e2e.node")
MAX_BACKOFF_S = 10.0  # the kubelet caps at 5 minutes; tests cannot wait that long


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    spec: dict
    init: bool = False
    proc: subprocess.Popen | None = None
    run: Launch | None = None
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    next_start: float = 0.0
    exit_code: int | None = None
    log_offset: int = 0  # where this run's output starts in the container's log file
    startup: ProbeState | None = None
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def started(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and \
            (self.startup is None or self.startup.result is True)

    @property
    def ready(self) -> bool:
        return self.started and (self.readiness is None or self.readiness.result is True)

    def status(self) -> dict:
        s = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "gearshift-e2e://local",
             "ready": False if self.init else self.ready, "restartCount": self.restarts,
             "state": self.state, "lastState": self.last_state}
        if self.proc is not None:
            s["containerID"] = f"gearshift-e2e://{self.proc.pid}"
        if not self.init:
            s["started"] = self.started
        return s


class PodRunner(threading.Thread):
    """Runs one pod until `stop()`; `on_gone(pod)` is called after the processes are dead."""

    def __init__(self, pod: dict, *, ip: str, root: Path, core, lookup, entrypoint: list[str],
                 base_env: dict[str, str], on_gone: Callable[[dict], None]):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.pod, self.ip, self.core, self.lookup = pod, ip, core, lookup
        self.entrypoint, self.base_env, self.on_gone = entrypoint, base_env, on_gone
        self.dir = root / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        self.claims = root / "claims"
        self._halt = threading.Event()
        self.inits = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self._conditions: dict[str, dict] = {}
        self._sent: dict | None = None
        self._error: str | None = None
        self._start_time = now_iso()

    # -- public -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._halt.set()

    def log_paths(self) -> list[Path]:
        return sorted((self.dir / "logs").glob("*.log"))

    # -- lifecycle --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._prepare()
            for c in self.inits:
                if not self._run_to_completion(c):
                    return
            while not self._halt.is_set():
                self._tick()
                self._halt.wait(0.25)
        except Exception as e:  # the agent must survive any one pod's trouble; say why in the log
            log.exception("pod %s failed in the node agent: %s", self.name, e)
        finally:
            for c in [*self.inits, *self.containers]:
                self._kill(c)
            # emptyDir and Secret copies live as long as the pod; its logs stay for failure reports.
            shutil.rmtree(self.dir / "volumes", ignore_errors=True)
            self.on_gone(self.pod)

    def _prepare(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "home").mkdir(exist_ok=True)
        self.dirs = volume_dirs(self.pod, self.dir, self.claims)
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        while not self._halt.is_set():
            try:
                for vol, files in volume_files(self.pod, self.lookup).items():
                    for rel, data in files.items():
                        path = self.dirs[vol] / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data)
                return
            except PodSpecError as e:  # a Secret may appear later: keep trying, say why meanwhile
                self._error = str(e)
                self._report()
                self._halt.wait(2)

    def _start(self, c: Container) -> bool:
        try:
            c.run = launch(self.pod, c.spec, pod_ip=self.ip, dirs=self.dirs, lookup=self.lookup,
                           entrypoint=self.entrypoint, base_env={**self.base_env, "HOME": str(self.dir / "home")},
                           default_cwd=str(self.dir / "home"))
        except PodSpecError as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.next_start = time.monotonic() + 2
            return False
        out = open(self.dir / "logs" / f"{c.name}.log", "ab")
        out.write(f"--- {now_iso()} start #{c.restarts}: {' '.join(c.run.argv)}\n".encode())
        out.flush()
        c.log_offset = out.tell()
        try:
            c.proc = subprocess.Popen(c.run.argv, env=c.run.env, cwd=c.run.cwd, stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            c.state = {"waiting": {"reason": "RunContainerError", "message": str(e)}}
            c.next_start = time.monotonic() + 2
            return False
        finally:
            out.close()
        c.state = {"running": {"startedAt": now_iso()}}
        c.exit_code = None
        c.startup, c.readiness, c.liveness = (new_state(c.spec.get(k)) for k in
                                              ("startupProbe", "readinessProbe", "livenessProbe"))
        return True

    def _kill(self, c: Container, grace: float | None = None) -> None:
        if c.proc is None or c.proc.poll() is not None:
            return
        if grace is None:
            grace = min(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)), 10.0)
        try:
            os.killpg(c.proc.pid, signal.SIGTERM)
            c.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
        except ProcessLookupError:
            c.proc.wait()

    def _exited(self, c: Container) -> None:
        """Record a process that ended and schedule its restart per restartPolicy."""
        code = c.proc.returncode
        code = 128 - code if code < 0 else code  # killed by signal N: 128+N, like a container runtime
        c.exit_code = code
        started = c.state.get("running", {}).get("startedAt", now_iso())
        c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                  "startedAt": started, "finishedAt": now_iso(),
                                  "containerID": f"gearshift-e2e://{c.proc.pid}"}}
        if code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            c.state["terminated"]["message"] = self._log_tail(c)
        policy = self.pod["spec"].get("restartPolicy", "Always")
        again = (code != 0 and policy != "Never") if c.init else \
            (policy == "Always" or (policy == "OnFailure" and code != 0))
        if again:
            c.last_state = c.state
            c.restarts += 1
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off restarting failed container {c.name}"}}
            c.next_start = time.monotonic() + min(2.0 ** (c.restarts - 1), MAX_BACKOFF_S)
            c.proc = None

    def _log_tail(self, c: Container) -> str:
        """The kubelet's FallbackToLogsOnError message: the run's last 80 lines, at most 2048 bytes."""
        try:
            with open(self.dir / "logs" / f"{c.name}.log", "rb") as f:
                f.seek(c.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-80:])[-2048:]

    def _run_to_completion(self, c: Container) -> bool:
        """An init container: run until it exits 0 (retrying on failure); False when the pod stops."""
        while not self._halt.is_set():
            if c.proc is None and time.monotonic() >= c.next_start:
                self._start(c)
            if c.proc is not None and c.proc.poll() is not None:
                self._exited(c)
                if c.exit_code == 0:
                    self._report()
                    return True
                if c.proc is not None:  # restartPolicy Never: the pod failed
                    self._report()
                    self._halt.wait()
                    return False
            self._report()
            self._halt.wait(0.25)
        return False

    def _tick(self) -> None:
        now = time.monotonic()
        for c in self.containers:
            if c.state.get("terminated"):
                continue  # finished and not to be restarted (restartPolicy)
            if c.proc is None:
                if now >= c.next_start:
                    self._start(c)
                continue
            if c.proc.poll() is not None:
                self._exited(c)
                continue
            pairs = mounts(c.spec, self.dirs)
            if c.startup is not None and c.startup.result is not True:
                if c.startup.due(now) and c.startup.record(probe_once(c.startup.spec, c.run, self.ip, pairs), now) is False:
                    log.info("%s/%s: startup probe failed, restarting", self.name, c.name)
                    self._kill(c, grace=2)
                continue
            if c.liveness is not None and c.liveness.due(now):
                if c.liveness.record(probe_once(c.liveness.spec, c.run, self.ip, pairs), now) is False:
                    log.info("%s/%s: liveness probe failed, restarting", self.name, c.name)
                    self._kill(c, grace=2)
                    continue
            if c.readiness is not None and c.readiness.due(now):
                # Readiness probes are fast until the first success so a Ready pod is noticed quickly.
                c.readiness.record(probe_once(c.readiness.spec, c.run, self.ip, pairs), now)
        self._report()

    # -- status -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    def _condition(self, kind: str, ok: bool) -> dict:
        status = "True" if ok else "False"
        old = self._conditions.get(kind)
        if old is None or old["status"] != status:
            self._conditions[kind] = {"type": kind, "status": status, "lastProbeTime": None,
                                      "lastTransitionTime": now_iso()}
        return self._conditions[kind]

    def _phase(self, initialized: bool) -> str:
        if not initialized or any(c.proc is None and c.restarts == 0 and c.exit_code is None for c in self.containers):
            if any(c.state.get("terminated") for c in self.inits) and self.pod["spec"].get("restartPolicy") == "Never":
                return "Failed"
            return "Pending"
        if all(c.state.get("terminated") for c in self.containers):
            return "Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed"
        return "Running"

    def _report(self) -> None:
        initialized = all(c.exit_code == 0 for c in self.inits)
        for c in self.containers:
            if not initialized and c.proc is None:
                c.state = {"waiting": {"reason": "PodInitializing"}}
        ready = initialized and all(c.ready for c in self.containers)
        status = {
            "phase": self._phase(initialized), "hostIP": "127.0.0.1", "podIP": self.ip,
            "podIPs": [{"ip": self.ip}], "startTime": self._start_time, "qosClass": "BestEffort",
            "conditions": [self._condition("PodScheduled", True), self._condition("Initialized", initialized),
                           self._condition("ContainersReady", ready), self._condition("Ready", ready)],
            "initContainerStatuses": [c.status() for c in self.inits],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self._error:
            status["message"] = self._error
        if status == self._sent:
            return
        meta = self.pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
            self._sent = status
        except Exception as e:  # the pod may be gone (deleted); the agent's loop will stop us
            log.debug("status of %s not written: %s", self.name, e)
