"""spec.gearShift and the built-in replica controller against a real kube-apiserver (no node: pods never
run, so no load is observed): the CRD accepts and checks the fields, the operator creates no HPA and sets
the Deployment's replicas itself, and status carries the GearAdvice condition and the gear mode."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from test_operator_cluster import (  # noqa: F401 - `cluster` is the fixture the tests take
    cluster,
    condition,
    create,
    get,
    isvc,
    kubectl,
    owner,
    wait,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("spec", "words"), [
    ({"gearShift": {"mode": "sometimes"}}, 'spec.gearShift.mode: Unsupported value: "sometimes"'),
    ({"gearShift": {"window": "ten minutes"}}, "spec.gearShift.window: Invalid value"),
    ({"autoscaling": {"maxReplicas": 3, "controller": "keda"}}, 'spec.autoscaling.controller: Unsupported value'),
])
def test_schema_checks_the_gear_fields(cluster: dict[str, Any], spec: dict, words: str) -> None:  # noqa: F811
    r = kubectl(cluster["kubeconfig"], "-n", cluster["ns"], "apply", "--validate=false", "-f", "-", check=False,
                input=yaml.safe_dump(isvc("bad-gear", **spec)))
    assert r.returncode != 0 and words in r.stderr, r.stderr


def test_builtin_replicas_and_gear_status(cluster: dict[str, Any]) -> None:  # noqa: F811
    c = cluster
    create(c, isvc("geared", concurrency=1, gearShift={"mode": "auto", "window": "30s", "cooldown": "1m"},
                   autoscaling={"controller": "operator", "targetConcurrency": 4, "minReplicas": 2,
                                "maxReplicas": 5}))
    dep = wait(lambda: get(c, "apps/v1", "Deployment", "geared"), "the Deployment")
    assert dep["spec"]["replicas"] == 2  # minReplicas until load is observed
    st = wait(lambda: condition(owner(c, "geared"), "GearAdvice") and owner(c, "geared")["status"], "status")
    assert st["engine"] == "gguf" and st["gearShift"] == {"mode": "auto"}
    assert condition(owner(c, "geared"), "GearAdvice")["reason"] == "NoData"
    hpa = c["admin"].served_version("autoscaling", ["v2", "v2beta2"])
    assert get(c, hpa, "HorizontalPodAutoscaler", "geared") is None
    # back to the HPA path (an adapter serves the metric): the HPA appears
    create(c, isvc("geared", concurrency=1, autoscaling={"targetConcurrency": 4, "minReplicas": 2, "maxReplicas": 5}))
    wait(lambda: get(c, hpa, "HorizontalPodAutoscaler", "geared"), "the HPA")
    kubectl(c["kubeconfig"], "-n", c["ns"], "delete", "gsvc", "geared")
