"""The write decision: hash + field containment, so an unchanged child is never re-applied."""

from __future__ import annotations

import copy

from gearshift.operator import builders
from gearshift.operator.apply import HASH_ANNOTATION, contains, needs_apply, object_path, spec_hash, with_hash
from gearshift.operator.policy import decide
from gearshift.operator.spec import parse_spec


def desired(concurrency: int = 1) -> dict:
    spec = parse_spec({"metadata": {"name": "m", "namespace": "ns", "uid": "u"},
                       "spec": {"model": {"uri": "https://h.example/m.gguf"}, "concurrency": concurrency,
                                "hardware": {"cpu": "500m", "memory": "1Gi"}}})
    return with_hash(builders.deployment(spec, decide(spec), "img"))


def as_served(obj: dict) -> dict:
    """What the API server returns: defaults added, quantities canonical, bookkeeping fields."""
    live = copy.deepcopy(obj)
    live["metadata"].update(uid="x", resourceVersion="42", generation=1, managedFields=[{"manager": "m"}])
    pod = live["spec"]["template"]["spec"]
    pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
    c = pod["containers"][0]
    c.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
    c["resources"]["requests"]["memory"] = "1073741824"  # the same quantity, written another way
    c["readinessProbe"]["successThreshold"] = 1
    live["status"] = {"replicas": 1}
    return live


def test_unchanged_child_is_not_reapplied() -> None:
    d = desired()
    assert not needs_apply(d, as_served(d))


def test_missing_child_is_applied() -> None:
    assert needs_apply(desired(), None)


def test_spec_change_is_applied() -> None:
    old, new = desired(1), desired(32)  # an engine switch
    assert old["metadata"]["annotations"][HASH_ANNOTATION] != new["metadata"]["annotations"][HASH_ANNOTATION]
    assert needs_apply(new, as_served(old))


def test_drift_in_our_fields_is_repaired() -> None:
    d = desired()
    live = as_served(d)
    live["spec"]["template"]["spec"]["containers"][0]["args"][2] = "paged"  # someone edited the Deployment
    assert needs_apply(d, live)
    live = as_served(d)
    del live["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert needs_apply(d, live)


def test_others_fields_are_not_drift() -> None:
    d = desired()
    live = as_served(d)
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
    live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "mesh"})
    assert not needs_apply(d, live)


def test_quantities_compare_by_value() -> None:
    assert contains({"cpu": "500m", "memory": "1Gi"}, {"cpu": "0.5", "memory": "1073741824"})
    assert contains({"cpu": "1"}, {"cpu": "1000m"})
    assert not contains({"cpu": "1"}, {"cpu": "2"})
    assert contains({"port": 8000}, {"port": 8000}) and not contains({"port": 8000}, {"port": 8001})
    assert not contains({"name": "http"}, {"name": "https"})


def test_hash_ignores_its_own_annotation_and_is_stable() -> None:
    d = desired()
    assert spec_hash(d) == d["metadata"]["annotations"][HASH_ANNOTATION]
    assert with_hash(d) == d


def test_object_paths() -> None:
    assert object_path("apps/v1", "Deployment", "ns", "m") == "/apis/apps/v1/namespaces/ns/deployments/m"
    assert object_path("v1", "Service", "ns", "m") == "/api/v1/namespaces/ns/services/m"
    assert object_path("v1", "Event", "ns") == "/api/v1/namespaces/ns/events"
    assert object_path("gearshift.dev/v1alpha1", "InferenceService", "ns", "m") == \
        "/apis/gearshift.dev/v1alpha1/namespaces/ns/inferenceservices/m"
    assert object_path("autoscaling/v2beta2", "HorizontalPodAutoscaler", "ns", "m").startswith(
        "/apis/autoscaling/v2beta2/")
