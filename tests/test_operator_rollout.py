"""Rollout strategy (item 14) and the podTemplate allow-list (item 13): pure, from the spec."""

from __future__ import annotations

from typing import Any

import pytest
from gearshift.operator import builders
from gearshift.operator.policy import decide
from gearshift.operator.spec import POD_SPEC_PASSTHROUGH, InvalidSpec, parse_spec

SURGE = {"maxUnavailable": 0, "maxSurge": 1}
IN_PLACE = {"maxUnavailable": 1, "maxSurge": 0}


def spec_of(**spec: Any) -> Any:
    spec.setdefault("model", {"uri": "https://h.example/m.gguf"})
    return parse_spec({"metadata": {"name": "m", "namespace": "ns"}, "spec": spec})


@pytest.mark.parametrize(("spec", "strategy"), [
    ({}, SURGE),  # CPU, emptyDir: a second pod fits anywhere there is CPU
    ({"hardware": {"accelerator": "nvidia.com/gpu", "count": 1}}, IN_PLACE),  # no spare GPU to surge onto
    ({"cache": {"size": "1Gi"}}, IN_PLACE),  # ReadWriteOnce: a pod on another node cannot mount it
    ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteOncePod"]}}, IN_PLACE),
    ({"cache": {"size": "1Gi", "accessModes": ["ReadWriteMany"]}}, SURGE),
    ({"model": {"uri": "pvc://models/m.gguf"}, "cache": {"size": "1Gi"}}, SURGE),  # no cache claim is made
])
def test_rollout_strategy(spec: dict, strategy: dict) -> None:
    s = spec_of(**spec)
    dep = builders.deployment(s, decide(s), "img")
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": strategy}


@pytest.mark.parametrize("key", ["container.apparmor.security.beta.kubernetes.io/engine",
                                 "seccomp.security.alpha.kubernetes.io/pod",
                                 "container.seccomp.security.alpha.kubernetes.io/engine"])
def test_annotations_that_loosen_the_sandbox_are_refused(key: str) -> None:
    with pytest.raises(InvalidSpec, match="spec.podTemplate.annotations") as e:
        spec_of(podTemplate={"annotations": {key: "unconfined"}})
    assert key in str(e.value)


def test_pod_template_passes_only_the_allow_list() -> None:
    template = {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {}}, "priorityClassName": "high", "serviceAccountName": "reader",
                "imagePullSecrets": [{"name": "pull"}], "runtimeClassName": "nvidia",
                "labels": {"team": "a", "app.kubernetes.io/instance": "hijack"}, "annotations": {"note": "x"}}
    s = spec_of(podTemplate=template)
    pod = builders.deployment(s, decide(s), "img")["spec"]["template"]
    for key in POD_SPEC_PASSTHROUGH:
        assert pod["spec"][key] == template[key]
    assert pod["metadata"]["labels"]["team"] == "a"
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "m"  # ours win: the selector
    assert pod["metadata"]["annotations"]["note"] == "x"
    # What the operator owns is never the spec's, whatever the template says.
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for field in ("hostNetwork", "hostPID", "volumes", "containers", "securityContext"):
        with pytest.raises(InvalidSpec, match=f"spec.podTemplate.{field}: unknown field"):
            spec_of(podTemplate={field: True})
