"""Helpers the e2e scenarios share (tests in e2e/ get a `Kube` bound to their namespace from the `kube`
fixture): InferenceService CRUD and conditions, the pods and Service of a resource, an OpenAI client
through the ClusterIP Service, the engine container's host process, and the hardening check."""

from __future__ import annotations

import ipaddress
from typing import Any

from gearshift.e2e.cluster.node import container_pid, exec_in

GROUP, VERSION, PLURAL = "gearshift.dev", "v1alpha1", "inferenceservices"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2"
LOAD_S = 300  # download + load + readiness on 2 shared cores, generously
POD_NET = ipaddress.ip_network("10.244.0.0/24")  # the node's CNI bridge
PORT = 8000  # the Service's port (operator/builders.py)


class Kube:
    """Small helpers bound to one namespace (admin credentials)."""

    def __init__(self, api: Any, namespace: str):  # noqa: ANN401 - a kubernetes ApiClient
        from kubernetes import client

        self.ns = namespace
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def isvc(self, name: str = NAME) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
                "metadata": {"name": name, "namespace": self.ns}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def condition(self, ctype: str, name: str = NAME) -> dict[str, Any]:
        for c in (self.isvc(name).get("status") or {}).get("conditions") or []:
            if c["type"] == ctype:
                return c
        return {}

    def pods(self, name: str = NAME) -> list:
        sel = f"app.kubernetes.io/instance={name}"
        return self.core.list_namespaced_pod(self.ns, label_selector=sel).items

    def ready_pods(self, name: str = NAME) -> list:
        return [p for p in self.pods(name) if not p.metadata.deletion_timestamp and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]

    def service_ip(self, name: str = NAME) -> str:
        """The Service's ClusterIP: kube-proxy sends each connection to one of its ready endpoints."""
        return self.core.read_namespaced_service(name, self.ns).spec.cluster_ip

    def assert_no_duplicates(self, name: str = NAME) -> None:
        """One Deployment, one Service, one ReplicaSet with replicas and one live pod for the resource."""
        sel = f"app.kubernetes.io/instance={name}"
        assert len(self.apps.list_namespaced_deployment(self.ns, label_selector=sel).items) == 1
        assert len(self.core.list_namespaced_service(self.ns, label_selector=sel).items) == 1
        live_rs = [rs for rs in self.apps.list_namespaced_replica_set(self.ns, label_selector=sel).items
                   if rs.spec.replicas]
        assert len(live_rs) == 1
        assert len([p for p in self.pods(name) if not p.metadata.deletion_timestamp]) == 1

    def is_ready(self, name: str = NAME) -> bool:
        """Ready, not Progressing, and the status is of the current generation."""
        obj = self.isvc(name)
        st = obj.get("status") or {}
        return st.get("observedGeneration") == obj["metadata"]["generation"] and \
            self.condition("Ready", name).get("status") == "True" and \
            self.condition("Progressing", name).get("status") == "False"


def spec(uri: str, concurrency: int, **extra: Any) -> dict[str, Any]:
    """An InferenceService spec for the bundled model at `uri`. 500m CPU: two resources, a surge pod and
    the operator fit the 2-core node's allocatable CPU."""
    return {"model": {"uri": uri, "servedName": NAME}, "concurrency": concurrency,
            "hardware": {"cpu": "500m", "memory": "2Gi"}, "engineArgs": {"maxModelLen": 512}, **extra}


def openai_client(ip: str):  # noqa: ANN201 - openai.OpenAI, imported lazily
    from openai import OpenAI

    return OpenAI(base_url=f"http://{ip}:{PORT}/v1", api_key="e2e", max_retries=0, timeout=120)


def chat(ip: str, text: str = "Say hello.", max_tokens: int = 8) -> str:
    r = openai_client(ip).chat.completions.create(model=NAME, max_tokens=max_tokens, temperature=0,
                                                  messages=[{"role": "user", "content": text}])
    assert r.model == NAME
    assert r.choices[0].finish_reason in ("stop", "length")
    return r.choices[0].message.content or ""


def container_id(pod: Any, name: str = "engine") -> str:  # noqa: ANN401 - a V1Pod
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
    return next(c.container_id for c in statuses if c.name == name)


def engine_pid(pod: Any) -> int:  # noqa: ANN401 - a V1Pod
    """The engine container's main process on the host (containerd's task)."""
    return container_pid(container_id(pod))


_PROBE = ("import os\n"
          "print(os.getuid(), os.getgid())\n"
          "print(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff:', 'Seccomp:'))])\n"
          "try:\n    open('/opt/gearshift/x', 'w')\nexcept OSError as e:\n    print(e.errno)\n")


def assert_hardened(pod: Any) -> None:  # noqa: ANN401 - a V1Pod
    """The engine runs as the operator wrote it: uid 1000, no capabilities, a read-only root filesystem,
    seccomp on; the only writable places are its volumes."""
    out = exec_in(pod.metadata.namespace, pod.metadata.name, "engine", ["python3", "-c", _PROBE]).splitlines()
    assert out[0] == "1000 1000", out
    assert out[1] == "0000000000000000 2", out  # no effective capabilities; seccomp in filter mode
    assert out[2] == "30", out  # EROFS: the root filesystem is read-only
