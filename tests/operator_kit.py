"""What the operator's cluster tests share: kubectl, waiting, the operator as a process, and a private
kube-apiserver that a test may stop and restart (faults) without touching the shared one.

The private API server is a second kube-apiserver process on the local cluster's etcd (an HA pair, as
in a real control plane): the operator under test talks only to it, while the test and every other
test run keep using the shared one. Stopping it is a real outage for the operator; starting it again is
a real API server restart (empty watch cache: watches resumed from an old resourceVersion get 410 Gone).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GEARSHIFT = str(Path(sys.executable).parent / "gearshift")
API = "gearshift.dev/v1alpha1"
MODEL = "https://127.0.0.1:9/models/smollm2.Q4_1.gguf"


def wait(check: Callable[[], Any], what: str, timeout: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.4)
    pytest.fail(f"timed out waiting for {what}; last: {last}")


def kubectl(kubeconfig: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=input, text=True,
                       capture_output=True, timeout=60)
    if check and r.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {r.stderr}")
    return r


def isvc(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"uri": MODEL})
    return {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": name}, "spec": spec}


def create(c: dict[str, Any], obj: dict[str, Any]) -> None:
    kubectl(c["kubeconfig"], "-n", c["ns"], "apply", "-f", "-", input=yaml.safe_dump(obj))


def get(c: dict[str, Any], api_version: str, kind: str, name: str) -> dict[str, Any] | None:
    return c["admin"].get(api_version, kind, c["ns"], name)


def owner(c: dict[str, Any], name: str) -> dict[str, Any]:
    obj = get(c, API, "InferenceService", name)
    assert obj is not None
    return obj


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return cond
    return {}


def events(c: dict[str, Any], name: str, reason: str | None = None) -> list[dict[str, Any]]:
    items = c["admin"].request("GET", f"/api/v1/namespaces/{c['ns']}/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == "InferenceService"
            and (reason is None or e["reason"] == reason)]


def start_operator(kubeconfig: Path, ns: str, log: Path, resync_seconds: float = 3.0) -> subprocess.Popen:
    """`gearshift operator` as its Deployment runs it (the SA kubeconfig), with a short resync."""
    return subprocess.Popen([GEARSHIFT, "operator", "--kubeconfig", str(kubeconfig), "--namespace", ns,
                             "--resync-seconds", str(resync_seconds), "--image", "gearshift:test"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONSAFEPATH": "1"})


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop a process started with start_new_session=True: `sig` to its group, SIGKILL after `timeout` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PrivateAPIServer:
    """A second kube-apiserver of the local cluster (same etcd, same certificates) on a port of its own."""

    def __init__(self, work: Path) -> None:
        from gearshift.e2e.cluster import local

        if os.environ.get("KUBECONFIG") and Path(os.environ["KUBECONFIG"]) != local.KUBECONFIG:
            pytest.skip("API server faults need the local control plane (KUBECONFIG names another cluster)")
        local.ensure_cluster()  # its certificates and etcd must exist before they are shared
        self.work = work
        host = urlsplit(local.SERVER).hostname or "127.0.0.1"  # the address the shared one binds
        self.port = free_port(host)
        pki = work / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        state_pki = str(local.STATE / "pki")
        for f in (local.STATE / "pki").iterdir():
            if f.is_file():
                shutil.copy(f, pki / f.name)
        # Copies of the keys, so no argument names the shared state directory: the cluster's own process
        # lookup (local._alive) must never take this process for the shared API server, or stop it.
        self.argv = [a.replace(state_pki, str(pki)) if state_pki in a else a
                     for a in local._command("kube-apiserver")]
        self.argv = [f"--secure-port={self.port}" if a.startswith("--secure-port=") else a for a in self.argv]
        # Never the `kubernetes` Service's endpoints: on the shared etcd, its lease reconciler wrote its own
        # port there (same IP as the shared server), which stayed after it stopped, so pods reaching
        # kubernetes.default (the in-cluster operator of the e2e tests that run later) were refused.
        self.argv.append("--endpoint-reconciler-type=none")
        self.server = f"https://{host}:{self.port}"
        self.log = work / "private-apiserver.log"
        self.proc: subprocess.Popen | None = None

    def start(self, admin_kubeconfig: Path) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.work)
        kc = self.kubeconfig_for(admin_kubeconfig, self.work / "admin-private.kubeconfig")
        wait(lambda: self.proc.poll() is None and kubectl(kc, "get", "--raw", "/readyz", check=False).returncode == 0,
             "the private kube-apiserver", timeout=180)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout=30)

    def kubeconfig_for(self, kubeconfig: Path, out: Path) -> Path:
        """A copy of `kubeconfig` whose clusters point at this API server."""
        cfg = yaml.safe_load(kubeconfig.read_text())
        for c in cfg["clusters"]:
            c["cluster"]["server"] = self.server
        out.write_text(yaml.safe_dump(cfg))
        return out


@contextmanager
def operator_cluster(work: Path, private: PrivateAPIServer | None = None) -> Iterator[dict[str, Any]]:
    """The CRD + RBAC from manifests/, a namespace of our own, and the operator running with the SA token
    (talking to `private` when given). Yields the dict the helpers above take."""
    from gearshift.e2e.cluster.local import ensure_cluster
    from gearshift.e2e.cluster.operator_process import OperatorProcess
    from gearshift.operator.apply import Kube
    from kubernetes import config

    kubeconfig = ensure_cluster()
    ns = f"gs-it-{uuid.uuid4().hex[:6]}"
    kubectl(kubeconfig, "create", "namespace", ns)
    op = OperatorProcess(kubeconfig, REPO / "manifests", work, namespaces=[ns])
    op.install()  # kubectl apply -k manifests/ (CRD included), operator Deployment scaled to 0, SA token
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/inferenceservices.gearshift.dev",
            "--timeout=60s")
    op_kubeconfig = op.sa_kubeconfig
    log = work / "operator.log"
    admin = Kube(config.new_client_from_config(config_file=str(kubeconfig)))
    c: dict[str, Any] = {"kubeconfig": kubeconfig, "ns": ns, "admin": admin, "log": log, "private": private}
    try:
        if private is not None:
            private.start(kubeconfig)
            op_kubeconfig = private.kubeconfig_for(op.sa_kubeconfig, work / "operator-private.kubeconfig")
        c["op_kubeconfig"] = op_kubeconfig
        c["proc"] = start_operator(op_kubeconfig, ns, log)
        yield c
    finally:
        if "proc" in c:
            stop_group(c["proc"])
        if private is not None:
            private.stop()
        kubectl(kubeconfig, "delete", "namespace", ns, "--wait=false", check=False)
        sys.stderr.write("operator log tail:\n" + log_tail(log))
