"""A model store inside the cluster, as a company network has one: a test pod of our image serving the
bundled GGUF over https:// with a certificate from a private CA, behind its ClusterIP Service, throttled so a
download can be interrupted, logging each request's Range. The CA goes into a ConfigMap that an
InferenceService names in `spec.model.caConfigMapRef`. Used by the https fetch and the fetch-resume scenarios."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gearshift.e2e.cluster.local import REPO
from gearshift.e2e.cluster.pki import private_ca_server_cert
from gearshift.e2e.cluster.scenario import MODEL_FILE
from gearshift.e2e.cluster.wait import wait_for

PORT = 8443


@dataclass(frozen=True)
class ModelPod:
    name: str
    url: str  # https://<ClusterIP>/<bundled GGUF>
    ca_config_map: str  # ConfigMap with the private CA under key ca.crt


def serve_model_pod(kube: Any, image: str, name: str, rate: int, workdir: Path) -> ModelPod:  # noqa: ANN401
    """Start the pod `name` (Service, ConfigMap `<name>-ca`, Secret `<name>`) serving at `rate` bytes/s."""
    from gearshift.engine.bundled import bundled_model_path

    kube.core.create_namespaced_service(kube.ns, {"metadata": {"name": name}, "spec": {
        "selector": {"app": name}, "ports": [{"port": 443, "targetPort": PORT}]}})
    ip = kube.service_ip(name)
    ca, cert, key = private_ca_server_cert(workdir, f"IP:{ip}")  # the certificate names the ClusterIP
    kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": f"{name}-ca"},
                                                     "data": {"ca.crt": ca.read_text()}})
    kube.core.create_namespaced_secret(kube.ns, {"metadata": {"name": name}, "data": {
        "tls.crt": _b64(cert), "tls.key": _b64(key), "server.py": _b64(REPO / "e2e" / "slow_model_server.py")}})
    kube.core.create_namespaced_pod(kube.ns, _pod(name, image, rate, bundled_model_path().parent))
    wait_for(lambda: any(c.type == "Ready" and c.status == "True" for c in
                         kube.core.read_namespaced_pod(name, kube.ns).status.conditions or []),
             120, f"the TLS model server {name} Ready")
    return ModelPod(name=name, url=f"https://{ip}/{MODEL_FILE}", ca_config_map=f"{name}-ca")


def _pod(name: str, image: str, rate: int, models: Path) -> dict[str, Any]:
    """Hardened like the operator's pods: non-root, read-only root filesystem, no capabilities."""
    return {"metadata": {"name": name, "labels": {"app": name}},
            "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "server", "image": image, "imagePullPolicy": "IfNotPresent",
                                     "command": ["python3", "/srv/server.py", "/models", str(PORT), str(rate),
                                                 "/srv/tls.crt", "/srv/tls.key"],
                                     "ports": [{"containerPort": PORT}],
                                     "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
                                     "securityContext": {"readOnlyRootFilesystem": True,
                                                         "allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}},
                                     "volumeMounts": [{"name": "srv", "mountPath": "/srv", "readOnly": True},
                                                      {"name": "models", "mountPath": "/models", "readOnly": True}]}],
                     "volumes": [{"name": "srv", "secret": {"secretName": name, "defaultMode": 0o440}},
                                 {"name": "models", "hostPath": {"path": str(models)}}]}}


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
