"""Spec + engine plan -> the child manifests (Deployment, Service, PVC, HPA, PDB) as plain dicts.

Pure: no Kubernetes client. The same functions render `gearshift plan`, feed the operator's
server-side apply, and give `gearshift up` its `gearshift serve` arguments, so the three never drift.
No spec field ever reaches a shell: the pods run `gearshift` with an argument list.
"""

from __future__ import annotations

from typing import Any

from gearshift.engine.config import EngineConfig
from gearshift.engine.settings import to_flags
from gearshift.operator.policy import EnginePlan
from gearshift.operator.spec import API_VERSION, ENGINE_ARGS, KIND, POD_SPEC_PASSTHROUGH, InferenceServiceSpec

PORT = 8000
PRESTOP_SECONDS = 10  # endpoint removal reaches kube-proxy in about a second; slow control planes take more
MODELS_DIR = "/models"
MODEL_CA_DIR = "/etc/gearshift/model-ca"  # a private CA bundle for https:// downloads (spec.model.caConfigMapRef)
MANAGED_BY = "gearshift-operator"
ENGINE_LABEL = "gearshift.dev/engine"
INSTANCE_LABEL = "app.kubernetes.io/instance"
RUN_AS = 1000
# A model load (download + read + warm-up) may take many minutes; liveness waits for the startup probe.
STARTUP_SECONDS = 30 * 60
FETCH_IMAGE_PULL_POLICY = "IfNotPresent"


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment's selector: immutable, so it never holds the engine (an engine switch rolls out)."""
    return {"app.kubernetes.io/name": "gearshift", INSTANCE_LABEL: name}


def labels(spec: InferenceServiceSpec, plan: EnginePlan) -> dict[str, str]:
    return {
        **selector_labels(spec.name),
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/part-of": "gearshift",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        ENGINE_LABEL: plan.engine,
    }


def owner_reference(owner: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The InferenceService as the children's controller, so deleting it garbage-collects them.
    Without a uid (a file `gearshift plan` read) there is nothing to point at."""
    meta = (owner or {}).get("metadata") or {}
    if not meta.get("uid"):
        return []
    return [{"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}]


def _meta(spec: InferenceServiceSpec, plan: EnginePlan, name: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": spec.namespace, "labels": labels(spec, plan)}
    refs = owner_reference(owner)
    if refs:
        meta["ownerReferences"] = refs
    return meta


def cache_claim_name(spec: InferenceServiceSpec) -> str:
    return f"{spec.name}-model-cache"


def model_path(spec: InferenceServiceSpec) -> str:
    """Where the serving container finds the model."""
    uri = spec.model.uri
    if uri.scheme == "file":  # baked into the image (or, under the e2e node agent, on the host)
        return uri.path
    if uri.scheme == "pvc":
        return f"{MODELS_DIR}/{uri.path}"
    return f"{MODELS_DIR}/{uri.local_name}"


def needs_fetch(spec: InferenceServiceSpec) -> bool:
    return spec.model.uri.scheme in ("https", "http", "hf")


def serve_args(spec: InferenceServiceSpec, plan: EnginePlan, model: str, host: str, port: int) -> list[str]:
    """`gearshift serve` arguments for the plan (everything after the program name); flags come from
    the EngineConfig fields, so they are what `gearshift serve` parses."""
    values = {"engine": plan.engine, "model": model, "served_model_name": spec.model.served_name,
              "host": host, "port": port, "device": plan.device, "max_num_seqs": plan.max_num_seqs,
              "threads": plan.threads, "kv_cache_memory": plan.kv_cache_memory,
              "tensor_parallel_size": plan.tensor_parallel if plan.tensor_parallel > 1 else None,
              "max_waiting": plan.max_waiting}
    values.update((ENGINE_ARGS[key].name, value) for key, value in sorted(plan.engine_args.items()))
    return ["serve", *to_flags(EngineConfig, values)]


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _writable_env() -> list[dict[str, Any]]:
    """The root filesystem is read-only: every cache goes to the /tmp emptyDir."""
    return [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
            {"name": "TRITON_CACHE_DIR", "value": "/tmp/.triton"}, {"name": "PYTHONUNBUFFERED", "value": "1"}]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def deployment(spec: InferenceServiceSpec, plan: EnginePlan, image: str,
               owner: dict[str, Any] | None = None) -> dict[str, Any]:
    pod_labels = {**spec.pod_template.get("labels", {}), **labels(spec, plan)}  # ours win: the selector
    annotations = {**spec.pod_template.get("annotations", {}), "prometheus.io/scrape": "true",
                   "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    init = _model_source(spec, image, volumes, mounts)
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(spec.name)},
        "strategy": rollout_strategy(spec),
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": STARTUP_SECONDS,
        "template": {"metadata": {"labels": pod_labels, "annotations": annotations},
                     "spec": _pod_spec(spec, _engine_container(spec, plan, image, mounts), volumes, init)},
    }
    if spec.autoscaling is None:  # with an HPA the replica count is the HPA's field, not ours
        dep_spec["replicas"] = spec.replicas
    elif spec.autoscaling.controller == "operator":  # the reconcile sets it from observed load
        dep_spec["replicas"] = spec.autoscaling.min_replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, plan, spec.name, owner),
            "spec": dep_spec}


def _engine_env(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, *_writable_env()]
    if spec.api_key_secret:
        name, key = spec.api_key_secret
        env.append({"name": "GEARSHIFT_API_KEY", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    return env


def _model_source(spec: InferenceServiceSpec, image: str, volumes: list[dict[str, Any]],
                  mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the model's volume (a claim, or the download target) and its mount; return the init
    containers that download it (none for a claim or a file in the image)."""
    init: list[dict[str, Any]] = []
    uri = spec.model.uri
    if uri.scheme == "pvc":
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": uri.claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    elif needs_fetch(spec):
        if spec.cache:
            volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": cache_claim_name(spec)}})
        else:
            volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
        init.append(_fetch_container(spec, image))
        if spec.model.ca_config_map:
            name, key = spec.model.ca_config_map  # the key is mapped to a fixed file name: no CR text in args
            volumes.append({"name": "model-ca", "configMap": {"name": name, "items": [{"key": key, "path": "ca.crt"}]}})
    return init


def _engine_container(spec: InferenceServiceSpec, plan: EnginePlan, image: str,
                      mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "engine",
        "image": image,
        "command": ["gearshift"],
        # $(POD_IP) is expanded by the kubelet, not a shell: each pod binds its own address.
        "args": serve_args(spec, plan, model_path(spec), "$(POD_IP)", PORT),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": _engine_env(spec),
        "resources": {"requests": dict(plan.requests), "limits": dict(plan.limits)},
        "volumeMounts": mounts,
        "startupProbe": _probe("/health", 5, STARTUP_SECONDS // 5),
        "readinessProbe": _probe("/ready", 5, 2),
        "livenessProbe": _probe("/health", 10, 3),
        # Deleting a pod sends SIGTERM while its endpoint is still being removed from every node's
        # kube-proxy; requests routed there meanwhile would meet a draining server (503). Serving on
        # for PRESTOP_SECONDS first lets the endpoint go; then SIGTERM drains what is in flight.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _pod_spec(spec: InferenceServiceSpec, container: dict[str, Any], volumes: list[dict[str, Any]],
              init: list[dict[str, Any]]) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the engine never talks to the API server
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        # preStop, then the server's drain (up to 30 s), then margin.
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + 50,
        "containers": [container],
        "volumes": volumes,
    }
    if init:
        pod_spec["initContainers"] = init
    for key in POD_SPEC_PASSTHROUGH:  # the allow-list spec.py validates; all else is ours to set
        if key in spec.pod_template:
            pod_spec[key] = spec.pod_template[key]
    return pod_spec


def rollout_strategy(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Surge (a new pod ready before an old one goes: zero downtime) needs room for one more pod: a
    spare accelerator, and a cache claim the new pod can mount wherever it lands. Without that room the
    surge pod waits (Pending, or ContainerCreating on a claim attached elsewhere) until the 30-minute
    progress deadline while the old pod keeps what it needs. Then replace in place: one pod goes, its
    successor takes its GPU / claim (a short gap per replica, but the rollout finishes)."""
    rwo_cache = spec.cache is not None and needs_fetch(spec) and "ReadWriteMany" not in spec.cache.access_modes
    if spec.hardware.accelerator or rwo_cache:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def _fetch_container(spec: InferenceServiceSpec, image: str) -> dict[str, Any]:
    args = ["fetch", spec.model.uri.uri, MODELS_DIR]
    if spec.model.sha256:
        args += ["--sha256", spec.model.sha256]
    env = [*_writable_env(), {"name": "HF_HOME", "value": f"{MODELS_DIR}/.hf"}]
    if spec.model.token_secret:
        name, key = spec.model.token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "models", "mountPath": MODELS_DIR}]
    if spec.model.ca_config_map:
        mounts.append({"name": "model-ca", "mountPath": MODEL_CA_DIR, "readOnly": True})
        args += ["--ca-file", f"{MODEL_CA_DIR}/ca.crt"]
    return {
        "name": "fetch",
        "image": image,
        "imagePullPolicy": FETCH_IMAGE_PULL_POLICY,
        "command": ["gearshift"],
        "args": args,
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": mounts,
        "securityContext": _security_context(),
        # The download error becomes the container's termination message, which status surfaces.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def service(spec: InferenceServiceSpec, plan: EnginePlan, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, plan, spec.name, owner),
            "spec": {"type": "ClusterIP", "selector": selector_labels(spec.name),
                     "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]}}


def cache_pvc(spec: InferenceServiceSpec, plan: EnginePlan, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    assert spec.cache is not None
    pvc_spec: dict[str, Any] = {"accessModes": list(spec.cache.access_modes),
                                "resources": {"requests": {"storage": spec.cache.size}}}
    if spec.cache.storage_class is not None:
        pvc_spec["storageClassName"] = spec.cache.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(spec, plan, cache_claim_name(spec), owner), "spec": pvc_spec}


# The engine's Prometheus gauge (engine/server/metrics.py), as a metrics adapter exposes it to the HPA.
REQUESTS_RUNNING_METRIC = "gearshift:num_requests_running"


def hpa(spec: InferenceServiceSpec, plan: EnginePlan, api_version: str = "autoscaling/v2",
        owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """autoscaling/v2 and v2beta2 share these fields; the version is whichever the server serves."""
    a = spec.autoscaling
    assert a is not None
    if a.target_concurrency:  # needs a metrics adapter serving the engine's Prometheus gauge
        metric = {"type": "Pods", "pods": {"metric": {"name": REQUESTS_RUNNING_METRIC},
                                           "target": {"type": "AverageValue",
                                                      "averageValue": str(a.target_concurrency)}}}
    else:
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": a.target_cpu_utilization}}}
    return {"apiVersion": api_version, "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(spec, plan, spec.name, owner),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                     "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas, "metrics": [metric]}}


def wants_pdb(spec: InferenceServiceSpec) -> bool:
    return spec.autoscaling.max_replicas > 1 if spec.autoscaling else spec.replicas > 1


def pdb(spec: InferenceServiceSpec, plan: EnginePlan, api_version: str = "policy/v1",
        owner: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "PodDisruptionBudget",
            "metadata": _meta(spec, plan, spec.name, owner),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(spec.name)}}}


def children(spec: InferenceServiceSpec, plan: EnginePlan, image: str, owner: dict[str, Any] | None = None,
             hpa_version: str = "autoscaling/v2", pdb_version: str = "policy/v1") -> list[dict[str, Any]]:
    """Every child the spec wants, in apply order (the claim before the pods that mount it)."""
    out = []
    if spec.cache and needs_fetch(spec):
        out.append(cache_pvc(spec, plan, owner))
    out.append(service(spec, plan, owner))
    out.append(deployment(spec, plan, image, owner))
    if spec.autoscaling and spec.autoscaling.controller == "hpa":
        out.append(hpa(spec, plan, hpa_version, owner))
    if wants_pdb(spec):
        out.append(pdb(spec, plan, pdb_version, owner))
    return out


def url(spec: InferenceServiceSpec) -> str:
    return f"http://{spec.name}.{spec.namespace}.svc:{PORT}/v1"
