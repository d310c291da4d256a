"""kopf handlers: thin, each hands the raw watch event to one Reconciler method.

Only watch-event handlers are used (no create/update/timer handlers): kopf then stores no progress or
diff-base annotations and adds no finalizer, so at rest the operator writes nothing. Deletion needs no
handler either: the children are owner-referenced and the garbage collector removes them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import kopf
from gearshift.operator.apply import PLURALS
from gearshift.operator.reconcile import CHILD_SELECTOR, Reconciler
from gearshift.operator.spec import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger("gearshift.operator")


def _raw(event: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    obj = dict(event["object"])
    obj.setdefault("apiVersion", api_version)  # listed items come without them
    obj.setdefault("kind", kind)
    return obj


def child_resources(reconciler: Reconciler) -> list[tuple[str, str, str, str]]:
    """(group, version, plural, kind) of everything the operator watches besides its own resource."""
    out = []
    for api_version, kind in reconciler.child_kinds():
        group, _, version = api_version.rpartition("/")
        out.append((group, version, PLURALS[(api_version, kind)], kind))
    return out


def select_children_server_side(settings: kopf.OperatorSettings, reconciler: Reconciler) -> None:
    """Ask the API server for our children only: a cluster's other pods never reach the operator."""
    from kopf._cogs.structs.references import Selector  # the type kopf's settings are keyed by

    selector = ",".join(f"{k}={v}" for k, v in CHILD_SELECTOR.items())
    for group, version, plural, _ in child_resources(reconciler):
        settings.watching.label_selectors[Selector(group=group, version=version, plural=plural)] = selector


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync_seconds: float) -> None:
    """Hook the reconciler to kopf's watches of the InferenceServices and their children."""

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def owner_event(event: dict[str, Any], **_: Any) -> None:
        reconciler.owner_event(event.get("type"), _raw(event, f"{GROUP}/{VERSION}", KIND))

    children = child_resources(reconciler)
    for group, version, plural, kind in children:
        api_version = f"{group}/{version}" if group else version

        def child_event(event: dict[str, Any], _av: str = api_version, _kind: str = kind, **_: Any) -> None:
            reconciler.child_event(event.get("type"), _raw(event, _av, _kind))

        kopf.on.event(group=group, version=version, plural=plural, labels=CHILD_SELECTOR,
                      id=f"{plural}-event", registry=registry)(child_event)

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        # A plain thread, not a kopf timer: timers add a finalizer and keep per-object state in the API.
        threading.Thread(target=_resync_loop, args=(reconciler, resync_seconds), daemon=True,
                         name="gearshift-resync").start()
        await asyncio.sleep(0)


def _resync_loop(reconciler: Reconciler, resync_seconds: float) -> None:
    import time

    next_full = time.monotonic() + resync_seconds
    while True:
        time.sleep(1.0)
        try:
            for key in reconciler.due_retries():
                reconciler.reconcile(key)
            if time.monotonic() >= next_full:
                next_full = time.monotonic() + resync_seconds
                reconciler.resync()
        except Exception:  # noqa: BLE001 - the loop must outlive any one failure
            log.exception("resync failed")
