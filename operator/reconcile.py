"""Level-based reconcile of one InferenceService against a watch-fed cache of its children.

Every trigger (the owner changed, a child or pod changed, the periodic resync, a retry) runs the same
function: parse + decide -> desired children -> apply those whose hash or fields differ -> delete those
no longer wanted -> status from the children -> patch status if it changed. With nothing changed it reads
only the in-memory cache and writes nothing, so hundreds of resources cost no API calls at rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gearshift.operator import builders
from gearshift.operator.apply import HASH_ANNOTATION, Kube, KubeError, needs_apply, now_iso, with_hash
from gearshift.operator.blocked import ChildBlocked, conflict, controlled_by, rejected
from gearshift.operator.observe import Observer, gear_step, merge_gear, override
from gearshift.operator.policy import decide
from gearshift.operator.spec import API_VERSION, KIND, InvalidSpec, parse_spec
from gearshift.operator.status import compute_status, differs, known_unsupported, newly_degraded, writable

log = logging.getLogger("gearshift.operator")
Key = tuple[str, str]  # (namespace, name) of an InferenceService
# The label every child carries: the watches and the relist ask the API server for these objects only.
CHILD_SELECTOR = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}
# Kinds whose presence depends on the spec: deleted when the spec stops wanting them.
OPTIONAL_KINDS = ("HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim")
# Before the watches have listed everything, a cache miss may be a child that exists: GET it first.
PRIME_SECONDS = 10.0
# A ChildConflict's object carries none of our labels, so no watch tells when it goes: look again this often.
CONFLICT_RECHECK_SECONDS = 30.0


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Cache:
    """Objects last seen per (kind, namespace, name); never goes back to an older resourceVersion."""

    def __init__(self) -> None:
        self._objs: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        with self._lock:
            old = self._objs.get(key)
            if old is None or _rv(obj) >= _rv(old) or old["metadata"].get("uid") != meta.get("uid"):
                self._objs[key] = obj
            return self._objs[key]

    def drop(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with self._lock:
            old = self._objs.get((obj["kind"], meta.get("namespace", ""), meta["name"]))
            if old is not None and old["metadata"].get("uid") == meta.get("uid"):
                del self._objs[(obj["kind"], meta.get("namespace", ""), meta["name"])]

    def replace(self, kind: str, namespace: str | None, listed: list[dict[str, Any]], list_rv: int) -> int:
        """Make the cache agree with a LIST of `kind` (in `namespace`, or everywhere when None): what the
        list holds is put, what it lacks is dropped unless the cache saw it after the list was taken.
        Returns how many were dropped (objects deleted while a watch was away)."""
        for obj in listed:
            self.put(obj)
        uids = {o["metadata"].get("uid") for o in listed}
        dropped = 0
        with self._lock:
            for key, obj in list(self._objs.items()):
                if key[0] == kind and (namespace is None or key[1] == namespace) \
                        and obj["metadata"].get("uid") not in uids and _rv(obj) <= list_rv:
                    del self._objs[key]
                    dropped += 1
        return dropped

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objs.get((kind, namespace, name))

    def select(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        with self._lock:
            objs = [o for (k, ns, _), o in self._objs.items() if k == kind and ns == namespace]
        return [o for o in objs if all((o["metadata"].get("labels") or {}).get(a) == b for a, b in labels.items())]

    def keys(self, kind: str) -> list[Key]:
        with self._lock:
            return [(ns, name) for (k, ns, name) in self._objs if k == kind]


class Reconciler:
    def __init__(self, kube: Kube, image: str, hpa_version: str = "autoscaling/v2",
                 pdb_version: str = "policy/v1", clock: Callable[[], str] = now_iso,
                 always_apply: bool = False, namespaces: list[str] | None = None) -> None:
        self.kube = kube
        self.image = image
        self.hpa_version = hpa_version
        self.pdb_version = pdb_version
        self.clock = clock
        self.always_apply = always_apply  # the naive baseline: no hash/field check before a write
        self.namespaces = namespaces or None  # None: the whole cluster
        self.cache = Cache()
        self.started = time.monotonic()
        self._locks: dict[Key, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.retry: dict[Key, float] = {}  # key -> monotonic time of the next attempt
        self._failures: dict[Key, int] = {}
        # The engine each resource's last EngineSelected Event named: reconciles right after a create read a
        # status the previous one has not written yet, and each would announce the same choice again.
        self._announced: dict[Key, str] = {}
        self.observer = Observer()  # observed load per resource, filled by operator/scrape.py

    # ----------------------------------------------------------------------------- watch triggers

    def owner_event(self, event_type: str | None, obj: dict[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if event_type == "DELETED":
            self.cache.drop(obj)
            self.retry.pop(key, None)
            self._announced.pop(key, None)  # a resource made again under this name is announced again
            return  # the garbage collector removes the owner-referenced children
        self.cache.put(obj)
        self.reconcile(key)

    def child_event(self, event_type: str | None, obj: dict[str, Any]) -> None:
        if event_type == "DELETED":
            self.cache.drop(obj)
        else:
            self.cache.put(obj)
        meta = obj["metadata"]
        owner_name = (meta.get("labels") or {}).get(builders.INSTANCE_LABEL)
        if owner_name and self.cache.get("InferenceService", meta["namespace"], owner_name) is not None:
            self.reconcile((meta["namespace"], owner_name))

    def child_kinds(self) -> list[tuple[str, str]]:
        """(apiVersion, kind) of everything the operator watches besides its own resource."""
        return [("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("v1", "Pod"),
                (self.hpa_version, "HorizontalPodAutoscaler"), (self.pdb_version, "PodDisruptionBudget")]

    def relist(self) -> None:
        """Refresh the cache from the server. A watch that reconnects with a fresh LIST (after 410 Gone,
        an API server restart, a network cut) reports what exists, never what was deleted meanwhile:
        without this a child deleted then would stay in the cache, and never be recreated."""
        selector = ",".join(f"{k}={v}" for k, v in CHILD_SELECTOR.items())
        kinds = [(API_VERSION, KIND, None), *((av, k, selector) for av, k in self.child_kinds())]
        for ns in self.namespaces or [None]:
            for api_version, kind, sel in kinds:
                items, rv = self.kube.list(api_version, kind, ns, sel)
                gone = self.cache.replace(kind, ns, items, rv)
                if gone:
                    log.info("relist: %d %s deleted while unwatched%s", gone, kind, f" in {ns}" if ns else "")
        known = set(self.cache.keys(KIND))
        for key in [k for k in self.retry if k not in known]:
            self.retry.pop(key, None)

    def resync(self) -> None:
        """Reconcile everything from a fresh LIST (drift and deletions the watches missed)."""
        try:
            self.relist()
        except Exception as e:  # noqa: BLE001 - the server is away: the cache is the best we have
            log.warning("relist failed, reconciling from the cache: %s: %s", type(e).__name__, e)
        for key in self.cache.keys("InferenceService"):
            self.reconcile(key)

    def due_retries(self) -> list[Key]:
        now = time.monotonic()
        return [k for k, t in list(self.retry.items()) if t <= now]

    # ---------------------------------------------------------------------------------- reconcile

    def _lock(self, key: Key) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, key: Key) -> None:
        with self._lock(key):
            owner = self.cache.get("InferenceService", *key)
            if owner is None or owner["metadata"].get("deletionTimestamp"):
                return
            try:
                again = self._reconcile(owner)
                if again is None:
                    self.retry.pop(key, None)
                else:
                    self.retry[key] = again
                self._failures.pop(key, None)
            except Exception as e:  # noqa: BLE001 - API or network: retried with backoff, never lost
                n = self._failures[key] = self._failures.get(key, 0) + 1
                self.retry[key] = time.monotonic() + min(2.0**n, 300.0)
                log.warning("reconcile of %s/%s failed (attempt %d): %s: %s", *key, n, type(e).__name__, e)
                if n == 1 and isinstance(e, KubeError):
                    self.kube.event(owner, "Warning", "ReconcileFailed", str(e))

    def _reconcile(self, owner: dict[str, Any]) -> float | None:
        """One pass; returns when to come back (monotonic time), None when only a change needs a new pass."""
        meta = owner["metadata"]
        generation = meta.get("generation") or 1
        previous = owner.get("status") or {}
        spec = plan = error = None
        pods = self.cache.select("Pod", meta["namespace"], builders.selector_labels(meta["name"]))
        try:
            spec = parse_spec(owner)
            plan = decide(spec, known_unsupported(previous, pods, spec.model.uri.display),
                          observed=override(spec, previous))
        except InvalidSpec as e:
            error = str(e)

        blocked: ChildBlocked | None = None
        if spec is not None and plan is not None:
            try:
                self._apply_children(owner, spec, plan, previous)
            except ChildBlocked as b:
                blocked = b

        if time.monotonic() - self.started < PRIME_SECONDS:
            # Just started: the pods may not be listed yet, and a status computed without them would be
            # wrong for a moment and cost two writes per resource on every operator restart.
            return self.started + PRIME_SECONDS
        dep = self.cache.get("Deployment", meta["namespace"], meta["name"])
        if dep is not None and not controlled_by(dep, owner):
            dep = None
        problem = ("InvalidSpec", error) if error is not None else \
            (blocked.reason, blocked.message) if blocked is not None else None
        status = compute_status(name=meta["name"], generation=generation, spec=spec, plan=plan, error=error,
                                deployment=dep, pods=pods, previous=previous, now=self.clock(),
                                blocked=problem if blocked is not None else None)
        gear = None
        if spec is not None and plan is not None:  # observed load: status.load, GearAdvice, auto shifting
            now = time.time()
            gear = gear_step(spec, previous, previous.get("engine"), self.observer.load(_key(meta), now), now)
            merge_gear(status, gear, previous, generation, self.clock())
        status = writable(status)
        if differs(previous, status):
            out = self.kube.patch_status(owner, status)
            if out is not None:
                self.cache.put(out)
            if problem is not None and not _already_reported(previous, generation, *problem):
                log.warning("%s/%s: %s: %s", meta["namespace"], meta["name"], *problem)
                self.kube.event(owner, "Warning", *problem)
            elif problem is None and (turned := newly_degraded(previous, status)) is not None:
                log.warning("%s/%s: degraded: %s: %s", meta["namespace"], meta["name"], *turned)
                self.kube.event(owner, "Warning", *turned)
        for reason, message in gear.events if gear is not None else []:
            log.info("%s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)
            self.kube.event(owner, "Normal", reason, message)
        if blocked is not None and blocked.reason == "ChildConflict":
            return time.monotonic() + CONFLICT_RECHECK_SECONDS
        return None

    def _apply_children(self, owner: dict[str, Any], spec: Any, plan: Any, previous: dict[str, Any]) -> None:
        ns = spec.namespace
        desired = [with_hash(self._observed_replicas(c, spec)) for c in builders.children(
            spec, plan, self.image, owner, self.hpa_version, self.pdb_version)]
        lives = [self._live(obj, ns, owner) for obj in desired]
        for obj, live in zip(desired, lives, strict=True):  # every conflict before any write: nothing changed
            found = conflict(obj, live, owner)
            if found is not None:
                raise found
        applied = []
        for obj, live in zip(desired, lives, strict=True):
            if self.always_apply or needs_apply(obj, live):
                self.cache.put(self._apply(obj))
                applied.append(obj["kind"])
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        for kind in OPTIONAL_KINDS:
            for name in (spec.name, builders.cache_claim_name(spec)):
                live = self.cache.get(kind, ns, name)
                if live is not None and (kind, name) not in wanted and controlled_by(live, owner):
                    self.kube.delete(live["apiVersion"], kind, ns, name)
                    self.cache.drop(live)
                    applied.append(f"-{kind}")
        key = _key(owner["metadata"])
        if previous.get("engine") != plan.engine and self._announced.get(key) != plan.engine:
            self._announced[key] = plan.engine
            self.kube.event(owner, "Normal", "EngineSelected", f"engine {plan.engine}: {plan.reason}")
        if applied:
            log.info("%s/%s: applied %s (engine %s)", ns, spec.name, ", ".join(applied), plan.engine)
            self.kube.event(owner, "Normal", "Applied",
                            f"applied {', '.join(k for k in applied if not k.startswith('-')) or 'nothing'}"
                            + "".join(f"; deleted {k[1:]}" for k in applied if k.startswith("-"))
                            + f" for engine {plan.engine}")

    def _observed_replicas(self, obj: dict[str, Any], spec: Any) -> dict[str, Any]:
        """autoscaling.controller operator: the Deployment's replicas from observed concurrency."""
        if obj["kind"] == "Deployment" and spec.autoscaling and spec.autoscaling.controller == "operator":
            live = self.cache.get("Deployment", spec.namespace, spec.name) or {}
            current = (live.get("spec") or {}).get("replicas")
            obj["spec"]["replicas"] = self.observer.replicas((spec.namespace, spec.name), spec, current, time.time())
        return obj

    def _apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.kube.apply(obj)
        except KubeError as e:
            if e.status in (400, 422):  # the object is invalid as written: a retry gets the same answer
                raise rejected(obj["kind"], obj["metadata"]["name"], e.status, e.message) from None
            raise

    def _live(self, obj: dict[str, Any], ns: str, owner: dict[str, Any]) -> dict[str, Any] | None:
        """The child as last seen; on a cache miss, as the server has it. The watches see only objects
        with our labels, so an object someone else made under a child's name is found only by a GET
        (one per child creation: at rest every child is in the cache)."""
        live = self.cache.get(obj["kind"], ns, obj["metadata"]["name"])
        if live is None:
            live = self.kube.get(obj["apiVersion"], obj["kind"], ns, obj["metadata"]["name"])
            if live is not None:
                live.setdefault("apiVersion", obj["apiVersion"])
                live.setdefault("kind", obj["kind"])
                if controlled_by(live, owner):
                    self.cache.put(live)  # never cache a stranger: no watch event would ever evict it
        return live


def _key(meta: dict[str, Any]) -> Key:
    return meta["namespace"], meta["name"]


def _already_reported(previous: dict[str, Any], generation: int, reason: str, message: str) -> bool:
    for c in previous.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("reason") == reason and c.get("observedGeneration") == generation \
                and c.get("message") == message
    return False


__all__ = ["Reconciler", "Cache", "HASH_ANNOTATION"]
