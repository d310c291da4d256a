"""Manifest builders: spec + plan -> children, for every engine and option.

The serving arguments are parsed by the real `gearshift serve` argument parser, so a flag the server
does not take fails here, not in a pod.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from gearshift.engine.config import EngineConfig
from gearshift.operator import builders
from gearshift.operator.policy import decide
from gearshift.operator.spec import parse_spec

OWNER_UID = "0b7e6c4e-1111-2222-3333-444455556666"


def isvc(uri: str = "https://models.example/smollm2.Q4_1.gguf", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "smollm2", "namespace": "team-a", "uid": OWNER_UID},
            "spec": {"model": {"uri": uri}, **spec}}


def render(obj: dict[str, Any], **kw: Any) -> dict[str, dict[str, Any]]:
    spec = parse_spec(obj)
    plan = decide(spec)
    return {c["kind"]: c for c in builders.children(spec, plan, "registry.example/gearshift:1", obj, **kw)}


def pod(children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return children["Deployment"]["spec"]["template"]["spec"]


def engine_container(children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod(children)["containers"]
    return c


def serve_parser() -> argparse.ArgumentParser:
    from gearshift.engine.cli import build_parser

    parser, modules = build_parser()
    if "serve" not in modules:
        pytest.skip("`gearshift serve` is not built in this tree")
    return parser


def test_gguf_on_cpu_full_deployment() -> None:
    ch = render(isvc(concurrency=2, hardware={"cpu": "2", "memory": "2Gi"}))
    assert set(ch) == {"Deployment", "Service"}  # one replica: no PDB; no cache: no PVC
    dep = ch["Deployment"]
    c = engine_container(ch)
    assert c["command"] == ["gearshift"]
    args = c["args"]
    assert args[:2] == ["serve", "--engine"] and args[2] == "gguf"
    assert args[args.index("--model") + 1] == "/models/smollm2.Q4_1.gguf"
    assert args[args.index("--host") + 1] == "$(POD_IP)"
    assert args[args.index("--threads") + 1] == "2"
    assert "--kv-cache-memory" not in args
    parsed = serve_parser().parse_args(args)
    assert parsed.engine == "gguf" and parsed.max_num_seqs == 2 and parsed.device == "cpu"
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert dep["metadata"]["labels"]["gearshift.dev/engine"] == "gguf"
    assert dep["spec"]["template"]["metadata"]["labels"]["gearshift.dev/engine"] == "gguf"


def test_gguf_pods_get_a_queue_bounded_by_the_request_timeout() -> None:
    """--max-waiting for gguf pods (operator/policy.py gguf_max_waiting); paged pods keep the engine's."""
    gguf = serve_parser().parse_args(engine_container(render(isvc(concurrency=2)))["args"])
    assert (gguf.engine, gguf.max_waiting) == ("gguf", 120)
    args = engine_container(render(isvc(concurrency=32)))["args"]
    assert "--max-waiting" not in args and serve_parser().parse_args(args).max_waiting == 256
    mine = serve_parser().parse_args(engine_container(render(isvc(concurrency=2, engineArgs={"maxWaiting": 8})))["args"])
    assert (mine.engine, mine.max_waiting) == ("gguf", 8)  # engineArgs.maxWaiting wins over the sizing


def test_paged_on_cpu_args_parse_with_engine_args() -> None:
    ch = render(isvc(concurrency=32, hardware={"cpu": "4", "memory": "8Gi"},
                     engineArgs={"maxModelLen": 2048, "dtype": "float32", "blockSize": 32,
                                 "maxNumBatchedTokens": 1024, "enforceEager": True, "seed": 7,
                                 "threadWait": "passive", "quantization": "int8"}))
    args = engine_container(ch)["args"]
    p = serve_parser().parse_args(args)
    assert (p.engine, p.max_num_seqs, p.threads, p.max_model_len, p.dtype) == ("paged", 32, 4, 2048, "float32")
    assert (p.block_size, p.max_num_batched_tokens, p.enforce_eager, p.seed) == (32, 1024, True, 7)
    assert p.thread_wait == "passive" and p.quantization == "int8"
    assert int(args[args.index("--kv-cache-memory") + 1]) == 2 * 2**30
    assert ch["Deployment"]["metadata"]["labels"]["gearshift.dev/engine"] == "paged"


def test_paged_on_gpu_requests_the_accelerator() -> None:
    ch = render(isvc("hf://HuggingFaceTB/SmolLM2-135M-Instruct", concurrency=64,
                     hardware={"accelerator": "nvidia.com/gpu", "count": 1}))
    c = engine_container(ch)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    p = serve_parser().parse_args(c["args"])
    assert p.device == "cuda" and p.model == "/models/SmolLM2-135M-Instruct"


def test_selector_is_stable_across_an_engine_switch() -> None:
    low, high = render(isvc(concurrency=1)), render(isvc(concurrency=32))
    assert low["Deployment"]["spec"]["selector"] == high["Deployment"]["spec"]["selector"]
    assert "gearshift.dev/engine" not in low["Deployment"]["spec"]["selector"]["matchLabels"]
    assert low["Service"]["spec"]["selector"] == high["Service"]["spec"]["selector"]
    assert engine_container(low)["args"] != engine_container(high)["args"]


def test_labels_and_owner_reference_on_every_child() -> None:
    ch = render(isvc(replicas=3, cache={"size": "5Gi"}, autoscaling=None))
    assert set(ch) == {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
    for obj in ch.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["labels"]["app.kubernetes.io/instance"] == "smollm2"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "gearshift-operator"
        assert meta["labels"]["gearshift.dev/engine"] == "gguf"
        (ref,) = meta["ownerReferences"]
        assert ref == {"apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService", "name": "smollm2",
                       "uid": OWNER_UID, "controller": True, "blockOwnerDeletion": True}


def test_no_owner_reference_without_a_uid() -> None:
    obj = isvc()
    del obj["metadata"]["uid"]
    for child in render(obj).values():
        assert "ownerReferences" not in child["metadata"]


def test_hardened_pod() -> None:
    ch = render(isvc())
    p = pod(ch)
    assert p["securityContext"]["runAsNonRoot"] is True
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert p["automountServiceAccountToken"] is False
    for c in p["containers"] + p["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the only writable path but models
        assert c["command"] == ["gearshift"]  # an argument list: no shell ever sees a spec field


def test_probes_and_scrape_annotations() -> None:
    ch = render(isvc())
    c = engine_container(ch)
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # long model loads
    ann = ch["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_prestop_lets_the_endpoint_go_before_the_drain() -> None:
    ch = render(isvc())
    c = engine_container(ch)
    pause = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep" and int(pause[1]) >= 5
    drain = EngineConfig(model="m.gguf").drain_timeout
    assert ch["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(pause[1]) + drain


def test_pod_ip_from_the_downward_api() -> None:
    env = {e["name"]: e for e in engine_container(render(isvc()))["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["HOME"]["value"] == "/tmp"


def test_pvc_model_mounted_read_only_without_fetch() -> None:
    ch = render(isvc("pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p = pod(ch)
    assert "initContainers" not in p
    vol = {v["name"]: v for v in p["volumes"]}["models"]
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    args = engine_container(ch)["args"]
    assert args[args.index("--model") + 1] == "/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_file_model_served_in_place() -> None:
    ch = render(isvc("file:///opt/models/m.gguf"))
    assert "initContainers" not in pod(ch)
    args = engine_container(ch)["args"]
    assert args[args.index("--model") + 1] == "/opt/models/m.gguf"


def test_download_init_container_with_checksum_into_empty_dir() -> None:
    obj = isvc()
    obj["spec"]["model"]["sha256"] = "ab" * 32
    ch = render(obj)
    p = pod(ch)
    (init,) = p["initContainers"]
    assert init["command"] == ["gearshift"]
    assert init["args"] == ["fetch", "https://models.example/smollm2.Q4_1.gguf", "/models", "--sha256", "ab" * 32]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"  # the error reaches status
    vol = {v["name"]: v for v in p["volumes"]}["models"]
    assert vol == {"name": "models", "emptyDir": {}}
    mount = {m["name"]: m for m in engine_container(ch)["volumeMounts"]}["models"]
    assert mount["readOnly"] is True


def test_hf_download_with_token_and_cache_pvc() -> None:
    obj = isvc("hf://org/repo-GGUF/m.Q4_K_M.gguf@main", cache={"size": "20Gi", "storageClassName": "fast"})
    obj["spec"]["model"]["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
    ch = render(obj)
    pvc = ch["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "smollm2-model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}},
                           "storageClassName": "fast"}
    (init,) = pod(ch)["initContainers"]
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    vol = {v["name"]: v for v in pod(ch)["volumes"]}["models"]
    assert vol["persistentVolumeClaim"] == {"claimName": "smollm2-model-cache"}


def test_https_download_trusting_a_private_ca_from_a_config_map() -> None:
    obj = isvc("https://models.corp/m.gguf")
    obj["spec"]["model"]["caConfigMapRef"] = {"name": "corp-ca", "key": "root.pem"}
    ch = render(obj)
    (init,) = pod(ch)["initContainers"]
    assert init["args"][-2:] == ["--ca-file", "/etc/gearshift/model-ca/ca.crt"]  # a fixed path: no CR text
    mount = {m["name"]: m for m in init["volumeMounts"]}["model-ca"]
    assert mount == {"name": "model-ca", "mountPath": "/etc/gearshift/model-ca", "readOnly": True}
    vol = {v["name"]: v for v in pod(ch)["volumes"]}["model-ca"]
    assert vol["configMap"] == {"name": "corp-ca", "items": [{"key": "root.pem", "path": "ca.crt"}]}
    assert "model-ca" not in {m["name"] for m in engine_container(ch)["volumeMounts"]}  # the engine never needs it
    plain = render(isvc("https://models.corp/m.gguf"))
    assert "--ca-file" not in pod(plain)["initContainers"][0]["args"]


def test_no_cache_pvc_for_a_model_on_a_pvc() -> None:
    assert "PersistentVolumeClaim" not in render(isvc("pvc://models/m.gguf", cache={"size": "1Gi"}))


def test_api_key_from_a_secret() -> None:
    ch = render(isvc(apiKeySecretRef={"name": "llm-keys", "key": "token"}))
    env = {e["name"]: e for e in engine_container(ch)["env"]}
    assert env["GEARSHIFT_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "llm-keys", "key": "token"}}
    assert "--api-key" not in engine_container(ch)["args"]  # never on a command line


def test_pod_template_fields() -> None:
    tpl = {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "k", "operator": "Exists"}],
           "affinity": {"nodeAffinity": {}}, "priorityClassName": "high", "serviceAccountName": "sa",
           "imagePullSecrets": [{"name": "regcred"}], "runtimeClassName": "gvisor",
           "labels": {"team": "a", "app.kubernetes.io/instance": "hijack"}, "annotations": {"x": "y"}}
    ch = render(isvc(podTemplate=tpl))
    p = pod(ch)
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName",
                "imagePullSecrets", "runtimeClassName"):
        assert p[key] == tpl[key]
    meta = ch["Deployment"]["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "a"
    assert meta["labels"]["app.kubernetes.io/instance"] == "smollm2"  # the selector's labels always win
    assert meta["annotations"]["x"] == "y"


def test_service() -> None:
    svc = render(isvc())["Service"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == builders.selector_labels("smollm2")
    assert builders.url(parse_spec(isvc())) == "http://smollm2.team-a.svc:8000/v1"


@pytest.mark.parametrize("version", ["autoscaling/v2", "autoscaling/v2beta2"])
def test_hpa_on_cpu_or_running_requests(version: str) -> None:
    cpu = render(isvc(autoscaling={"minReplicas": 1, "maxReplicas": 4}), hpa_version=version)
    hpa = cpu["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == version
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "smollm2"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
    assert "replicas" not in cpu["Deployment"]["spec"]  # the HPA's field, not ours
    conc = render(isvc(autoscaling={"minReplicas": 2, "maxReplicas": 4, "targetConcurrency": 6}),
                  hpa_version=version)["HorizontalPodAutoscaler"]
    (metric,) = conc["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == builders.REQUESTS_RUNNING_METRIC
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "6"}


@pytest.mark.parametrize("version", ["policy/v1", "policy/v1beta1"])
def test_pdb_only_with_more_than_one_replica(version: str) -> None:
    assert "PodDisruptionBudget" not in render(isvc(replicas=1), pdb_version=version)
    pdb = render(isvc(replicas=2), pdb_version=version)["PodDisruptionBudget"]
    assert pdb["apiVersion"] == version
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": builders.selector_labels("smollm2")}}
    assert "PodDisruptionBudget" in render(isvc(autoscaling={"minReplicas": 1, "maxReplicas": 3}))


def test_children_order_puts_the_claim_before_the_pods() -> None:
    spec = parse_spec(isvc(cache={"size": "1Gi"}, replicas=2))
    kinds = [c["kind"] for c in builders.children(spec, decide(spec), "img")]
    assert kinds == ["PersistentVolumeClaim", "Service", "Deployment", "PodDisruptionBudget"]


def test_builders_are_deterministic() -> None:
    a, b = render(isvc(replicas=2)), render(isvc(replicas=2))
    assert a == b
