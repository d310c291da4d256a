"""A local Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager +
kube-scheduler as plain processes, no Docker. The API server listens on 10.43.0.1, an address put on `lo`
(pods reach it through their bridge; nothing outside the machine does); a real node joins it on demand
(`gearshift.e2e.cluster.node`).

`ensure_cluster()` is the one entry point for tests: it returns a kubeconfig path. If `KUBECONFIG` points
at a reachable cluster (kind, minikube, a real one) it returns that and starts nothing. Otherwise it builds
the binaries once (`e2e/cluster/build.sh`, cached in ~/.cache/gearshift/kube/bin), starts the processes
detached (they outlive the test run so the next run reuses them; `down()` / `make cluster-down` stops
them) and waits until the API answers and ServiceAccount tokens are being minted.

State lives in `<repo>/.cache/cluster/` (or $GEARSHIFT_CLUSTER_DIR): pki/, kubeconfig, etcd data, logs/,
Ports: API $GEARSHIFT_API_PORT (16443) on 10.43.0.1, etcd $GEARSHIFT_ETCD_PORT (23790) and +10 on 127.0.0.1.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from gearshift.e2e.cluster.pki import NODE_IP, ensure_pki, kubeconfig_text

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("GEARSHIFT_CLUSTER_DIR", REPO / ".cache" / "cluster"))
KUBECONFIG = STATE / "kubeconfig"
BIN = Path(os.environ.get("GEARSHIFT_KUBE_CACHE", Path.home() / ".cache" / "gearshift" / "kube")) / "bin"
API_PORT = int(os.environ.get("GEARSHIFT_API_PORT", "16443"))
ETCD_PORT = int(os.environ.get("GEARSHIFT_ETCD_PORT", "23790"))
SERVER = f"https://{NODE_IP}:{API_PORT}"
# Start order; `down` stops in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message names the log to read."""


def _command(name: str) -> list[str]:
    pki = STATE / "pki"
    kc = str(KUBECONFIG)
    if name == "etcd":
        peer = f"http://127.0.0.1:{ETCD_PORT + 10}"
        return [shutil.which("etcd") or "/usr/bin/etcd", "--name=gearshift", f"--data-dir={STATE / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
                f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=gearshift={peer}", "--log-level=warn"]
    if name == "kube-apiserver":
        return [str(BIN / name), f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
                f"--bind-address={NODE_IP}", f"--advertise-address={NODE_IP}", f"--secure-port={API_PORT}",
                "--insecure-port=0", f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/16", "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                # logs/exec/port-forward: the API server is a client of the kubelet
                f"--kubelet-client-certificate={pki / 'admin.crt'}", f"--kubelet-client-key={pki / 'admin.key'}",
                "--kubelet-preferred-address-types=InternalIP,Hostname", "--allow-privileged=true", "--v=1"]
    common = [str(BIN / name), f"--kubeconfig={kc}", "--leader-elect=false", "--port=0",
              "--secure-port=0", "--v=1"]
    if name == "kube-controller-manager":
        # The token controller (root CA + signing key) mints the ServiceAccount token Secrets (v1.20).
        return common + [f"--root-ca-file={pki / 'ca.crt'}",
                         f"--service-account-private-key-file={pki / 'sa.key'}",
                         "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service",
                         "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10"]
    if name == "kube-scheduler":
        return common
    raise KeyError(name)


def _alive(name: str) -> int | None:
    """The pid of our running `name`: a process whose program is `name` and whose arguments name our
    state directory. Found in /proc, not in a pid file, so a lost or stale file can never make us start
    a second copy next to a live one (or kill somebody else's)."""
    marker = (str(STATE) + "/").encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(name.encode()) and any(marker in a for a in argv[1:]):
            return int(proc.name)
    return None


def _port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _ensure_address() -> None:
    """NODE_IP on `lo` (a `dummy` link is not available in every kernel): pods cannot reach 127.0.0.1."""
    shown = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    if f" {NODE_IP}/" in shown:
        return
    proc = subprocess.run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo", "label", "lo:gearshift"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"cannot add {NODE_IP}/32 to lo (root needed): {proc.stderr.strip()}")


def reachable(kubeconfig: str | Path, timeout: float = 5.0) -> bool:
    """True when the cluster in `kubeconfig` answers /version."""
    from kubernetes import client, config

    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        client.VersionApi(api).get_code(_request_timeout=timeout)
        return True
    except Exception:  # any failure to talk to it means: not usable
        return False


def alive() -> bool:
    """True when all our components' processes run (answering or not)."""
    return all(_alive(c) for c in COMPONENTS)


def running() -> bool:
    """True when all our components run and the API answers."""
    return all(_alive(c) for c in COMPONENTS) and KUBECONFIG.exists() and reachable(KUBECONFIG, 15)


@contextmanager
def _locked():
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / ".lock", "w") as f:  # concurrent test sessions must not start two clusters
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build() -> None:
    if (BIN / "BUILD-INFO").is_file() and all((BIN / c).is_file() for c in (*COMPONENTS[1:], "kubelet", "kube-proxy")) and \
            (shutil.which("etcd") or Path("/usr/bin/etcd").exists()):
        return
    script = REPO / "e2e" / "cluster" / "build.sh"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = subprocess.run([str(script)], env=env)
    if proc.returncode != 0:
        raise ClusterError(f"{script} failed (exit {proc.returncode}); see its output above")


def _wait(until, what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; {log}:\n{tail}")


def _start(name: str) -> None:
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    log = STATE / "logs" / f"{name}.log"
    with open(log, "ab") as out:
        # A session of its own: the control plane outlives the test run that started it.
        proc = subprocess.Popen(_command(name), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=STATE)
    time.sleep(0.3)
    if proc.poll() is not None:
        raise ClusterError(f"{name} exited at once ({proc.returncode}); see {log}")


def _tokens_minted() -> bool:
    from kubernetes import client, config

    try:
        api = client.CoreV1Api(config.new_client_from_config(config_file=str(KUBECONFIG)))
        sa = api.read_namespaced_service_account("default", "default", _request_timeout=5)
        return bool(sa.secrets)
    except Exception:  # not there yet
        return False


def up() -> Path:
    """Start our control plane (building it first if needed); returns the kubeconfig path."""
    with _locked():
        if all(_alive(c) for c in COMPONENTS) and KUBECONFIG.exists():
            # Ours and alive: a slow answer (a loaded machine, another run's benchmark) is no reason to
            # restart it under the other test runs sharing it. Wait for it instead.
            _wait(lambda: reachable(KUBECONFIG, 10), "the running kube-apiserver to answer", 180,
                  STATE / "logs" / "kube-apiserver.log")
            return KUBECONFIG
        _build()
        _stop_all()  # a half-running cluster from a crash: start clean
        _ensure_address()
        for port, host in ((ETCD_PORT, "127.0.0.1"), (ETCD_PORT + 10, "127.0.0.1"), (API_PORT, NODE_IP)):
            if _port_taken(port, host):
                raise ClusterError(f"port {port} on {host} is taken by another program; set "
                                   "GEARSHIFT_API_PORT / GEARSHIFT_ETCD_PORT to free ones")
        shutil.rmtree(STATE / "etcd", ignore_errors=True)
        ensure_pki(STATE / "pki")
        KUBECONFIG.write_text(kubeconfig_text(SERVER, STATE / "pki"))
        _start("etcd")
        _start("kube-apiserver")
        _wait(lambda: reachable(KUBECONFIG, 2), "kube-apiserver", 120, STATE / "logs" / "kube-apiserver.log")
        _start("kube-controller-manager")
        _start("kube-scheduler")
        _wait(_tokens_minted, "ServiceAccount tokens (controller-manager)", 120,
              STATE / "logs" / "kube-controller-manager.log")
        for c in COMPONENTS:
            if not _alive(c):
                raise ClusterError(f"{c} died during start; see {STATE / 'logs' / (c + '.log')}")
        return KUBECONFIG


def _stop_all() -> None:
    for name in reversed(COMPONENTS):
        pid = _alive(name)
        if pid:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists() or _alive(name) is None:
                    break
                try:  # reap it if we are its parent (same process started it)
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def down() -> None:
    """Stop our real node, if up, and our control plane (a cluster given by $KUBECONFIG is never touched)."""
    from gearshift.e2e.cluster import node

    node.down()
    with _locked():
        _stop_all()


def ensure_cluster() -> Path:
    """A kubeconfig for a reachable cluster: $KUBECONFIG's if it answers, else ours (started if needed)."""
    external = os.environ.get("KUBECONFIG")
    if external and Path(external) != KUBECONFIG:
        if reachable(external):
            return Path(external)
    return up()
