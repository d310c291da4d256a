"""The operator against a real kube-apiserver (+ etcd, controller-manager, scheduler; no kubelet).

The CRD comes from crds/, the RBAC from manifests/, and the operator runs as `gearshift operator` with
only that ServiceAccount's token. Pods never run here (no node), so the assertions are on the objects:
children, status, conditions, events, cleanup by the garbage collector, and no writes at rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from gearshift.operator.policy import CROSSOVER_CONCURRENCY as CROSSOVER
from operator_kit import (
    API,
    MODEL,
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
    """CRD + RBAC installed, a namespace of our own, and the operator running with the SA token."""
    with operator_cluster(tmp_path_factory.mktemp("operator")) as c:
        yield c


def engine_args(dep: dict[str, Any]) -> list[str]:
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def writes_logged(c: dict[str, Any]) -> int:
    return c["log"].read_text(errors="replace").count(": applied ")


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("spec", "words"), [
    ({"model": {"uri": MODEL}, "engine": "vllm"}, 'spec.engine: Unsupported value: "vllm"'),
    ({"model": {"uri": MODEL}, "concurrency": 0}, "spec.concurrency: Invalid value: 0"),
    ({"model": {"uri": "s3://bucket/m.gguf"}}, "spec.model.uri: Invalid value"),
    ({"concurrency": 2}, "spec.model: Required value"),
    ({"model": {"uri": MODEL}, "hardware": {"count": "two"}}, "spec.hardware.count: Invalid value"),
    ({"model": {"uri": "https://models.example/m.gguf", "caConfigMapRef": {"name": "a" * 254}}},
     "spec.model.caConfigMapRef.name in body should be at most 253 chars long"),
    ({"model": {"uri": MODEL, "tokenSecretRef": {"name": "tok", "key": "../etc"}}},
     "spec.model.tokenSecretRef.key: Invalid value"),
])
def test_schema_rejects_invalid_objects_readably(cluster: dict[str, Any], spec: dict, words: str) -> None:
    obj = {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": "bad"}, "spec": spec}
    # --validate=false: the API server's own verdict, not kubectl's client-side copy of the schema.
    r = kubectl(cluster["kubeconfig"], "-n", cluster["ns"], "apply", "--validate=false", "-f", "-",
                input=yaml.safe_dump(obj), check=False)
    assert r.returncode != 0
    assert words in r.stderr, r.stderr


def test_create_builds_children_and_status(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("chat", concurrency=2, replicas=2, cache={"size": "1Gi"}))
    uid = owner(c, "chat")["metadata"]["uid"]
    dep = wait(lambda: get(c, "apps/v1", "Deployment", "chat"), "the Deployment")
    children = [dep, wait(lambda: get(c, "v1", "Service", "chat"), "the Service"),
                wait(lambda: get(c, "v1", "PersistentVolumeClaim", "chat-model-cache"), "the cache PVC")]
    pdb = wait(lambda: c["admin"].get(c["admin"].served_version("policy", ["v1", "v1beta1"]),
                                      "PodDisruptionBudget", c["ns"], "chat"), "the PDB")
    for child in [*children, pdb]:
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["controller"] is True
        assert child["metadata"]["labels"]["gearshift.dev/engine"] == "gguf"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gearshift-operator"
    assert [m["manager"] for m in dep["metadata"]["managedFields"] if m["operation"] == "Apply"] == ["gearshift-operator"]
    assert engine_args(dep)[:3] == ["serve", "--engine", "gguf"] and dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["initContainers"][0]["args"][:2] == ["fetch", MODEL]

    def status_ready() -> dict[str, Any]:
        st = owner(c, "chat").get("status") or {}
        return st if st.get("observedGeneration") == 1 and condition(owner(c, "chat"), "Degraded") else {}

    st = wait(status_ready, "status")
    assert st["engine"] == "gguf"
    assert st["engineReason"] == f"2 concurrent requests on CPU: below the paged engine's crossover ({CROSSOVER})"
    assert st["url"] == f"http://chat.{c['ns']}.svc:8000/v1"
    obj = owner(c, "chat")
    assert {x["type"] for x in st["conditions"]} == {"Ready", "ModelReady", "Progressing", "Degraded", "GearAdvice"}
    assert condition(obj, "GearAdvice")["reason"] == "NoData" and "load" not in st  # no pod to scrape
    assert all(x["observedGeneration"] == 1 for x in st["conditions"])
    assert condition(obj, "Ready")["status"] == "False"  # no node here: nothing can run
    # The scheduler finds no node: surfaced as Degraded with its own words.
    deg = wait(lambda: condition(owner(c, "chat"), "Degraded").get("reason") == "Unschedulable"
               and condition(owner(c, "chat"), "Degraded"), "Degraded=Unschedulable")
    # "no nodes available to schedule pods", or "0/1 nodes are available: ..." beside a tainted test node
    assert deg["status"] == "True" and deg["message"].startswith("pod chat-") and "nodes" in deg["message"]
    assert wait(lambda: events(c, "chat", "EngineSelected"), "an EngineSelected event")[0]["message"].startswith(
        "engine gguf: 2 concurrent requests")
    assert events(c, "chat", "Applied")
    # kubectl shows the printer columns.
    out = kubectl(c["kubeconfig"], "-n", c["ns"], "get", "gsvc", "chat").stdout
    assert out.split()[:7] == ["NAME", "ENGINE", "LOAD", "ADVICE", "READY", "URL", "AGE"] and "gguf" in out \
        and "NoData" in out and "False" in out


def test_engine_switch_rolls_out(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("switch", concurrency=1))
    dep = wait(lambda: get(c, "apps/v1", "Deployment", "switch"), "the Deployment")
    assert engine_args(dep)[2] == "gguf"
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", "switch", "--type=merge", "-p", '{"spec":{"concurrency":32}}')
    dep2 = wait(lambda: (d := get(c, "apps/v1", "Deployment", "switch")) and engine_args(d)[2] == "paged" and d,
                "the Deployment to run the paged engine")
    assert dep2["metadata"]["generation"] > dep["metadata"]["generation"]
    assert dep2["spec"]["template"]["metadata"]["labels"]["gearshift.dev/engine"] == "paged"
    assert dep2["spec"]["selector"] == dep["spec"]["selector"]  # same pods' identity: a rollout, not a new app
    st = wait(lambda: (o := owner(c, "switch")).get("status", {}).get("observedGeneration") == 2 and o["status"],
              "status")
    assert st["engine"] == "paged" and f"at or above the crossover ({CROSSOVER})" in st["engineReason"]
    assert condition(owner(c, "switch"), "Progressing")["status"] == "True"
    msgs = [e["message"] for e in wait(lambda: len(events(c, "switch", "EngineSelected")) >= 2 and
                                       events(c, "switch", "EngineSelected"), "two EngineSelected events")]
    assert any(m.startswith("engine paged:") for m in msgs)
    # One Event per engine choice, not one per reconcile (the create used to emit ~8 alike within seconds).
    assert sorted(m.split(":")[0] for m in msgs) == ["engine gguf", "engine paged"], msgs


def test_autoscaling_adds_and_removes_the_hpa(cluster: dict[str, Any]) -> None:
    c = cluster
    hpa_version = c["admin"].served_version("autoscaling", ["v2", "v2beta2"])
    create(c, isvc("scaled", autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetConcurrency": 4}))
    hpa = wait(lambda: c["admin"].get(hpa_version, "HorizontalPodAutoscaler", c["ns"], "scaled"), "the HPA")
    assert hpa["spec"]["maxReplicas"] == 3
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "gearshift:num_requests_running"
    dep = wait(lambda: get(c, "apps/v1", "Deployment", "scaled"), "the Deployment")
    applied = next(m for m in dep["metadata"]["managedFields"] if m["manager"] == "gearshift-operator")
    assert "f:replicas" not in json.dumps(applied["fieldsV1"]["f:spec"])  # the HPA's field, not ours
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", "scaled", "--type=json",
            "-p", '[{"op":"remove","path":"/spec/autoscaling"}]')
    wait(lambda: c["admin"].get(hpa_version, "HorizontalPodAutoscaler", c["ns"], "scaled") is None, "the HPA to go")
    wait(lambda: get(c, "apps/v1", "Deployment", "scaled")["spec"]["replicas"] == 1, "replicas back in the spec")


def test_drift_is_repaired(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("drift"))
    wait(lambda: get(c, "apps/v1", "Deployment", "drift"), "the Deployment")
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "deployment", "drift", "--type=json", "-p",
            '[{"op":"replace","path":"/spec/template/spec/containers/0/args/2","value":"paged"}]')
    wait(lambda: engine_args(get(c, "apps/v1", "Deployment", "drift"))[2] == "gguf", "the drift to be repaired")
    kubectl(c["kubeconfig"], "-n", c["ns"], "delete", "service", "drift")
    wait(lambda: get(c, "v1", "Service", "drift"), "the deleted Service to come back")


def test_invalid_spec_changes_nothing_and_reports_once(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("broken", concurrency=1))
    wait(lambda: get(c, "apps/v1", "Deployment", "broken"), "the Deployment")
    wait(lambda: owner(c, "broken").get("status", {}).get("observedGeneration") == 1, "status")
    before = get(c, "apps/v1", "Deployment", "broken")
    # Schema-valid, but a gguf engine cannot load safetensors (a CEL rule the v1.20 server does not run).
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", "broken", "--type=merge", "-p",
            '{"spec":{"engine":"gguf","model":{"uri":"https://127.0.0.1:9/model.safetensors"}}}')
    ready = wait(lambda: (r := condition(owner(c, "broken"), "Ready")).get("reason") == "InvalidSpec" and r,
                 "Ready=False InvalidSpec")
    assert ready["status"] == "False" and ready["observedGeneration"] == 2
    assert ready["message"].startswith("spec.engine: gguf needs a .gguf model file")
    time.sleep(8)  # two resyncs and the watch events of our own status write: no retry loop
    after = get(c, "apps/v1", "Deployment", "broken")
    # Untouched by the operator: same spec generation, same applied hash, same Apply entry (the
    # controller-manager may still write the Deployment's status, which is not ours).
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["metadata"]["annotations"] == before["metadata"]["annotations"]
    assert [m for m in after["metadata"]["managedFields"] if m["manager"] == "gearshift-operator"] == \
        [m for m in before["metadata"]["managedFields"] if m["manager"] == "gearshift-operator"]
    assert len(events(c, "broken", "InvalidSpec")) == 1
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", "broken", "--type=merge", "-p", '{"spec":{"engine":"auto"}}')
    wait(lambda: condition(owner(c, "broken"), "Ready").get("reason") not in (None, "InvalidSpec"), "recovery")
    wait(lambda: "/models/model.safetensors" in engine_args(get(c, "apps/v1", "Deployment", "broken")),
         "the fixed spec applied")


def test_nothing_written_at_rest(cluster: dict[str, Any]) -> None:
    c = cluster
    # No pods (replicas 0): the scheduler's verdicts, which change with the test nodes around, stay out.
    create(c, isvc("rest", replicas=0))
    wait(lambda: owner(c, "rest").get("status", {}).get("observedGeneration") == 1, "status")
    wait(lambda: condition(owner(c, "rest"), "Ready").get("reason") == "ScaledToZero", "the settled status")
    time.sleep(2)
    names = [("apps/v1", "Deployment", "rest"), ("v1", "Service", "rest"), (API, "InferenceService", "rest")]
    versions = {n: get(c, *n)["metadata"]["resourceVersion"] for n in names}
    writes = writes_logged(c)
    n_events = len(events(c, "rest"))
    time.sleep(10)  # three full resyncs of every resource in the namespace
    assert {n: get(c, *n)["metadata"]["resourceVersion"] for n in names} == versions
    assert writes_logged(c) == writes
    assert len(events(c, "rest")) == n_events


def test_delete_removes_everything(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("gone", replicas=2, cache={"size": "1Gi"}))
    wait(lambda: get(c, "apps/v1", "Deployment", "gone") and get(c, "v1", "PersistentVolumeClaim", "gone-model-cache"),
         "the children")
    kubectl(c["kubeconfig"], "-n", c["ns"], "delete", "gsvc", "gone", "--wait=true", "--timeout=30s")
    for api_version, kind, name in [("apps/v1", "Deployment", "gone"), ("v1", "Service", "gone"),
                                    ("v1", "PersistentVolumeClaim", "gone-model-cache")]:
        wait(lambda a=api_version, k=kind, n=name: (o := get(c, a, k, n)) is None or o["metadata"].get("deletionTimestamp"),
             f"{kind} to be garbage-collected", timeout=60)
    assert c["proc"].poll() is None  # the operator is still up
