"""The operator as a local process, installed from `manifests/` the way a user installs it.

`kubectl apply -k manifests/` creates the namespace, ServiceAccount, RBAC and the operator Deployment.
The Deployment is scaled to 0 (the test node runs only engine pods), and its container's command, args
and env run here as a process whose only credential is that ServiceAccount's token: the RBAC under test
is exactly what the manifests grant.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from gearshift.e2e.cluster.pki import token_kubeconfig_text
from gearshift.e2e.node.podspec import launch


def kubectl(kubeconfig: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=input, text=True,
                          capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ca_file(kubeconfig: Path, out_dir: Path) -> Path:
    """The cluster CA of the kubeconfig's current context, as a file (kind embeds it as data)."""
    cfg = yaml.safe_load(kubeconfig.read_text())
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    if cluster.get("certificate-authority"):
        return Path(cluster["certificate-authority"])
    path = out_dir / "ca.crt"
    path.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    return path


def _server(kubeconfig: Path) -> str:
    cfg = yaml.safe_load(kubeconfig.read_text())
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    return next(c["cluster"]["server"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])


class OperatorProcess:
    def __init__(self, kubeconfig: Path, manifests: Path, work: Path, namespaces: list[str],
                 ip: str = "127.0.0.1"):
        # Scoped to the test's namespaces: the cluster may be shared with other test runs and operators.
        self.kubeconfig, self.manifests, self.work, self.ip = kubeconfig, manifests, work, ip
        self.namespaces = namespaces
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = work / "operator.log"
        self.proc: subprocess.Popen | None = None
        objs = [o for o in yaml.safe_load_all(kubectl(kubeconfig, "kustomize", str(manifests))) if o]
        self.objects = objs
        self.deployment = next(o for o in objs if o["kind"] == "Deployment")
        self.namespace = self.deployment["metadata"]["namespace"]
        pod_spec = self.deployment["spec"]["template"]["spec"]
        self.service_account = pod_spec.get("serviceAccountName", "default")

    def install(self) -> None:
        """apply -k, scale the in-cluster operator to 0, and write a kubeconfig holding the SA token."""
        kubectl(self.kubeconfig, "apply", "-k", str(self.manifests))
        kubectl(self.kubeconfig, "-n", self.namespace, "scale", "deployment",
                self.deployment["metadata"]["name"], "--replicas=0")
        token = self._token()
        self.sa_kubeconfig = self.work / "operator.kubeconfig"
        self.sa_kubeconfig.write_text(token_kubeconfig_text(_server(self.kubeconfig),
                                                            _ca_file(self.kubeconfig, self.work), token,
                                                            self.namespace))

    def _token(self) -> str:
        """The ServiceAccount's token: its token Secret (v1.20's token controller), else a TokenRequest."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sa = json.loads(kubectl(self.kubeconfig, "-n", self.namespace, "get", "serviceaccount",
                                    self.service_account, "-o", "json"))
            for ref in sa.get("secrets") or []:
                secret = json.loads(kubectl(self.kubeconfig, "-n", self.namespace, "get", "secret",
                                            ref["name"], "-o", "json", check=False) or "{}")
                if secret.get("type") == "kubernetes.io/service-account-token" and secret.get("data", {}).get("token"):
                    return base64.b64decode(secret["data"]["token"]).decode()
            if time.monotonic() > deadline - 50:  # Kubernetes >= 1.24 mints no Secrets: ask for a token
                out = kubectl(self.kubeconfig, "-n", self.namespace, "create", "token", self.service_account,
                              "--duration=2h", check=False)
                if out.strip():
                    return out.strip()
            time.sleep(1)
        raise RuntimeError(f"no token for ServiceAccount {self.namespace}/{self.service_account}")

    def start(self) -> None:
        pod = {"metadata": {"name": "gearshift-operator-e2e", "namespace": self.namespace, "uid": "e2e"},
               "spec": self.deployment["spec"]["template"]["spec"]}
        container = pod["spec"]["containers"][0]

        def no_lookup(kind: str, ns: str, name: str) -> dict:
            raise KeyError(name)

        venv_bin = Path(sys.executable).parent
        dirs = {v["name"]: self.work / "volumes" / v["name"] for v in pod["spec"].get("volumes") or []}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        run = launch(pod, container, pod_ip=self.ip, dirs=dirs,
                     lookup=no_lookup, entrypoint=[str(venv_bin / "gearshift")],
                     base_env={"PATH": f"{venv_bin}:/usr/bin:/bin", "PYTHONSAFEPATH": "1",
                               "HOME": str(self.work)}, default_cwd=str(self.work))
        argv = [a for a in run.argv if not a.startswith("--liveness")]  # its port is not ours to take
        env = {k: v for k, v in run.env.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
        with open(self.log, "ab") as out:
            out.write(f"--- start: {' '.join(argv)} --kubeconfig {self.sa_kubeconfig}\n".encode())
            out.flush()
            scope = [a for ns in self.namespaces for a in ("--namespace", ns)]
            self.proc = subprocess.Popen([*argv, "--kubeconfig", str(self.sa_kubeconfig), *scope], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

