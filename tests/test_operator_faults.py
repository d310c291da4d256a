"""Faults under the operator on the local control plane: its API server goes away and comes back (a real
kube-apiserver restart: empty watch cache, watches re-list), children are deleted while it is away, and
the operator is killed in the middle of reconciling. Each must converge with exactly one of each child
and a status that is written and kept.

The operator talks to a private kube-apiserver on the shared etcd (tests/operator_kit.py), so stopping
it disturbs no other test run.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from operator_kit import (
    PrivateAPIServer,
    condition,
    create,
    get,
    isvc,
    kubectl,
    operator_cluster,
    owner,
    start_operator,
    stop_group,
    wait,
)

pytestmark = pytest.mark.slow
CHILDREN = (("apps/v1", "Deployment", "deployments"), ("v1", "Service", "services"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("faults")
    with operator_cluster(work, private=PrivateAPIServer(work)) as c:
        yield c


def children_of(c: dict[str, Any], name: str, plural: str) -> list[dict[str, Any]]:
    path = f"/apis/apps/v1/namespaces/{c['ns']}/{plural}" if plural == "deployments" else \
        f"/api/v1/namespaces/{c['ns']}/{plural}"
    items = c["admin"].request("GET", path, query=[("labelSelector", f"app.kubernetes.io/instance={name}")])["items"]
    return [o for o in items if not o["metadata"].get("deletionTimestamp")]


def converged(c: dict[str, Any], name: str) -> dict[str, Any]:
    """The InferenceService's status is written for its generation and it has one of each child."""
    obj = owner(c, name)
    st = obj.get("status") or {}
    assert st.get("observedGeneration") == obj["metadata"]["generation"], st
    assert condition(obj, "Ready").get("observedGeneration") == obj["metadata"]["generation"]
    for _, kind, plural in CHILDREN:
        found = children_of(c, name, plural)
        assert len(found) == 1, (kind, [o["metadata"]["name"] for o in found])
        (ref,) = found[0]["metadata"]["ownerReferences"]
        assert ref["uid"] == obj["metadata"]["uid"]
    return obj


def test_children_deleted_while_the_api_server_is_away_are_recreated(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("relist", replicas=0))
    wait(lambda: converged(c, "relist"), "relist to converge")
    c["private"].stop()  # the operator's API server goes away: its watches break
    kubectl(c["kubeconfig"], "-n", c["ns"], "delete", "service", "relist")  # through the shared one
    c["private"].start(c["kubeconfig"])  # back with an empty watch cache: the watches re-list
    wait(lambda: get(c, "v1", "Service", "relist"), "the Service deleted meanwhile to be recreated", timeout=90)
    wait(lambda: converged(c, "relist"), "relist to converge again")


def test_changes_made_while_the_api_server_is_away_converge(cluster: dict[str, Any]) -> None:
    c = cluster
    create(c, isvc("during", replicas=0))
    wait(lambda: converged(c, "during"), "during to converge")
    c["private"].stop()
    # A new resource, a spec change and a deletion, all while the operator cannot see them.
    create(c, isvc("born-away", replicas=0))
    kubectl(c["kubeconfig"], "-n", c["ns"], "patch", "gsvc", "during", "--type=merge", "-p", '{"spec":{"concurrency":32}}')
    c["private"].start(c["kubeconfig"])
    for name in ("during", "born-away"):
        wait(lambda n=name: converged(c, n), f"{name} to converge after the restart", timeout=90)
    dep = get(c, "apps/v1", "Deployment", "during")
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][2] == "paged"
    assert owner(c, "during")["status"]["engine"] == "paged"
    assert c["proc"].poll() is None  # the operator rode it out


def test_operator_killed_mid_reconcile_converges_without_duplicates(cluster: dict[str, Any]) -> None:
    c = cluster
    names = [f"kill-{i}" for i in range(6)]
    for name in names:
        create(c, isvc(name, replicas=0, cache={"size": "1Gi"}))
    # SIGKILL as soon as the first child is written: the rest of this batch is mid-flight.
    wait(lambda: any(get(c, "v1", "PersistentVolumeClaim", f"{n}-model-cache") for n in names), "a first child",
         timeout=60)
    stop_group(c["proc"], signal.SIGKILL)
    statuses = {n: (owner(c, n).get("status") or {}) for n in names}
    c["proc"] = start_operator(c["op_kubeconfig"], c["ns"], c["log"])
    for name in names:
        wait(lambda n=name: converged(c, n), f"{name} to converge after the kill", timeout=90)
        claims = [p for p in c["admin"].request("GET", f"/api/v1/namespaces/{c['ns']}/persistentvolumeclaims")["items"]
                  if p["metadata"]["name"].startswith(name + "-")]
        assert [p["metadata"]["name"] for p in claims] == [f"{name}-model-cache"]
        # What the killed operator wrote is kept, not lost or reset: same transition times.
        before = {x["type"]: x for x in statuses[name].get("conditions") or []}
        for ctype, cond in before.items():
            now = condition(owner(c, name), ctype)
            if now.get("status") == cond["status"]:
                assert now["lastTransitionTime"] == cond["lastTransitionTime"], (name, ctype)
    assert all(owner(c, n)["metadata"]["generation"] == 1 for n in names)
