"""An https:// model on a server whose certificate a private CA signed (a model store inside a company
network): the fetch init container refuses it until the InferenceService names the CA's ConfigMap
(`spec.model.caConfigMapRef`), then the model serves. The server is a test pod behind its ClusterIP."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from gearshift.e2e.cluster.local import REPO
from gearshift.e2e.cluster.pki import private_ca_server_cert
from gearshift.e2e.cluster.scenario import LOAD_S, MODEL_FILE, chat, spec
from gearshift.e2e.cluster.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PORT = 8443


@pytest.fixture(scope="module")
def tls_model_url(kube, image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A pod of our image serving the bundled GGUF over TLS; the private CA is in ConfigMap `model-ca`."""
    from gearshift.engine.bundled import bundled_model_path

    kube.core.create_namespaced_service(kube.ns, {"metadata": {"name": "tls-models"}, "spec": {
        "selector": {"app": "tls-models"}, "ports": [{"port": 443, "targetPort": PORT}]}})
    ip = kube.service_ip("tls-models")
    ca, cert, key = private_ca_server_cert(tmp_path_factory.mktemp("model-ca"), f"IP:{ip}")
    kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "model-ca"},
                                                     "data": {"ca.crt": ca.read_text()}})
    kube.core.create_namespaced_secret(kube.ns, {"metadata": {"name": "tls-models"}, "data": {
        "tls.crt": _b64(cert), "tls.key": _b64(key),
        "server.py": _b64(REPO / "e2e" / "slow_model_server.py")}})
    pod = {"metadata": {"name": "tls-models", "labels": {"app": "tls-models"}},
           "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "server", "image": image, "imagePullPolicy": "IfNotPresent",
                                    "command": ["python3", "/srv/server.py", "/models", str(PORT), str(256 * 2**20),
                                                "/srv/tls.crt", "/srv/tls.key"],
                                    "ports": [{"containerPort": PORT}],
                                    "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
                                    "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                                        "capabilities": {"drop": ["ALL"]}},
                                    "volumeMounts": [{"name": "srv", "mountPath": "/srv", "readOnly": True},
                                                     {"name": "models", "mountPath": "/models", "readOnly": True}]}],
                    "volumes": [{"name": "srv", "secret": {"secretName": "tls-models", "defaultMode": 0o440}},
                                {"name": "models", "hostPath": {"path": str(bundled_model_path().parent)}}]}}
    kube.core.create_namespaced_pod(kube.ns, pod)
    wait_for(lambda: any(c.type == "Ready" and c.status == "True" for c in
                         kube.core.read_namespaced_pod("tls-models", kube.ns).status.conditions or []),
             120, "the TLS model server Ready")
    return f"https://{ip}/{MODEL_FILE}"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_untrusted_certificate_is_a_clear_download_failure(kube, tls_model_url):
    kube.create("untrusted", spec(tls_model_url, concurrency=1))
    cond = wait_for(lambda: kube.condition("ModelReady", "untrusted").get("reason") == "DownloadFailed"
                    and kube.condition("ModelReady", "untrusted"), 180, "ModelReady=False DownloadFailed")
    assert cond["status"] == "False"
    assert "TLS certificate not trusted" in cond["message"] and "caConfigMapRef" in cond["message"], cond
    kube.delete("untrusted")


def test_private_ca_from_a_config_map_is_trusted(kube, tls_model_url):
    kube.create("private-ca", spec(tls_model_url, concurrency=1) | {
        "model": {"uri": tls_model_url, "servedName": "smollm2", "caConfigMapRef": {"name": "model-ca"}}})
    wait_for(lambda: kube.is_ready("private-ca"), LOAD_S, "private-ca Ready")
    assert chat(kube.service_ip("private-ca")).strip()
    kube.delete("private-ca")
