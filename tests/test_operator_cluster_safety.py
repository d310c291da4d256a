"""What a sloppy or hostile spec, or a stranger's object, does to the operator, on a real kube-apiserver:
every status it writes passes the CRD's own schema, it never adopts what it did not create, an apply the
API server rejects shows in status, and the CRD installs with `kubectl apply -f` as well as `-k`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from operator_kit import (
    API,
    REPO,
    condition,
    create,
    events,
    get,
    isvc,
    kubectl,
    operator_cluster,
    owner,
    wait,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with operator_cluster(tmp_path_factory.mktemp("operator")) as c:
        yield c


def reason_of(c: dict[str, Any], name: str) -> str | None:
    return condition(owner(c, name), "Ready").get("reason")


# ---------------------------------------------------------------------- item 15: status always valid

# Specs the CRD's schema accepts (the v1.20 server runs no CEL) but the operator's policy rejects: one of
# each kind of InvalidSpec, created fresh, so the first status the operator writes is the InvalidSpec one.
INVALID = {
    "gguf-safetensors": ({"engine": "gguf", "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}},
                         "spec.engine: gguf needs a .gguf model file"),
    "gguf-gpu": ({"engine": "gguf", "hardware": {"accelerator": "nvidia.com/gpu", "count": 1}},
                 "spec.engine: gguf runs on CPU only"),
    "wrong-engine-arg": ({"engine": "gguf", "engineArgs": {"dtype": "float16"}}, "spec.engineArgs.dtype"),
    "replicas-and-hpa": ({"replicas": 2, "autoscaling": {"maxReplicas": 3}}, "spec.replicas"),
    "count-no-accel": ({"hardware": {"count": 2}}, "spec.hardware.count"),
    "cpu-words": ({"hardware": {"cpu": "lots"}}, "spec.hardware.cpu"),
    "memory-tiny": ({"hardware": {"memory": "1Mi"}}, "spec.hardware.memory"),
    "hpa-max-min": ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "spec.autoscaling.maxReplicas"),
    "gguf-repo": ({"model": {"uri": "hf://org/Model-GGUF"}}, "spec.model.uri"),
    "sha-on-pvc": ({"model": {"uri": "pvc://models/m.gguf", "sha256": "0" * 64}}, "spec.model.sha256"),
    "bad-secret": ({"apiKeySecretRef": {"name": "Not_Valid"}}, "spec.apiKeySecretRef.name"),
    "no-modes": ({"cache": {"size": "1Gi", "accessModes": []}}, "spec.cache.accessModes"),
    "apparmor-off": ({"podTemplate": {"annotations": {
        "container.apparmor.security.beta.kubernetes.io/engine": "unconfined"}}}, "spec.podTemplate.annotations"),
    "n" * 53: ({}, "metadata.name"),
}


def test_every_kind_of_invalid_spec_gets_its_status_written(cluster: dict[str, Any]) -> None:
    c = cluster
    for name, (spec, _) in INVALID.items():
        create(c, isvc(name, **spec))
    for name, (_, words) in INVALID.items():
        ready = wait(lambda n=name: (r := condition(owner(c, n), "Ready")).get("reason") == "InvalidSpec" and r,
                     f"{name}: Ready=False InvalidSpec written")
        assert ready["status"] == "False" and ready["message"].startswith(words), (name, ready)
        st = owner(c, name)["status"]
        assert st["observedGeneration"] == 1 and "engine" not in st, (name, st)  # no engine chosen yet
        assert get(c, "apps/v1", "Deployment", name) is None  # nothing was applied
    time.sleep(4)  # a resync more: one Event each, no retry loop
    for name in INVALID:
        assert len(events(c, name, "InvalidSpec")) == 1, name
    assert "failed (attempt" not in c["log"].read_text(errors="replace")


def test_every_status_the_operator_computes_passes_the_crd_schema(cluster: dict[str, Any]) -> None:
    """Each status shape (tests/status_cases.py) as a dry-run status patch: the API server's own verdict."""
    from status_cases import all_statuses

    c = cluster
    create(c, isvc("schema-probe", replicas=0))
    obj = wait(lambda: owner(c, "schema-probe").get("status") and owner(c, "schema-probe"), "a first status")
    path = f"/apis/{API}/namespaces/{c['ns']}/inferenceservices/schema-probe/status"
    for _, status in all_statuses():
        c["admin"].request("PATCH", path, {"status": status}, content_type="application/merge-patch+json",
                           query=[("dryRun", "All")])  # raises KubeError (422) on a schema violation
    assert owner(c, "schema-probe")["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


# ------------------------------------------------------------------ item 10: never adopt a stranger


def _stranger(c: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    hpa_v = c["admin"].served_version("autoscaling", ["v2", "v2beta2"])
    pdb_v = c["admin"].served_version("policy", ["v1", "v1beta1"])
    objs = {
        "Service": {"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": 80}], "selector": {"app": "other"}}},
        "PersistentVolumeClaim": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
        "HorizontalPodAutoscaler": {"apiVersion": hpa_v, "kind": "HorizontalPodAutoscaler", "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "other"}, "maxReplicas": 2}},
        "PodDisruptionBudget": {"apiVersion": pdb_v, "kind": "PodDisruptionBudget", "spec": {
            "maxUnavailable": 1, "selector": {"matchLabels": {"app": "other"}}}},
    }
    obj = {**objs[kind], "metadata": {"name": name, "namespace": c["ns"], "labels": {"owner": "someone-else"}}}
    kubectl(c["kubeconfig"], "-n", c["ns"], "create", "-f", "-", input=yaml.safe_dump(obj))
    live = c["admin"].get(obj["apiVersion"], kind, c["ns"], name)
    assert live is not None
    return live


@pytest.mark.parametrize(("kind", "spec", "child"), [
    ("Service", {}, "{}"),
    ("PersistentVolumeClaim", {"cache": {"size": "1Gi"}}, "{}-model-cache"),
    ("HorizontalPodAutoscaler", {"autoscaling": {"maxReplicas": 2}}, "{}"),
    ("PodDisruptionBudget", {"replicas": 2}, "{}"),
])
def test_an_existing_object_with_a_childs_name_is_never_adopted(cluster: dict[str, Any], kind: str,
                                                                spec: dict, child: str) -> None:
    c = cluster
    name = f"conflict-{kind.lower()[:12]}"
    before = _stranger(c, kind, child.format(name))
    create(c, isvc(name, **spec))
    ready = wait(lambda: (r := condition(owner(c, name), "Ready")).get("reason") == "ChildConflict" and r,
                 "Ready=False ChildConflict")
    assert ready["status"] == "False" and f"{kind} {c['ns']}/{child.format(name)} already exists" in ready["message"]
    time.sleep(4)  # resyncs: still nothing changed
    after = c["admin"].get(before["apiVersion"], kind, c["ns"], child.format(name))
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert not after["metadata"].get("ownerReferences")
    assert get(c, "apps/v1", "Deployment", name) is None  # nothing of ours either: every conflict first
    assert len(events(c, name, "ChildConflict")) == 1
    # The owner deletes their object: the InferenceService comes up without anyone touching it.
    kubectl(c["kubeconfig"], "-n", c["ns"], "delete", kind.lower(), child.format(name))
    wait(lambda: get(c, "apps/v1", "Deployment", name), "the Deployment once the conflict is gone", timeout=90)
    wait(lambda: reason_of(c, name) != "ChildConflict", "the ChildConflict cleared")


# ------------------------------------------------------------- item 11: a rejected apply shows up


@pytest.mark.parametrize(("name", "pod_template", "field"), [
    ("bad-toleration", {"tolerations": [{"key": "a", "operator": "Sometimes"}]},
     "spec.podTemplate.tolerations[0].operator"),
    ("bad-label", {"labels": {"team": "not a label value!"}}, "spec.podTemplate.labels"),
])
def test_an_apply_the_api_server_rejects_shows_in_status(cluster: dict[str, Any], name: str,
                                                        pod_template: dict, field: str) -> None:
    c = cluster
    create(c, isvc(name, podTemplate=pod_template))
    ready = wait(lambda: (r := condition(owner(c, name), "Ready")).get("reason") == "ApplyRejected" and r,
                 "Ready=False ApplyRejected")
    assert ready["status"] == "False" and ready["message"].startswith(field + ": the API server rejected "
                                                                      f"Deployment {name} (HTTP 422)"), ready
    time.sleep(4)
    assert len(events(c, name, "ApplyRejected")) == 1
    assert f"reconcile of {c['ns']}/{name} failed" not in c["log"].read_text(errors="replace")  # no retry loop
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", name, "--type=json",
            "-p", '[{"op":"remove","path":"/spec/podTemplate"}]')
    wait(lambda: get(c, "apps/v1", "Deployment", name), "the Deployment once the spec is fixed")
    wait(lambda: reason_of(c, name) != "ApplyRejected", "ApplyRejected cleared")


# ---------------------------------------------------------------------- item 16: apply -f crds/


@pytest.mark.parametrize("how", ["-f", "-k"])
def test_the_crd_installs_with_apply_f_and_k(cluster: dict[str, Any], how: str) -> None:
    r = kubectl(cluster["kubeconfig"], "apply", how, str(REPO / "crds"), "--dry-run=server", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("customresourcedefinition.apiextensions.k8s.io/inferenceservices.gearshift.dev "), \
        r.stdout


# -------------------------------------------------- item 14: a rollout with no room for a second pod


def test_a_rollout_with_no_room_for_a_second_pod_replaces_in_place(cluster: dict[str, Any]) -> None:
    """No node has the accelerator, as on a one-GPU node whose GPU the old pod holds: a surge pod could
    never be scheduled, and maxUnavailable 0 would keep the old ReplicaSet up for the 30-minute
    deadline. The Deployment controller (real) must scale the old one down and the new one up."""
    c = cluster
    name = "no-room"
    create(c, isvc(name, hardware={"accelerator": "example.com/gpu", "count": 1}))
    wait(lambda: get(c, "apps/v1", "Deployment", name), "the Deployment")
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", name, "--type=merge", "-p", '{"spec":{"concurrency":2}}')

    def replica_sets() -> dict[int, int]:
        items = c["admin"].request("GET", f"/apis/apps/v1/namespaces/{c['ns']}/replicasets",
                                   query=[("labelSelector", f"app.kubernetes.io/instance={name}")])["items"]
        return {int(rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]): rs["spec"]["replicas"]
                for rs in items}

    wait(lambda: replica_sets() == {1: 0, 2: 1}, "revision 2 at 1 replica and revision 1 at 0", timeout=60)
    pods = c["admin"].request("GET", f"/api/v1/namespaces/{c['ns']}/pods",
                              query=[("labelSelector", f"app.kubernetes.io/instance={name}")])["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1 and "--max-num-seqs" in live[0]["spec"]["containers"][0]["args"]
