"""Gear shifting from observed load on a real node: the operator reads the model pods' /metrics over the
pod network, writes status.load and the GearAdvice condition, and with `gearShift: auto` switches a gguf
resource to paged under 8 concurrent streams through its Service (no client request fails during the
shift), then back to gguf once the load stops. With `advise`, only the condition and an Event change.
The tests run in file order and share the resource `geared` (a model load is the slow part on 2 cores)."""

from __future__ import annotations

import threading
import time

import pytest
from gearshift.e2e.cluster.scenario import LOAD_S, MODEL_FILE, NAME, openai_client
from gearshift.e2e.cluster.scenario import spec as base_spec
from gearshift.e2e.cluster.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
GEARED = "geared"
WINDOW = {"window": "30s", "cooldown": "30s"}  # the operator scrapes every 10 s: 3 ticks per window
STREAMS = 8


class Load:
    """STREAMS client threads, each streaming one chat completion after another through the Service.
    Every request is counted: answered, or failed (no retries: a failed request is a failure)."""

    def __init__(self, ip: str) -> None:
        self.ip, self.stop = ip, threading.Event()
        self.answered, self.failures = 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(STREAMS)]

    def _run(self, i: int) -> None:
        client = openai_client(self.ip)
        while not self.stop.is_set():
            try:
                chunks = client.chat.completions.create(
                    model=NAME, max_tokens=48, stream=True, temperature=0.7, seed=i,
                    messages=[{"role": "user", "content": f"Count from {i} to {i + 40}."}])
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                with self.lock:
                    self.answered += 1 if text else 0
                    if not text:
                        self.failures.append("empty answer")
            except Exception as e:  # noqa: BLE001 - recorded; the test asserts there are none
                with self.lock:
                    self.failures.append(repr(e))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def engines(kube) -> set[str]:
    return {p.metadata.labels["gearshift.dev/engine"] for p in kube.pods(GEARED) if not p.metadata.deletion_timestamp}


def events(kube, reason: str) -> list[str]:
    items = kube.core.list_namespaced_event(kube.ns, field_selector=f"involvedObject.name={GEARED}").items
    return [e.message for e in items if e.reason == reason]


def status(kube) -> dict:
    return kube.isvc(GEARED).get("status") or {}


def test_load_is_observed_on_gguf(kube, model_url):
    kube.create(GEARED, base_spec(model_url(MODEL_FILE), 1, gearShift={"mode": "auto", **WINDOW}))
    wait_for(lambda: kube.is_ready(GEARED), LOAD_S, "geared Ready on gguf")
    assert status(kube)["engine"] == "gguf"
    load = wait_for(lambda: status(kube).get("load"), 60, "status.load from the pod's /metrics")
    assert load["window"] == "30s" and load["p95Concurrency"] == 0, load
    advice = wait_for(lambda: kube.condition("GearAdvice", GEARED).get("reason") in ("WithinBand", "BelowCrossover")
                      and kube.condition("GearAdvice", GEARED), 90, "advice once a window is observed")
    assert advice["status"] == "False", advice  # gguf is right for no load


def test_8_streams_shift_auto_to_paged_with_no_failed_request(kube):
    with Load(kube.service_ip(GEARED)) as load:
        wait_for(lambda: status(kube).get("load", {}).get("p95Concurrency", 0) >= 4, 120, "p95 load seen")
        wait_for(lambda: status(kube).get("engine") == "paged", 180, "the shift to paged")
        st = status(kube)
        assert st["engineReason"].startswith("observed p95"), st["engineReason"]
        assert st["gearShift"]["engine"] == "paged" and st["gearShift"]["shiftedAt"]
        wait_for(lambda: kube.is_ready(GEARED) and engines(kube) == {"paged"}, LOAD_S, "the paged rollout done")
        time.sleep(10)  # requests on the new pods too
    assert not load.failures, load.failures[:5]
    assert load.answered > STREAMS, load.answered
    spec = kube.isvc(GEARED)["spec"]
    assert "engine" not in spec and spec["gearShift"]["mode"] == "auto"  # the spec is never written
    assert events(kube, "GearShift") and events(kube, "GearAdvice")


def test_without_load_it_shifts_back_to_gguf(kube):
    wait_for(lambda: status(kube).get("engine") == "gguf", 240, "the shift back to gguf")
    assert "well below the crossover" in status(kube)["engineReason"]
    wait_for(lambda: kube.is_ready(GEARED) and engines(kube) == {"gguf"}, LOAD_S, "the gguf rollout done")
    assert len(events(kube, "GearShift")) == 2


def test_advise_changes_only_the_condition_and_an_event(kube):
    kube.patch(GEARED, {"gearShift": {"mode": "advise", **WINDOW}})
    wait_for(lambda: status(kube).get("gearShift", {}).get("mode") == "advise", 60, "advise mode in status")
    pods_before = {p.metadata.name for p in kube.ready_pods(GEARED)}
    advised_before = len(events(kube, "GearAdvice"))
    with Load(kube.service_ip(GEARED)) as load:
        cond = wait_for(lambda: kube.condition("GearAdvice", GEARED).get("reason") == "AboveCrossover"
                        and kube.condition("GearAdvice", GEARED), 150, "advice: paged")
        time.sleep(45)  # longer than window + cooldown: auto would have shifted by now
    assert cond["status"] == "True" and "paged serves" in cond["message"], cond
    assert not load.failures, load.failures[:5]
    assert status(kube)["engine"] == "gguf" and engines(kube) == {"gguf"}
    assert {p.metadata.name for p in kube.ready_pods(GEARED)} == pods_before
    assert len(events(kube, "GearAdvice")) > advised_before
    assert len(events(kube, "GearShift")) == 2
    kube.delete(GEARED)
