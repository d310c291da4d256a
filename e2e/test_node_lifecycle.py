"""What only a real node shows: `gearshift fetch` as the init container resumes an https:// download (a
private CA's certificate, `caConfigMapRef`) after it is killed (the model served by a test pod, throttled), and `kubectl drain` of the node honours the operator's
PodDisruptionBudget for a resource with two replicas. Clients reach the model through its ClusterIP."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from gearshift.e2e.cluster import node as real_node
from gearshift.e2e.cluster.local import KUBECONFIG
from gearshift.e2e.cluster.model_pod import ModelPod, serve_model_pod
from gearshift.e2e.cluster.scenario import LOAD_S, MODEL_FILE, NAME, chat, container_id, spec
from gearshift.e2e.cluster.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RATE = 4 * 1024 * 1024  # bytes/s: the 98 MB model takes ~25 s, time enough to kill the fetch mid-way


def kubectl(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(["kubectl", f"--kubeconfig={KUBECONFIG}", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@pytest.fixture(scope="module")
def slow_server(kube, image: str, tmp_path_factory: pytest.TempPathFactory) -> ModelPod:
    """A pod of our image serving the bundled GGUF over https:// (a private CA) at RATE, with Range support."""
    return serve_model_pod(kube, image, "slow-server", RATE, tmp_path_factory.mktemp("slow-ca"))


def _partial(pod: Any) -> Path:  # noqa: ANN401 - a V1Pod
    """The fetch's partial file in the pod's `models` emptyDir, on the node's disk."""
    return (real_node.NODE_DIR / "kubelet" / "root" / "pods" / pod.metadata.uid / "volumes" /
            "kubernetes.io~empty-dir" / "models" / f"{MODEL_FILE}.part")


def test_fetch_init_container_resumes_after_it_is_killed(kube, slow_server):
    kube.create("resume", spec(slow_server.url, concurrency=1, model={
        "uri": slow_server.url, "servedName": NAME, "caConfigMapRef": {"name": slow_server.ca_config_map}}))
    pod = wait_for(lambda: next(iter(kube.pods("resume")), None), 60, "the resource's pod")
    part = _partial(pod)
    wait_for(lambda: part.exists() and part.stat().st_size > 16 * 1024 * 1024, 120, "16 MiB downloaded")
    pod = kube.core.read_namespaced_pod(pod.metadata.name, kube.ns)
    os.kill(real_node.container_pid(container_id(pod, "fetch")), 9)
    killed_at = part.stat().st_size

    wait_for(lambda: kube.is_ready("resume"), LOAD_S, "resume Ready after the fetch was killed and restarted")
    pod = kube.core.read_namespaced_pod(pod.metadata.name, kube.ns)
    fetch = next(c for c in pod.status.init_container_statuses if c.name == "fetch")
    assert fetch.restart_count >= 1 and fetch.state.terminated.exit_code == 0
    resumed = kubectl("-n", kube.ns, "logs", pod.metadata.name, "-c", "fetch").stdout
    assert "resuming at" in resumed, resumed
    served = kubectl("-n", kube.ns, "logs", "slow-server").stdout
    starts = [int(line.rsplit("start=", 1)[1]) for line in served.splitlines() if "start=" in line]
    assert starts[0] == 0 and any(s >= killed_at - 1024 * 1024 for s in starts[1:]), (killed_at, served)
    assert chat(kube.service_ip("resume")).strip()
    kube.delete("resume")


def test_drain_respects_the_pod_disruption_budget(kube, model_url, node):
    kube.create("pair", spec(model_url(MODEL_FILE), concurrency=1, replicas=2))
    wait_for(lambda: kube.is_ready("pair") and len(kube.ready_pods("pair")) == 2, LOAD_S, "two replicas Ready")
    pdb = kubectl("-n", kube.ns, "get", "pdb", "pair", "-o", "jsonpath={.spec.maxUnavailable}").stdout
    assert pdb == "1"
    before = {p.metadata.name for p in kube.ready_pods("pair")}
    # One node: the first eviction is allowed, the second is refused by the PDB for as long as the
    # evicted replica cannot come back (the node is cordoned), so the drain times out with one pod left.
    drain = kubectl("drain", node["name"], "--pod-selector=app.kubernetes.io/instance=pair",
                    "--delete-emptydir-data", "--ignore-daemonsets", "--timeout=40s", check=False, timeout=120)
    try:
        assert drain.returncode != 0, drain.stdout
        assert "disruption budget" in drain.stderr, drain.stderr
        left = {p.metadata.name for p in kube.pods("pair") if not p.metadata.deletion_timestamp
                and p.status.phase == "Running"}
        assert len(left) == 1 and left <= before, (left, before)
        assert chat(kube.service_ip("pair")).strip()  # the Service still answers during the drain
    finally:
        kubectl("uncordon", node["name"])
    wait_for(lambda: len(kube.ready_pods("pair")) == 2, LOAD_S, "both replicas back after uncordon")
    kube.delete("pair")
