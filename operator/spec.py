"""The InferenceService spec as validated dataclasses. Pure: no Kubernetes client, no I/O.

The CRD's OpenAPI schema rejects most bad objects at the API server, but old servers ignore the CEL
rules and `gearshift plan`/`up` read files no server has seen, so everything is validated again here.
Every error names the field (spec.model.uri, spec.hardware.count, ...) and says what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, get_args

from gearshift.engine import quantity
from gearshift.engine.config import EngineConfig, EngineName
from gearshift.engine.errors import GearshiftError
from gearshift.engine.fetch import ModelURI, parse_model_uri
from gearshift.engine.settings import Declared, SettingError, check, engine_args

GROUP = "gearshift.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
ENGINES = ("auto", *get_args(EngineName))
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_RESOURCE_NAME = re.compile(r"([a-z0-9.-]+/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?")


class InvalidSpec(GearshiftError):
    """The spec cannot be served as written. `field` is the JSON path of the offending field."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


def parse_quantity(value: Any, field_path: str) -> float:
    """A Kubernetes quantity ("500m", "2", "4Gi") -> a number (cores or bytes); errors name the field."""
    try:
        return quantity.parse_quantity(value)
    except quantity.QuantityError as e:
        raise InvalidSpec(field_path, str(e)) from None


# engineArgs key -> the EngineConfig field it sets (its type, engines, bounds and CLI flag)
ENGINE_ARGS: dict[str, Declared] = engine_args(EngineConfig)


@dataclass(frozen=True)
class Model:
    uri: ModelURI
    served_name: str
    sha256: str | None = None
    token_secret: tuple[str, str] | None = None  # (secret name, key) holding HF_TOKEN for hf://
    ca_config_map: tuple[str, str] | None = None  # (ConfigMap name, key): a private CA's PEM for https://


@dataclass(frozen=True)
class Hardware:
    accelerator: str | None = None  # an extended resource name, e.g. nvidia.com/gpu
    count: int = 0  # accelerators per replica (0 without one)
    cpu: str | None = None  # cores per replica, a Kubernetes quantity
    memory: str | None = None  # bytes per replica, a Kubernetes quantity

    @property
    def cpu_cores(self) -> float | None:
        return None if self.cpu is None else parse_quantity(self.cpu, "spec.hardware.cpu")

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else int(parse_quantity(self.memory, "spec.hardware.memory"))


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    target_concurrency: int | None = None  # requests running per pod; None: CPU utilization
    target_cpu_utilization: int = 80
    controller: str = "hpa"  # hpa (an HPA; targetConcurrency needs a metrics adapter) | operator (built in)


GEAR_MODES = ("advise", "auto")
AUTOSCALING_CONTROLLERS = ("hpa", "operator")


@dataclass(frozen=True)
class GearShift:
    """spec.gearShift: advise about (or, in auto, switch to) the engine the observed load wants."""
    mode: str = "advise"
    window: float = 600.0  # seconds of observed load the advice looks at, and must hold for in auto
    cooldown: float = 600.0  # seconds after a shift before the next one
    window_text: str = "10m"
    cooldown_text: str = "10m"


@dataclass(frozen=True)
class Cache:
    size: str
    storage_class: str | None = None
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)


@dataclass(frozen=True)
class InferenceServiceSpec:
    name: str
    namespace: str
    model: Model
    concurrency: int = 1
    hardware: Hardware = field(default_factory=Hardware)
    engine: str = "auto"
    replicas: int = 1
    autoscaling: Autoscaling | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    api_key_secret: tuple[str, str] | None = None  # (secret name, key)
    cache: Cache | None = None
    pod_template: dict[str, Any] = field(default_factory=dict)
    gear_shift: GearShift = field(default_factory=GearShift)


# podTemplate: an explicit allow-list. These are passed through as the namespace admin's trusted choice
# (where the pods may run and at what priority); everything else in the pod (security contexts,
# volumes, commands, host namespaces) is the operator's. README "Security" says which of these a
# cluster admin should restrict with policy (tolerations, priorityClassName, runtimeClassName, ...).
POD_SPEC_PASSTHROUGH = ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName",
                        "imagePullSecrets", "runtimeClassName")
_POD_TEMPLATE_FIELDS = ("labels", "annotations", *POD_SPEC_PASSTHROUGH)
# Pod annotations that would loosen the sandbox the operator sets (AppArmor, the legacy seccomp keys
# that Kubernetes < 1.27 still honours): a spec cannot set them.
DENIED_ANNOTATION_PREFIXES = ("container.apparmor.security.beta.kubernetes.io/", "seccomp.security.alpha.kubernetes.io/",
                              "container.seccomp.security.alpha.kubernetes.io/")
_SPEC_FIELDS = ("model", "concurrency", "hardware", "engine", "replicas", "autoscaling", "engineArgs",
                "apiKeySecretRef", "cache", "podTemplate", "gearShift")


def parse_spec(obj: dict[str, Any]) -> InferenceServiceSpec:
    """An InferenceService object (as from the API or a YAML file) -> a validated spec."""
    if not isinstance(obj, dict):
        raise InvalidSpec("(document)", "an InferenceService must be a mapping")
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS1035.fullmatch(name) or len(name) > 52:
        # 52: the Service takes the name (DNS-1035, 63) and children append up to "-model-cache".
        raise InvalidSpec("metadata.name", f"{name!r} must be a DNS-1035 label of at most 52 characters")
    namespace = meta.get("namespace") or "default"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidSpec("spec", "missing; an InferenceService needs at least spec.model.uri")
    unknown = sorted(set(spec) - set(_SPEC_FIELDS))
    if unknown:
        raise InvalidSpec(f"spec.{unknown[0]}", f"unknown field; allowed: {', '.join(_SPEC_FIELDS)}")

    model = _model(_mapping(spec, "model", required=True), name)
    concurrency = _int(spec, "concurrency", "spec.concurrency", 1, minimum=1, maximum=4096)
    hardware = _hardware(_mapping(spec, "hardware"))
    engine = spec.get("engine", "auto")
    if engine not in ENGINES:
        raise InvalidSpec("spec.engine", f"{engine!r} is not one of {', '.join(ENGINES)}")
    autoscaling = _autoscaling(spec.get("autoscaling"))
    if autoscaling is not None and "replicas" in spec:
        raise InvalidSpec("spec.replicas", "set either replicas or autoscaling, not both")
    replicas = _int(spec, "replicas", "spec.replicas", 1, minimum=0, maximum=1000)
    return InferenceServiceSpec(
        name=name,
        namespace=namespace,
        model=model,
        concurrency=concurrency,
        hardware=hardware,
        engine=engine,
        replicas=replicas,
        autoscaling=autoscaling,
        engine_args=_engine_args(_mapping(spec, "engineArgs")),
        api_key_secret=_secret_ref(spec.get("apiKeySecretRef"), "spec.apiKeySecretRef"),
        cache=_cache(spec.get("cache")),
        pod_template=_pod_template(_mapping(spec, "podTemplate")),
        gear_shift=_gear_shift(_mapping(spec, "gearShift")),
    )


def _mapping(d: dict[str, Any], key: str, required: bool = False, prefix: str = "spec") -> dict[str, Any]:
    v = d.get(key)
    if v is None:
        if required:
            raise InvalidSpec(f"{prefix}.{key}", "is required")
        return {}
    if not isinstance(v, dict):
        raise InvalidSpec(f"{prefix}.{key}", f"must be a mapping, got {type(v).__name__}")
    return v


def _int(d: dict[str, Any], key: str, path: str, default: int, minimum: int, maximum: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidSpec(path, f"must be an integer, got {v!r}")
    if not minimum <= v <= maximum:
        raise InvalidSpec(path, f"must be between {minimum} and {maximum}, got {v}")
    return v


def _model(m: dict[str, Any], default_name: str) -> Model:
    allowed = ("uri", "servedName", "sha256", "tokenSecretRef", "caConfigMapRef")
    unknown = sorted(set(m) - set(allowed))
    if unknown:
        raise InvalidSpec(f"spec.model.{unknown[0]}", f"unknown field; allowed: {', '.join(allowed)}")
    try:
        uri = parse_model_uri(m.get("uri", ""))
    except GearshiftError as e:
        raise InvalidSpec("spec.model.uri", str(e)) from None
    served = m.get("servedName", default_name)
    if not isinstance(served, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", served):
        raise InvalidSpec("spec.model.servedName", f"{served!r}: use letters, digits and . _ : / - (max 128)")
    sha = m.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise InvalidSpec("spec.model.sha256", "must be 64 lowercase hex digits")
    if sha is not None and uri.scheme not in ("https", "http", "file") and not (uri.scheme == "hf" and uri.path):
        raise InvalidSpec("spec.model.sha256", "is checked on downloaded files only (https://, file://, hf://.../file)")
    token = _secret_ref(m.get("tokenSecretRef"), "spec.model.tokenSecretRef")
    ca = _secret_ref(m.get("caConfigMapRef"), "spec.model.caConfigMapRef", kind="ConfigMap", default_key="ca.crt")
    if ca is not None and uri.scheme != "https":
        raise InvalidSpec("spec.model.caConfigMapRef", "is the CA for an https:// model uri; this uri is not one")
    return Model(uri=uri, served_name=served, sha256=sha, token_secret=token, ca_config_map=ca)


def _hardware(h: dict[str, Any]) -> Hardware:
    unknown = sorted(set(h) - {"accelerator", "count", "cpu", "memory"})
    if unknown:
        raise InvalidSpec(f"spec.hardware.{unknown[0]}", "unknown field; allowed: accelerator, count, cpu, memory")
    acc = h.get("accelerator")
    if acc is not None and (not isinstance(acc, str) or not _RESOURCE_NAME.fullmatch(acc) or "/" not in acc):
        raise InvalidSpec("spec.hardware.accelerator", f"{acc!r} is not an extended resource name like nvidia.com/gpu")
    count = _int(h, "count", "spec.hardware.count", 1 if acc else 0, minimum=0, maximum=64)
    if acc and count < 1:
        raise InvalidSpec("spec.hardware.count", "must be at least 1 when an accelerator is set")
    if not acc and count:
        raise InvalidSpec("spec.hardware.count", "needs spec.hardware.accelerator")
    cpu, memory = h.get("cpu"), h.get("memory")
    hw = Hardware(accelerator=acc, count=count, cpu=None if cpu is None else str(cpu),
                  memory=None if memory is None else str(memory))
    if hw.cpu is not None and hw.cpu_cores <= 0:  # type: ignore[operator]
        raise InvalidSpec("spec.hardware.cpu", "must be more than 0")
    if hw.memory is not None and hw.memory_bytes < 64 * 2**20:  # type: ignore[operator]
        raise InvalidSpec("spec.hardware.memory", f"{memory!r} is too small to load a model (min 64Mi)")
    return hw


def _autoscaling(a: Any) -> Autoscaling | None:
    if a is None:
        return None
    if not isinstance(a, dict):
        raise InvalidSpec("spec.autoscaling", "must be a mapping")
    unknown = sorted(set(a) - {"minReplicas", "maxReplicas", "targetConcurrency", "targetCPUUtilization",
                               "controller"})
    if unknown:
        raise InvalidSpec(f"spec.autoscaling.{unknown[0]}", "unknown field")
    lo = _int(a, "minReplicas", "spec.autoscaling.minReplicas", 1, minimum=1, maximum=1000)
    if "maxReplicas" not in a:
        raise InvalidSpec("spec.autoscaling.maxReplicas", "is required")
    hi = _int(a, "maxReplicas", "spec.autoscaling.maxReplicas", 1, minimum=1, maximum=1000)
    if hi < lo:
        raise InvalidSpec("spec.autoscaling.maxReplicas", f"({hi}) must be at least minReplicas ({lo})")
    target = a.get("targetConcurrency")
    if target is not None:
        target = _int(a, "targetConcurrency", "spec.autoscaling.targetConcurrency", 1, minimum=1, maximum=4096)
    cpu = _int(a, "targetCPUUtilization", "spec.autoscaling.targetCPUUtilization", 80, minimum=1, maximum=100)
    controller = a.get("controller", "hpa")
    if controller not in AUTOSCALING_CONTROLLERS:
        raise InvalidSpec("spec.autoscaling.controller", f"{controller!r} is not one of hpa, operator")
    if controller == "operator" and target is None:
        raise InvalidSpec("spec.autoscaling.targetConcurrency", "is required with controller operator "
                                                                "(the operator scales on observed concurrency)")
    return Autoscaling(lo, hi, target, cpu, controller)


_DURATION = re.compile(r"(\d+)(s|m|h)?")
_DURATION_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: Any, field_path: str) -> float:
    """"30s", "10m", "1h" or a number of seconds -> seconds."""
    m = _DURATION.fullmatch(str(value).strip()) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if m is None:
        raise InvalidSpec(field_path, f"{value!r} is not a duration; use e.g. 30s, 10m, 1h")
    return float(int(m.group(1)) * _DURATION_UNIT[m.group(2) or ""])


def _gear_shift(g: dict[str, Any]) -> GearShift:
    unknown = sorted(set(g) - {"mode", "window", "cooldown"})
    if unknown:
        raise InvalidSpec(f"spec.gearShift.{unknown[0]}", "unknown field; allowed: mode, window, cooldown")
    mode = g.get("mode", "advise")
    if mode not in GEAR_MODES:
        raise InvalidSpec("spec.gearShift.mode", f"{mode!r} is not one of {', '.join(GEAR_MODES)}")
    window_text, cooldown_text = str(g.get("window", "10m")), str(g.get("cooldown", "10m"))
    window = parse_duration(g.get("window", "10m"), "spec.gearShift.window")
    cooldown = parse_duration(g.get("cooldown", "10m"), "spec.gearShift.cooldown")
    if not 10 <= window <= 86400:
        raise InvalidSpec("spec.gearShift.window", f"must be between 10s and 24h, got {window_text}")
    if cooldown > 86400:
        raise InvalidSpec("spec.gearShift.cooldown", f"must be at most 24h, got {cooldown_text}")
    return GearShift(mode, window, cooldown, window_text, cooldown_text)


def _engine_args(args: dict[str, Any]) -> dict[str, Any]:
    """Each key checked by the EngineConfig field it sets; values stay as written (the pod's flags)."""
    for key, value in args.items():
        if key not in ENGINE_ARGS:
            raise InvalidSpec(f"spec.engineArgs.{key}", f"unknown engine argument; allowed: {', '.join(ENGINE_ARGS)}")
        try:
            check(ENGINE_ARGS[key], value)
        except SettingError as e:
            raise InvalidSpec(f"spec.engineArgs.{key}", e.reason) from None
    return dict(args)


def _secret_ref(ref: Any, path: str, kind: str = "Secret", default_key: str = "token") -> tuple[str, str] | None:
    """(name, key) of a Secret or ConfigMap key reference, checked as the API server would."""
    if ref is None:
        return None
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
        raise InvalidSpec(f"{path}.name", f"is required: the {kind}'s name")
    name, key = ref["name"], ref.get("key", default_key)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        raise InvalidSpec(f"{path}.name", f"{name!r} is not a valid {kind} name")
    if not isinstance(key, str) or not re.fullmatch(r"[-._a-zA-Z0-9]+", key) or len(key) > 253:
        raise InvalidSpec(f"{path}.key", f"{key!r} is not a valid {kind} key")
    return name, key


def _cache(c: Any) -> Cache | None:
    if c is None:
        return None
    if not isinstance(c, dict) or "size" not in c:
        raise InvalidSpec("spec.cache.size", "is required when spec.cache is set, e.g. 20Gi")
    parse_quantity(c["size"], "spec.cache.size")
    sc = c.get("storageClassName")
    if sc is not None and not isinstance(sc, str):
        raise InvalidSpec("spec.cache.storageClassName", "must be a string")
    modes = c.get("accessModes", ["ReadWriteOnce"])
    allowed = ("ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod")
    if not isinstance(modes, list) or not modes or any(m not in allowed for m in modes):
        raise InvalidSpec("spec.cache.accessModes", f"must be a list of {', '.join(allowed)}")
    return Cache(size=str(c["size"]), storage_class=sc, access_modes=tuple(modes))


def _pod_template(p: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(p) - set(_POD_TEMPLATE_FIELDS))
    if unknown:
        raise InvalidSpec(f"spec.podTemplate.{unknown[0]}", f"unknown field; allowed: {', '.join(_POD_TEMPLATE_FIELDS)}")
    for key in ("nodeSelector", "labels", "annotations"):
        v = p.get(key)
        if v is not None and (not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values())):
            raise InvalidSpec(f"spec.podTemplate.{key}", "must map strings to strings")
    for key in p.get("annotations") or {}:
        if key.startswith(DENIED_ANNOTATION_PREFIXES):
            raise InvalidSpec("spec.podTemplate.annotations",
                              f"{key!r} would change the pods' security profile, which the operator sets "
                              "(RuntimeDefault seccomp, the runtime's AppArmor default)")
    for key in ("tolerations", "imagePullSecrets"):
        if key in p and not isinstance(p[key], list):
            raise InvalidSpec(f"spec.podTemplate.{key}", "must be a list")
    if "affinity" in p and not isinstance(p["affinity"], dict):
        raise InvalidSpec("spec.podTemplate.affinity", "must be a mapping")
    for key in ("priorityClassName", "serviceAccountName", "runtimeClassName"):
        if key in p and not isinstance(p[key], str):
            raise InvalidSpec(f"spec.podTemplate.{key}", "must be a string")
    return dict(p)
