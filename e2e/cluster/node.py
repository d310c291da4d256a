"""A real Kubernetes node beside the local control plane: kubelet + kube-proxy (built with it by
build.sh), containerd + runc + the CNI bridge from Debian, and images imported into containerd.

`ensure_node(images)` starts it (node_up.sh; idempotent) and returns its name; `down()` stops it and
deletes the Node (node_down.sh). State and logs live in `<cluster state>/node/` (logs/: containerd,
kubelet, kube-proxy). Root is needed (containerd, iptables, an address on lo).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gearshift.e2e.cluster import local
from gearshift.e2e.cluster.pki import NODE_IP, NODE_NAME, kubeconfig_text

HERE = Path(__file__).resolve().parent
NODE_DIR = local.STATE / "node"
LOGS = NODE_DIR / "logs"


class NodeError(RuntimeError):
    """The node did not come up; the message carries the tails of its logs."""


def _env() -> dict[str, str]:
    return {**os.environ, "STATE": str(local.STATE), "BIN": str(local.BIN), "NODE_IP": NODE_IP,
            "API_PORT": str(local.API_PORT), "NODE_NAME": NODE_NAME}


def log_tails(lines: int = 30) -> str:
    out = []
    for name in ("kubelet", "containerd", "kube-proxy"):
        path = LOGS / f"{name}.log"
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path} ---\n" + "\n".join(tail))
    return "\n".join(out)


def ensure_node(images: list[str]) -> str:
    """Start the node (if not running) with `images` (podman names) in containerd; returns the node name."""
    kubeconfig = local.ensure_cluster()
    if kubeconfig != local.KUBECONFIG:
        raise NodeError(f"the real node joins only our own control plane, not $KUBECONFIG={kubeconfig}")
    pki = local.STATE / "pki"
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    (NODE_DIR / "kubelet.kubeconfig").write_text(kubeconfig_text(local.SERVER, pki, "node"))
    (NODE_DIR / "kube-proxy.kubeconfig").write_text(kubeconfig_text(local.SERVER, pki, "kube-proxy"))
    proc = subprocess.run([str(HERE / "node_up.sh"), *images], env=_env())
    if proc.returncode != 0:
        raise NodeError(f"node_up.sh failed ({proc.returncode})\n{log_tails()}")
    return NODE_NAME


def running() -> bool:
    pid = NODE_DIR / "kubelet.pid"
    return pid.exists() and Path(f"/proc/{pid.read_text().strip()}").exists()


def down() -> None:
    """Stop the node if node_up.sh started one here (nothing otherwise)."""
    if not (NODE_DIR / "containerd.pid").exists() and not (NODE_DIR / "kubelet.pid").exists():
        return
    subprocess.run([str(HERE / "node_down.sh")], env=_env())


def container_pid(container_id: str) -> int:
    """The host pid of a running container (`containerd://<id>` from a pod's status), from containerd."""
    cid = container_id.rsplit("/", 1)[-1]
    out = subprocess.run(["ctr", "-n", "k8s.io", "tasks", "ls"], capture_output=True, text=True, check=True,
                         env={**os.environ, "CONTAINERD_ADDRESS": str(NODE_DIR / "containerd" / "containerd.sock")})
    for line in out.stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid and fields[2] == "RUNNING":
            return int(fields[1])
    raise LookupError(f"no running containerd task {cid}")


def exec_in(namespace: str, pod: str, container: str, argv: list[str]) -> str:
    """`kubectl exec` (through the API server and the kubelet) -> stdout; raises on a non-zero exit."""
    proc = subprocess.run(["kubectl", f"--kubeconfig={local.KUBECONFIG}", "-n", namespace, "exec", pod,
                           "-c", container, "--", *argv], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"exec in {namespace}/{pod}/{container} failed: {proc.stderr.strip()}")
    return proc.stdout
