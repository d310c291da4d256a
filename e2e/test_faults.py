"""Faults only a real node can produce, each ending with no duplicate children and no lost status: the
kernel's OOM killer (the pod's memory cgroup limit) killing an engine that can never fit, then one that
fits but is pushed past its limit, and the node's containerd restarted while a model serves.
Clients reach the model through its ClusterIP Service. The tests run in file order."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from gearshift.e2e.cluster import node as real_node
from gearshift.e2e.cluster.local import KUBECONFIG
from gearshift.e2e.cluster.scenario import LOAD_S, MODEL_FILE, chat, engine_pid, spec
from gearshift.e2e.cluster.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NAME = "tight"
TOO_SMALL = "64Mi"  # the smallest limit the spec accepts; the engine's Python alone needs more
KEPT = ("engine", "engineReason", "url", "observedGeneration", "selector")  # status that must survive a fault

# Fills an in-memory file (memfd) 64 MiB at a time until the container's memory cgroup is full. Its pages
# are charged to the cgroup but are in no process's RSS, so the kernel's OOM killer, which picks the
# process with the most resident memory, kills the engine: as if the engine itself had grown.
_FILL = ("import os\nfd = os.memfd_create('fill')\nchunk = b'x' * (64 << 20)\n"
         "while True:\n    os.write(fd, chunk)\n")


def _cond(kube: Any, ctype: str) -> dict[str, Any]:  # noqa: ANN401 - scenario.Kube
    return kube.condition(ctype, NAME)



def _kept(kube: Any, name: str = NAME) -> dict[str, Any]:  # noqa: ANN401 - scenario.Kube
    st = kube.isvc(name).get("status") or {}
    return {k: st.get(k) for k in KEPT}


def _warnings(kube: Any, name: str, reason: str) -> list[Any]:  # noqa: ANN401 - scenario.Kube
    events = kube.core.list_namespaced_event(kube.ns, field_selector=f"involvedObject.name={name}").items
    return [e for e in events if e.reason == reason and e.type == "Warning"
            and e.involved_object.kind == "InferenceService"]


def _engine_status(kube: Any, name: str = NAME) -> Any:  # noqa: ANN401 - a V1ContainerStatus
    pod = next(p for p in kube.pods(name) if not p.metadata.deletion_timestamp)
    return next(c for c in pod.status.container_statuses or [] if c.name == "engine")


def test_a_model_that_never_fits_its_memory_limit_reports_oomkilled_then_recovers(kube, model_url):
    kube.create(NAME, spec(model_url(MODEL_FILE), concurrency=1, hardware={"cpu": "500m", "memory": TOO_SMALL}))
    cond = wait_for(lambda: _cond(kube, "Degraded").get("reason") == "OOMKilled" and _cond(kube, "Degraded"),
                    LOAD_S, "Degraded OOMKilled for an engine over its memory limit")
    assert cond["status"] == "True" and f"memory limit {TOO_SMALL}" in cond["message"], cond
    assert _cond(kube, "Ready")["status"] == "False" and _cond(kube, "Ready")["reason"] == "OOMKilled"
    # The kubelet's own record: the kernel's OOM killer ended the container (containerd's OOM event).
    term = _engine_status(kube).last_state.terminated or _engine_status(kube).state.terminated
    assert term.reason == "OOMKilled" and term.exit_code == 137, term
    events = wait_for(lambda: _warnings(kube, NAME, "OOMKilled"), 60, "a Warning Event OOMKilled")
    assert TOO_SMALL in events[0].message, events[0].message
    # The crash loop goes on (restarts) without a second Event: one per transition, not per restart.
    wait_for(lambda: (_engine_status(kube).restart_count or 0) >= 2, LOAD_S, "the kubelet restarting it again")
    assert sum(e.count or 1 for e in _warnings(kube, NAME, "OOMKilled")) == 1

    kube.patch(NAME, {"hardware": {"cpu": "500m", "memory": "2Gi"}})
    wait_for(lambda: kube.is_ready(NAME) and _cond(kube, "Degraded").get("status") == "False"
             and len(kube.pods(NAME)) == 1, LOAD_S, "Ready with 2Gi, the OOM-killed pod gone")
    kube.assert_no_duplicates(NAME)
    assert chat(kube.service_ip(NAME)).strip()


def test_an_engine_pushed_past_its_limit_is_oom_killed_restarted_degraded_then_ready(kube):
    before = _kept(kube)
    pod = kube.ready_pods(NAME)[0]
    pid = engine_pid(pod)
    # The pod's memory limit is reached inside the engine's container; nothing here sends a signal.
    fill = subprocess.run(["kubectl", f"--kubeconfig={KUBECONFIG}", "-n", kube.ns, "exec", pod.metadata.name,
                           "-c", "engine", "--", "python3", "-c", _FILL],
                          capture_output=True, text=True, timeout=300)
    assert fill.returncode != 0, fill  # it never ends by itself: the container it ran in was killed
    seen = wait_for(lambda: _cond(kube, "Degraded").get("status") == "True" and _cond(kube, "Degraded"),
                    120, "Degraded after the OOM kill", interval=0.2)
    assert seen["reason"] == "OOMKilled" and "memory limit 2Gi" in seen["message"], seen
    wait_for(lambda: kube.is_ready(NAME) and _cond(kube, "Degraded").get("status") == "False", LOAD_S,
             "Ready again and not Degraded")
    cs = _engine_status(kube)
    assert cs.restart_count == 1 and cs.last_state.terminated.reason == "OOMKilled", cs
    assert engine_pid(kube.ready_pods(NAME)[0]) != pid
    assert _kept(kube) == before
    assert _warnings(kube, NAME, "OOMKilled")
    kube.assert_no_duplicates(NAME)
    assert chat(kube.service_ip(NAME)).strip()


def test_containerd_restarted_while_a_model_serves_converges(kube, image):
    before = _kept(kube)
    pod = kube.ready_pods(NAME)[0]
    pid, restarts = engine_pid(pod), _engine_status(kube).restart_count
    ip = kube.service_ip(NAME)
    answered, failed = [], []
    stop = threading.Event()

    def client_loop() -> None:  # the model through its Service while containerd is away
        while not stop.is_set():
            try:
                answered.append(chat(ip, max_tokens=4))
            except Exception as e:  # noqa: BLE001 - counted; the test asserts on them
                failed.append(repr(e))

    t = threading.Thread(target=client_loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: answered, 120, "a first answer before the restart")
        containerd = int((real_node.NODE_DIR / "containerd.pid").read_text())
        proxy = int((real_node.NODE_DIR / "kube-proxy.pid").read_text())
        os.kill(containerd, signal.SIGTERM)  # as `systemctl restart containerd` stops it
        wait_for(lambda: not Path(f"/proc/{containerd}").exists(), 60, "containerd stopped")
        during = len(answered)
        real_node.ensure_node([image])  # node_up.sh starts what is not running: containerd again
        wait_for(lambda: len(answered) > during + 2, 120, "answers after containerd came back")
    finally:
        stop.set()
        t.join(timeout=180)
    print(f"containerd restart: {len(answered)} requests answered, {len(failed)} failed")
    assert not failed, failed
    assert Path(f"/proc/{proxy}").exists()  # the re-run of node_up.sh left kube-proxy running
    wait_for(lambda: kube.is_ready(NAME) and _cond(kube, "Degraded").get("status") == "False", LOAD_S,
             "Ready and not Degraded after the restart")
    # The container outlived containerd (its shim kept it): same process, no restart, same pod.
    assert engine_pid(kube.ready_pods(NAME)[0]) == pid
    assert _engine_status(kube).restart_count == restarts
    assert kube.ready_pods(NAME)[0].metadata.name == pod.metadata.name
    assert _kept(kube) == before
    kube.assert_no_duplicates(NAME)
    assert chat(ip).strip()
    kube.delete(NAME)
    wait_for(lambda: not kube.pods(NAME), 120, "the resource's pods gone")
