"""The operator's only writer: server-side apply of children, status patches, Events.

`needs_apply` (pure) decides whether a child must be written: never when the live object already
carries the desired spec hash and holds every desired field (so a timer or a watch event does not
re-apply), always when the spec changed (the hash) or someone edited our fields (drift).
Writes use server-side apply (`application/apply-patch+yaml`) under one fixed field manager, so the
operator owns exactly the fields it sets and never fights an HPA over `replicas`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from gearshift.engine.quantity import same_quantity

FIELD_MANAGER = "gearshift-operator"
HASH_ANNOTATION = "gearshift.dev/applied-hash"

# (apiVersion, kind) -> plural resource name, for the children and the owner.
PLURALS = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("autoscaling/v2beta2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("policy/v1beta1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("gearshift.dev/v1alpha1", "InferenceService"): "inferenceservices",
}


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------ pure helpers


def spec_hash(obj: dict[str, Any]) -> str:
    """A stable hash of a desired child (without our own annotation)."""
    clean = json.loads(json.dumps(obj))
    meta = clean.get("metadata", {})
    if HASH_ANNOTATION in (meta.get("annotations") or {}):
        del meta["annotations"][HASH_ANNOTATION]
        if not meta["annotations"]:
            del meta["annotations"]
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(obj))
    out["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = spec_hash(obj)
    return out


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    # The API server canonicalizes quantities ("1000m" -> "1", "0.5" -> "500m") and int-or-strings.
    if isinstance(want, (str, int)) and isinstance(have, (str, int)) and not isinstance(want, bool):
        return same_quantity(want, have)
    return False


def contains(want: Any, have: Any) -> bool:
    """Every field of `want` is in `have` with the same value (defaults the server added are fine)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and contains(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) >= len(want) and all(
            contains(w, h) for w, h in zip(want, have, strict=False))
    return _same_scalar(want, have)


def needs_apply(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """`desired` carries its hash annotation (from with_hash)."""
    if live is None:
        return True
    want_hash = desired["metadata"]["annotations"][HASH_ANNOTATION]
    if (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION) != want_hash:
        return True
    return not contains({k: v for k, v in desired.items() if k != "status"}, live)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ the client


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")


class Kube:
    """A thin JSON client over the kubernetes package's configured ApiClient (auth, TLS, exec plugins)."""

    def __init__(self, api_client: Any, field_manager: str = FIELD_MANAGER) -> None:
        self.api = api_client
        self.field_manager = field_manager
        self.counts: Counter[str] = Counter()  # method -> requests made, for logs and bench
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: list[tuple[str, str]] | None = None) -> dict[str, Any] | None:
        with self._lock:
            self.counts[method] += 1
        m, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(m, url, header_params=headers, body=body, _request_timeout=30)
        resp.read()
        text = resp.data.decode("utf-8") if resp.data else ""
        data = json.loads(text) if text.startswith("{") else None
        if not 200 <= resp.status <= 299:
            message = (data or {}).get("message") or text[:300] or resp.reason
            raise KubeError(resp.status, message)
        return data

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None,
             label_selector: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """(items with apiVersion and kind filled in, the list's resourceVersion) from the server itself."""
        query = [("labelSelector", label_selector)] if label_selector else []
        data = self.request("GET", object_path(api_version, kind, namespace), query=query) or {}
        items = data.get("items") or []
        for item in items:
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items, int((data.get("metadata") or {}).get("resourceVersion") or 0)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply; force: this manager is the one owner of the fields it sets."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        out = self.request("PATCH", path, obj, content_type="application/apply-patch+yaml",
                           query=[("fieldManager", self.field_manager), ("force", "true")])
        assert out is not None
        return out

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name),
                         {"propagationPolicy": "Background"})
        except KubeError as e:
            if e.status != 404:
                raise

    def patch_status(self, owner: dict[str, Any], status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource (never spec). None when the owner is gone."""
        meta = owner["metadata"]
        path = object_path(owner["apiVersion"], owner["kind"], meta["namespace"], meta["name"]) + "/status"
        try:
            return self.request("PATCH", path, {"status": status}, content_type="application/merge-patch+json")
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        ts = now_iso()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
            "source": {"component": self.field_manager},
            "reportingComponent": f"gearshift.dev/{self.field_manager}", "reportingInstance": self.field_manager,
        }
        try:
            self.request("POST", object_path("v1", "Event", meta["namespace"]), body)
        except KubeError:
            pass  # an event is best effort: never fail a reconcile over one

    def served_version(self, group: str, preferred: list[str]) -> str:
        """The first of `preferred` versions the server serves for `group` (discovery)."""
        try:
            data = self.request("GET", f"/apis/{group}") or {}
        except KubeError:
            data = {}
        served = {v["version"] for v in data.get("versions", [])}
        for v in preferred:
            if v in served:
                return f"{group}/{v}"
        return f"{group}/{preferred[-1]}"
