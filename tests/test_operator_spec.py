"""Spec parsing: defaults, every field, and bad input -> InvalidSpec naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from gearshift.engine.errors import GearshiftError
from gearshift.engine.fetch import parse_model_uri
from gearshift.operator.spec import InvalidSpec, parse_quantity, parse_spec


def isvc(name: str = "smollm2", **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"uri": "pvc://models/smollm2.gguf"})
    return {"metadata": {"name": name, "namespace": "team-a"}, "spec": spec}


def test_defaults() -> None:
    s = parse_spec(isvc())
    assert (s.name, s.namespace, s.concurrency, s.engine, s.replicas) == ("smollm2", "team-a", 1, "auto", 1)
    assert s.model.served_name == "smollm2"
    assert s.hardware.accelerator is None and s.hardware.count == 0
    assert s.autoscaling is None and s.cache is None and s.api_key_secret is None


def test_every_field() -> None:
    s = parse_spec(isvc(
        model={"uri": "hf://org/repo/m.Q4.gguf@v1", "servedName": "chat", "sha256": "a" * 64,
               "tokenSecretRef": {"name": "hf", "key": "tok"}},
        concurrency=32, engine="paged", hardware={"accelerator": "nvidia.com/gpu", "count": 2, "cpu": 4,
                                                  "memory": "16Gi"},
        autoscaling={"minReplicas": 2, "maxReplicas": 5, "targetConcurrency": 8},
        engineArgs={"maxModelLen": 4096, "dtype": "bfloat16"}, apiKeySecretRef={"name": "llm-keys"},
        cache={"size": "20Gi", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]},
        podTemplate={"nodeSelector": {"pool": "gpu"}, "priorityClassName": "high",
                     "tolerations": [{"key": "gpu", "operator": "Exists"}]},
    ))
    assert s.model.uri.repo_id == "org/repo" and s.model.uri.revision == "v1" and s.model.uri.format == "gguf"
    assert s.model.token_secret == ("hf", "tok") and s.api_key_secret == ("llm-keys", "token")
    assert s.hardware.cpu_cores == 4 and s.hardware.memory_bytes == 16 * 2**30
    assert s.autoscaling.min_replicas == 2 and s.autoscaling.target_concurrency == 8
    assert s.cache.storage_class == "fast" and s.cache.access_modes == ("ReadWriteMany",)
    assert s.pod_template["nodeSelector"] == {"pool": "gpu"}


@pytest.mark.parametrize(("obj", "field", "words"), [
    (isvc(name="Bad_Name"), "metadata.name", "DNS-1035"),
    (isvc(name="a" * 53), "metadata.name", "52"),
    ({"metadata": {"name": "x"}}, "spec", "spec.model.uri"),
    (isvc(model=None), "spec.model", "required"),
    (isvc(model={"uri": "s3://bucket/m.gguf"}), "spec.model.uri", "unknown scheme 's3'"),
    (isvc(model={"uri": "models/m.gguf"}), "spec.model.uri", "no scheme"),
    (isvc(model={"uri": "pvc://Models/m.gguf"}), "spec.model.uri", "PersistentVolumeClaim name"),
    (isvc(model={"uri": "pvc://models"}), "spec.model.uri", "path inside the claim"),
    (isvc(model={"uri": "file://relative/m.gguf"}), "spec.model.uri", "absolute path"),
    (isvc(model={"uri": "https://host/dir/"}), "spec.model.uri", "name a file"),
    (isvc(model={"uri": "hf://onlyorg"}), "spec.model.uri", "hf://org/repo"),
    (isvc(model={"uri": "hf://org/Model-GGUF"}), "spec.model.uri", "name one"),
    (isvc(model={"uri": "pvc://m/a.gguf", "sha256": "xyz"}), "spec.model.sha256", "64"),
    (isvc(model={"uri": "pvc://m/a.gguf", "sha256": "a" * 64}), "spec.model.sha256", "downloaded files"),
    (isvc(model={"uri": "pvc://m/a.gguf", "servedName": "a b"}), "spec.model.servedName", "letters"),
    (isvc(model={"uri": "pvc://m/a.gguf", "size": 1}), "spec.model.size", "unknown field"),
    (isvc(model={"uri": "hf://org/r/m.gguf", "caConfigMapRef": {"name": "ca"}}), "spec.model.caConfigMapRef",
     "https://"),
    (isvc(model={"uri": "https://h/m.gguf", "caConfigMapRef": {"key": "ca.crt"}}), "spec.model.caConfigMapRef.name",
     "ConfigMap's name"),
    (isvc(model={"uri": "https://h/m.gguf", "caConfigMapRef": {"name": "ca", "key": "../x; rm"}}),
     "spec.model.caConfigMapRef.key", "ConfigMap key"),
    (isvc(concurrency=0), "spec.concurrency", "between 1"),
    (isvc(concurrency="4"), "spec.concurrency", "integer"),
    (isvc(concurrency=True), "spec.concurrency", "integer"),
    (isvc(engine="vllm"), "spec.engine", "auto, paged, gguf"),
    (isvc(replicas=-1), "spec.replicas", "between 0"),
    (isvc(replicas=2, autoscaling={"maxReplicas": 3}), "spec.replicas", "not both"),
    (isvc(autoscaling={"minReplicas": 3, "maxReplicas": 2}), "spec.autoscaling.maxReplicas", "at least minReplicas"),
    (isvc(autoscaling={"minReplicas": 1}), "spec.autoscaling.maxReplicas", "required"),
    (isvc(hardware={"accelerator": "gpu"}), "spec.hardware.accelerator", "nvidia.com/gpu"),
    (isvc(hardware={"count": 1}), "spec.hardware.count", "needs spec.hardware.accelerator"),
    (isvc(hardware={"accelerator": "nvidia.com/gpu", "count": 0}), "spec.hardware.count", "at least 1"),
    (isvc(hardware={"cpu": "two"}), "spec.hardware.cpu", "not a quantity"),
    (isvc(hardware={"memory": "1Mi"}), "spec.hardware.memory", "too small"),
    (isvc(hardware={"gpus": 1}), "spec.hardware.gpus", "unknown field"),
    (isvc(engineArgs={"maxModelLen": 0}), "spec.engineArgs.maxModelLen", "positive integer"),
    (isvc(engineArgs={"threads": 100000}), "spec.engineArgs.threads", "at most 1024"),
    (isvc(engineArgs={"maxNumSeqs": 10**9}), "spec.engineArgs.maxNumSeqs", "at most 4096"),
    (isvc(engineArgs={"dtype": "int4"}), "spec.engineArgs.dtype", "not one of"),
    (isvc(engineArgs={"threadWait": "busy"}), "spec.engineArgs.threadWait", "not one of"),
    (isvc(engineArgs={"temperature": 1}), "spec.engineArgs.temperature", "unknown engine argument"),
    (isvc(engineArgs={"enforceEager": "yes"}), "spec.engineArgs.enforceEager", "true or false"),
    (isvc(engineArgs={"kvCacheMemory": "lots"}), "spec.engineArgs.kvCacheMemory", "quantity"),
    (isvc(apiKeySecretRef={"key": "k"}), "spec.apiKeySecretRef.name", "required"),
    (isvc(apiKeySecretRef={"name": "Bad Name"}), "spec.apiKeySecretRef.name", "Secret name"),
    (isvc(cache={"storageClassName": "x"}), "spec.cache.size", "required"),
    (isvc(cache={"size": "20Gi", "accessModes": ["Everything"]}), "spec.cache.accessModes", "ReadWriteOnce"),
    (isvc(podTemplate={"hostNetwork": True}), "spec.podTemplate.hostNetwork", "unknown field"),
    (isvc(podTemplate={"nodeSelector": {"a": 1}}), "spec.podTemplate.nodeSelector", "strings"),
    (isvc(podTemplate={"tolerations": {}}), "spec.podTemplate.tolerations", "list"),
    (isvc(image="evil"), "spec.image", "unknown field"),
])
def test_invalid_spec_names_the_field(obj: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        parse_spec(obj)
    assert e.value.field == field
    assert str(e.value).startswith(field + ": ")
    assert words in str(e.value)


@pytest.mark.parametrize(("uri", "scheme", "fmt", "local"), [
    ("pvc://models/smollm2/a.gguf", "pvc", "gguf", "a.gguf"),
    ("file:///srv/models/b.GGUF", "file", "gguf", "b.GGUF"),
    ("file:///srv/models/llama/", "file", "safetensors", "llama"),
    ("https://h.example:8443/x/c.gguf?sig=1", "https", "gguf", "c.gguf"),
    ("http://127.0.0.1:9/d.safetensors", "http", "safetensors", "d.safetensors"),
    ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "hf", "safetensors", "SmolLM2-135M-Instruct"),
    ("hf://org/repo-GGUF/sub/e.Q4_K_M.gguf@main", "hf", "gguf", "e.Q4_K_M.gguf"),
])
def test_model_uris(uri: str, scheme: str, fmt: str, local: str) -> None:
    m = parse_model_uri(uri)
    assert (m.scheme, m.format, m.local_name) == (scheme, fmt, local)


def test_uri_errors_are_gearshift_errors() -> None:
    for bad in ("", "   ", "hf://org/repo@", "pvc://models/../etc/passwd", "https://", "file:///a b"):
        with pytest.raises(GearshiftError):
            parse_model_uri(bad)


@pytest.mark.parametrize(("q", "v"), [("500m", 0.5), ("2", 2), (3, 3), ("1.5", 1.5), ("4Gi", 4 * 2**30),
                                      ("1G", 1e9), ("512Mi", 512 * 2**20), (".5", 0.5)])
def test_quantities(q: Any, v: float) -> None:
    assert parse_quantity(q, "f") == v
