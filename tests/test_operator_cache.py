"""The reconciler's watch-fed cache: never goes back to an older object, keyed by kind/namespace/name."""

from __future__ import annotations

from gearshift.operator.reconcile import Cache, controlled_by


def obj(name: str, rv: str, uid: str = "u1", kind: str = "Deployment", labels: dict | None = None) -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "uid": uid,
                                       "labels": labels or {}}}


def test_newer_wins_and_stale_events_are_ignored() -> None:
    c = Cache()
    c.put(obj("a", "10"))
    c.put(obj("a", "12"))
    assert c.put(obj("a", "11"))["metadata"]["resourceVersion"] == "12"  # a late watch event
    assert c.get("Deployment", "ns", "a")["metadata"]["resourceVersion"] == "12"


def test_recreated_object_replaces_the_old_one() -> None:
    c = Cache()
    c.put(obj("a", "50", uid="old"))
    c.put(obj("a", "3", uid="new"))
    assert c.get("Deployment", "ns", "a")["metadata"]["uid"] == "new"
    c.drop(obj("a", "51", uid="old"))  # the old one's DELETED event arrives late: keeps the new one
    assert c.get("Deployment", "ns", "a") is not None
    c.drop(obj("a", "4", uid="new"))
    assert c.get("Deployment", "ns", "a") is None


def test_select_by_kind_namespace_and_labels() -> None:
    c = Cache()
    c.put(obj("p1", "1", kind="Pod", labels={"app": "x", "tier": "1"}))
    c.put(obj("p2", "1", kind="Pod", labels={"app": "y"}))
    c.put(obj("x", "1", kind="Deployment", labels={"app": "x"}))
    assert [o["metadata"]["name"] for o in c.select("Pod", "ns", {"app": "x"})] == ["p1"]
    assert c.select("Pod", "other", {"app": "x"}) == []
    assert sorted(c.keys("Pod")) == [("ns", "p1"), ("ns", "p2")]


def test_controlled_by_needs_the_owner_uid_and_controller() -> None:
    owner = {"metadata": {"uid": "o1"}}
    child = {"metadata": {"ownerReferences": [{"uid": "o1", "controller": True}]}}
    assert controlled_by(child, owner)
    assert not controlled_by({"metadata": {"ownerReferences": [{"uid": "o1"}]}}, owner)
    assert not controlled_by({"metadata": {}}, owner)
