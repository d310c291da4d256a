"""The scrape loop: every interval, GET each ready model pod's /metrics over the pod network (pod IP,
the engine's port), add one tick per resource to the Observer's window, and reconcile that resource.

A resource without a ready pod gets no tick and no reconcile: resources without traffic or pods cost
no API calls. A pod that does not answer within the timeout is left out of that tick (its load is
unknown, not zero). The operator's NetworkPolicy (manifests/networkpolicy.yaml) allows exactly this.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gearshift.operator import builders
from gearshift.operator.load import PodSample, Tick, parse_metrics
from gearshift.operator.spec import InvalidSpec, parse_spec

log = logging.getLogger("gearshift.operator")
TIMEOUT_SECONDS = 2.0
MAX_BODY = 1 << 20  # a /metrics body is a few KiB; never read more than this


def ready_pods(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, pod IP) of the pods whose engine container is ready and that are not being deleted."""
    out = []
    for p in pods:
        st = p.get("status") or {}
        if p["metadata"].get("deletionTimestamp") or not st.get("podIP"):
            continue
        if any(cs.get("name") == "engine" and cs.get("ready") for cs in st.get("containerStatuses") or []):
            out.append((p["metadata"]["name"], st["podIP"]))
    return out


def metrics_url(ip: str, port: int = builders.PORT) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def fetch(ip: str, port: int = builders.PORT) -> PodSample | None:
    """One pod's figures, or None when it does not answer in time or answers something else."""
    try:
        with urllib.request.urlopen(metrics_url(ip, port), timeout=TIMEOUT_SECONDS) as r:  # noqa: S310 - pod IP
            return parse_metrics(r.read(MAX_BODY).decode("utf-8", "replace"))
    except (OSError, ValueError) as e:
        log.debug("scrape of %s failed: %s", ip, e)
        return None


class Scraper:
    def __init__(self, reconciler: Any, interval: float, workers: int = 8) -> None:
        self.reconciler = reconciler
        self.interval = interval
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gearshift-scrape")

    def round(self) -> None:
        """One scrape of every resource's ready pods."""
        cache, observer = self.reconciler.cache, self.reconciler.observer
        targets: dict[tuple[str, str], tuple[float, list[tuple[str, str]]]] = {}
        for ns, name in cache.keys("InferenceService"):
            owner = cache.get("InferenceService", ns, name)
            try:
                window = parse_spec(owner).gear_shift.window if owner else 0.0
            except InvalidSpec:
                continue
            pods = ready_pods(cache.select("Pod", ns, builders.selector_labels(name)))
            if pods:
                targets[(ns, name)] = (window, pods)
            else:
                observer.forget((ns, name))  # no pod: the window restarts when one is ready
        futures = {(key, pod): self.pool.submit(fetch, ip) for key, (_, pods) in targets.items() for pod, ip in pods}
        now = time.time()
        for key, (window, pods) in targets.items():
            samples = {pod: s for pod, _ in pods if (s := futures[(key, pod)].result()) is not None}
            if not samples:
                continue
            observer.add(key, Tick(now, samples), window)
            self.reconciler.reconcile(key)

    def loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.round()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("scrape round failed")
            time.sleep(max(0.5, self.interval - (time.monotonic() - started)))
