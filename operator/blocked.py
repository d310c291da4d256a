"""Why a valid spec's children cannot be written, as a status reason a human can act on. Pure.

Two cases stop a reconcile for good (until someone changes something), so they must show in status and
in one Event, never as a silent retry loop:
  ChildConflict  an object with a child's name exists that this InferenceService did not create
                 (no controller owner reference to it): the operator never adopts or overwrites it.
  ApplyRejected  the API server refused a child (HTTP 400/422), almost always because of a pass-through
                 field (podTemplate labels, tolerations, affinity): the message names the spec field.
"""

from __future__ import annotations

import re
from typing import Any

# A field of a child the API server names in a 422 -> the InferenceService field it comes from.
# Longest prefix first; the rest of the path (an index, a key) is kept.
_CHILD_TO_SPEC = (
    ("spec.template.metadata.labels", "spec.podTemplate.labels"),
    ("spec.template.labels", "spec.podTemplate.labels"),  # how v1.20 names a bad pod label
    ("spec.template.metadata.annotations", "spec.podTemplate.annotations"),
    ("spec.template.annotations", "spec.podTemplate.annotations"),
    ("spec.template.spec.nodeSelector", "spec.podTemplate.nodeSelector"),
    ("spec.template.spec.tolerations", "spec.podTemplate.tolerations"),
    ("spec.template.spec.affinity", "spec.podTemplate.affinity"),
    ("spec.template.spec.priorityClassName", "spec.podTemplate.priorityClassName"),
    ("spec.template.spec.serviceAccountName", "spec.podTemplate.serviceAccountName"),
    ("spec.template.spec.imagePullSecrets", "spec.podTemplate.imagePullSecrets"),
    ("spec.template.spec.runtimeClassName", "spec.podTemplate.runtimeClassName"),
    ("spec.resources.requests.storage", "spec.cache.size"),
    ("spec.storageClassName", "spec.cache.storageClassName"),
    ("spec.accessModes", "spec.cache.accessModes"),
)
_FIELD = re.compile(r"(spec(?:\.[A-Za-z0-9_]+|\[[^\]]*\])+)")


class ChildBlocked(Exception):
    """A child cannot be written for a reason only a human can fix (reason: ChildConflict | ApplyRejected)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def controlled_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    uid = owner["metadata"].get("uid")
    return any(r.get("uid") == uid and r.get("controller") for r in obj["metadata"].get("ownerReferences") or [])


def conflict(desired: dict[str, Any], live: dict[str, Any] | None, owner: dict[str, Any]) -> ChildBlocked | None:
    """A ChildConflict when `live` exists and this owner is not its controller, else None."""
    if live is None or controlled_by(live, owner):
        return None
    meta = live["metadata"]
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    who = f"is controlled by {refs[0].get('kind')} {refs[0].get('name')}" if refs else "was not created by it"
    return ChildBlocked("ChildConflict", (
        f"{desired['kind']} {meta.get('namespace')}/{meta['name']} already exists and {who}; the operator "
        "does not adopt or change it: delete or rename it, or rename this InferenceService"))


def spec_field(child_message: str) -> str | None:
    """The InferenceService field behind the first child field an API server error names, if any."""
    for found in _FIELD.findall(child_message):
        for child_prefix, spec_prefix in _CHILD_TO_SPEC:
            if found == child_prefix or found.startswith((child_prefix + ".", child_prefix + "[")):
                return spec_prefix + found[len(child_prefix):]
    return None


def rejected(kind: str, name: str, status: int, message: str) -> ChildBlocked:
    """An ApplyRejected for an API server's 400/422 on a child; the message leads with the spec field."""
    field = spec_field(message)
    lead = f"{field}: " if field else ""
    return ChildBlocked("ApplyRejected",
                        f"{lead}the API server rejected {kind} {name} (HTTP {status}): {message}"[:1000])
