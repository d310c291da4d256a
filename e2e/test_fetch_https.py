"""An https:// model on a server whose certificate a private CA signed (a model store inside a company
network): the fetch init container refuses it until the InferenceService names the CA's ConfigMap
(`spec.model.caConfigMapRef`), then the model serves. The server is a test pod behind its ClusterIP."""

from __future__ import annotations

import pytest
from gearshift.e2e.cluster.model_pod import ModelPod, serve_model_pod
from gearshift.e2e.cluster.scenario import LOAD_S, chat, spec
from gearshift.e2e.cluster.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tls_models(kube, image: str, tmp_path_factory: pytest.TempPathFactory) -> ModelPod:
    """A pod of our image serving the bundled GGUF over TLS (256 MiB/s); the private CA in a ConfigMap."""
    return serve_model_pod(kube, image, "tls-models", 256 * 2**20, tmp_path_factory.mktemp("model-ca"))


def test_untrusted_certificate_is_a_clear_download_failure(kube, tls_models):
    kube.create("untrusted", spec(tls_models.url, concurrency=1))
    cond = wait_for(lambda: kube.condition("ModelReady", "untrusted").get("reason") == "DownloadFailed"
                    and kube.condition("ModelReady", "untrusted"), 180, "ModelReady=False DownloadFailed")
    assert cond["status"] == "False"
    assert "TLS certificate not trusted" in cond["message"] and "caConfigMapRef" in cond["message"], cond
    kube.delete("untrusted")


def test_private_ca_from_a_config_map_is_trusted(kube, tls_models):
    kube.create("private-ca", spec(tls_models.url, concurrency=1) | {
        "model": {"uri": tls_models.url, "servedName": "smollm2", "caConfigMapRef": {"name": tls_models.ca_config_map}}})
    wait_for(lambda: kube.is_ready("private-ca"), LOAD_S, "private-ca Ready")
    assert chat(kube.service_ip("private-ca")).strip()
    kube.delete("private-ca")
