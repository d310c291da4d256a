"""Fixtures for the end-to-end scenarios on a real node: the control plane, the image built from the
Dockerfile (`make image`), a kubelet node running it in containerd, a model file server the pods reach,
the operator installed in the cluster from manifests/, and a namespace per test module. A failing test
gets the kubelet's, containerd's and kube-proxy's log tails, the operator's log and every container's log
in the test's namespace attached to its report. Fixture names are documented in e2e/README.md."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gearshift.e2e.cluster.local import REPO, ensure_cluster
from gearshift.e2e.cluster.wait import wait_for

RUN_DIR = REPO / ".cache" / "e2e" / time.strftime("%Y%m%d-%H%M%S")
KEEP_RUNS = 3  # earlier runs' directories (logs, pod volumes) are pruned beyond this
OPERATOR_NS, OPERATOR_DEPLOY = "gearshift-system", "gearshift-operator"
_STATE: dict[str, Any] = {"namespaces": []}  # what a failing test's report shows logs of


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
    """kubectl against the e2e cluster (admin); raises with stderr on failure when `check`."""
    try:
        proc = subprocess.run(["kubectl", f"--kubeconfig={_STATE['kubeconfig']}", *args], input=input, text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if check:
            raise
        return f"(kubectl {' '.join(args)}: no answer in {timeout:.0f} s)"
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _container_logs(ns: str) -> list[tuple[str, str]]:
    out = []
    pods = kubectl("-n", ns, "get", "pods", "-o",
                   "jsonpath={range .items[*]}{.metadata.name}{' '}{.spec.initContainers[*].name}"
                   "{' '}{.spec.containers[*].name}{'\\n'}{end}", check=False, timeout=20)
    for line in pods.splitlines():
        pod, *containers = line.split()
        for c in containers:
            for prev in ("", "--previous"):
                text = kubectl("-n", ns, "logs", pod, "-c", c, "--tail=40", *([prev] if prev else []),
                               check=False, timeout=20)
                if text.strip():
                    out.append((f"{ns}/{pod} container {c}{' (previous)' if prev else ''}", text))
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when not in ("setup", "call") or not rep.failed or "e2e" not in item.keywords \
            or "kubeconfig" not in _STATE:
        return
    from gearshift.e2e.cluster import node

    rep.sections.append(("node logs (kubelet, containerd, kube-proxy)", node.log_tails(40)))
    rep.sections.append(("operator log", kubectl("-n", OPERATOR_NS, "logs", f"deploy/{OPERATOR_DEPLOY}",
                                                 "--tail=60", check=False, timeout=20)))
    for ns in [*_STATE["namespaces"], OPERATOR_NS]:
        rep.sections.append((f"events {ns}", kubectl("-n", ns, "get", "events", "--sort-by=.lastTimestamp",
                                                     check=False, timeout=20)[-4000:]))
        for title, text in _container_logs(ns):
            rep.sections.append((title, text))


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    runs = sorted(p for p in RUN_DIR.parent.glob("2*") if p.is_dir() and p != RUN_DIR)
    for old in runs[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    _STATE["kubeconfig"] = ensure_cluster()
    return _STATE["kubeconfig"]


@pytest.fixture(scope="session")
def api(kubeconfig: Path):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="session")
def image() -> str:
    """The image the manifests name, built from the Dockerfile by `make image` (cached by its inputs)."""
    proc = subprocess.run([str(REPO / "e2e" / "image" / "build.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make image failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    manifest = next(line.split()[-1] for line in (REPO / "manifests" / "operator.yaml").read_text().splitlines()
                    if line.strip().startswith("image:"))
    return manifest


@pytest.fixture(scope="session")
def node(kubeconfig: Path, image: str) -> Iterator[dict[str, Any]]:
    """The real node (kubelet + containerd) with `image` imported; yields {name, logs}. Stopped at the end
    of the session (the control plane stays)."""
    from gearshift.e2e.cluster import node as real_node

    name = real_node.ensure_node([image])
    yield {"name": name, "logs": real_node.LOGS}
    real_node.down()


@pytest.fixture(scope="session")
def model_url(node: dict[str, Any]) -> Iterator[Callable[[str], str]]:
    """http://10.43.0.1:PORT/<name> for files next to the bundled SmolLM2 GGUF (the real one), served from
    the host on the node's address: pods reach it through their bridge, nothing outside the machine does."""
    from gearshift.e2e.cluster.model_server import ModelServer
    from gearshift.e2e.cluster.pki import NODE_IP
    from gearshift.engine.bundled import bundled_model_path

    gguf = bundled_model_path()
    served = RUN_DIR / "models"
    served.mkdir(parents=True, exist_ok=True)
    link = served / gguf.name
    if not link.exists():
        link.symlink_to(gguf)
    with ModelServer(served, host=NODE_IP) as server:
        yield server.url


@pytest.fixture(scope="module")
def namespace(api) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"gearshift.dev/e2e": "true"}}})
    _STATE["namespaces"].append(name)

    # v1.20 refuses a pod ("No API token found for service account") until the token controller has
    # minted the namespace's default ServiceAccount token; on a loaded machine that takes seconds.
    def default_sa_has_token() -> bool:
        try:
            return bool(core.read_namespaced_service_account("default", name).secrets)
        except client.ApiException:
            return False

    wait_for(default_sa_has_token, 60, f"the default ServiceAccount token in {name}")
    yield name
    core.delete_namespace(name)
    _STATE["namespaces"].remove(name)


class InClusterOperator:
    """The operator as users run it: `kubectl apply -k manifests/`, its Deployment's pod on the node, its
    ServiceAccount's token and RBAC, watching every namespace."""

    def install(self) -> None:
        kubectl("apply", "-k", str(REPO / "manifests"))
        # tests/test_operator_cluster.py scales it to 0 (it runs the operator as a process): undo that.
        kubectl("-n", OPERATOR_NS, "scale", "deployment", OPERATOR_DEPLOY, "--replicas=1")
        kubectl("wait", "--for=condition=Established", "crd/inferenceservices.gearshift.dev", "--timeout=60s")
        self.wait_ready()

    def wait_ready(self) -> None:
        try:
            kubectl("-n", OPERATOR_NS, "rollout", "status", f"deployment/{OPERATOR_DEPLOY}", "--timeout=180s",
                    timeout=200)
        except RuntimeError as e:
            # Why it never became ready is usually on the node (DiskPressure, MemoryPressure) or in the pods'
            # status (Evicted, ImagePullBackOff): say it in the failure, not only in the logs below it.
            nodes = kubectl("get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}:{range "
                            ".status.conditions[?(@.status==\"True\")]} {.type}{end}; {end}", check=False)
            pods = kubectl("-n", OPERATOR_NS, "get", "pods", "-o", "wide", check=False)
            raise RuntimeError(f"{e}\nnode conditions that hold: {nodes}\noperator pods:\n{pods}") from e

    def pod(self) -> str:
        return kubectl("-n", OPERATOR_NS, "get", "pods", "-l", f"app.kubernetes.io/name={OPERATOR_DEPLOY}",
                       "--field-selector=status.phase=Running", "-o", "jsonpath={.items[0].metadata.name}")

    def restart(self) -> None:
        """Delete its pod; the Deployment (Recreate) starts a new one."""
        old = self.pod()
        kubectl("-n", OPERATOR_NS, "delete", "pod", old, "--wait=false")
        wait_for(lambda: self.pod() not in ("", old), 120, "a new operator pod")
        self.wait_ready()

    def logs(self, tail: int = 200) -> str:
        return kubectl("-n", OPERATOR_NS, "logs", f"deploy/{OPERATOR_DEPLOY}", f"--tail={tail}", check=False)


@pytest.fixture(scope="module")
def kube(api, namespace: str, operator: InClusterOperator):
    """gearshift.e2e.cluster.scenario.Kube bound to this module's namespace, the operator running."""
    from gearshift.e2e.cluster.scenario import Kube

    return Kube(api, namespace)


@pytest.fixture(scope="session")
def operator(kubeconfig: Path, node: dict[str, Any]) -> InClusterOperator:
    """The operator from manifests/ running in the cluster (on the real node) with its ServiceAccount."""
    op = InClusterOperator()
    op.install()
    return op
