"""The reconcile's gear step as pure functions (operator/observe.py): the gearShift spec, the policy's
observed-engine override, the status and Events each step writes, shifts in auto mode. Loads are
test_gear.py's `L`; time is passed in."""

from __future__ import annotations

import pytest
from gearshift.operator.load import Load
from gearshift.operator.observe import gear_step, override, plan_notes
from gearshift.operator.policy import ObservedGear, decide
from gearshift.operator.spec import InvalidSpec, parse_spec
from test_gear import BF16, L

GGUF = "pvc://models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def isvc(**spec: object) -> dict:
    return {"apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": {"uri": GGUF}, **spec}}


@pytest.mark.parametrize(("gear_shift", "want"), [
    (None, ("advise", 600.0, 600.0)),
    ({"mode": "auto", "window": "30s", "cooldown": "1m"}, ("auto", 30.0, 60.0)),
    ({"window": "2h", "cooldown": 0}, ("advise", 7200.0, 0.0)),
])
def test_gear_shift_spec(gear_shift: dict | None, want: tuple) -> None:
    spec = parse_spec(isvc(**({"gearShift": gear_shift} if gear_shift is not None else {})))
    assert (spec.gear_shift.mode, spec.gear_shift.window, spec.gear_shift.cooldown) == want


@pytest.mark.parametrize(("spec", "field"), [
    ({"gearShift": {"mode": "sometimes"}}, "spec.gearShift.mode"),
    ({"gearShift": {"window": "5d"}}, "spec.gearShift.window"),
    ({"gearShift": {"window": "1s"}}, "spec.gearShift.window"),
    ({"gearShift": {"every": "1m"}}, "spec.gearShift.every"),
    ({"autoscaling": {"maxReplicas": 3, "controller": "keda"}}, "spec.autoscaling.controller"),
    ({"autoscaling": {"maxReplicas": 3, "controller": "operator"}}, "spec.autoscaling.targetConcurrency"),
])
def test_gear_shift_and_controller_spec_errors_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        parse_spec(isvc(**spec))
    assert e.value.field == field


def test_observed_engine_overrides_the_declared_concurrency_and_sizes_for_it() -> None:
    spec = parse_spec(isvc(concurrency=1, gearShift={"mode": "auto"}))
    assert decide(spec).engine == "gguf"
    plan = decide(spec, observed=ObservedGear("paged", "observed p95 9 ...", 9))
    assert (plan.engine, plan.reason, plan.max_num_seqs) == ("paged", "observed p95 9 ...", 9)


AUTO = {"mode": "auto", "window": "60s", "cooldown": "60s"}
T0 = 1_800_000_000.0


def status_after(spec_: dict, steps: list[tuple[float, Load]], engine: str = "gguf") -> tuple[dict, list]:
    """Run gear_step like the reconcile does (status written back each time); the engine that runs follows
    the override, as the next reconcile's decide would make it."""
    spec = parse_spec(isvc(**spec_))
    status: dict = {"engine": engine, "conditions": []}
    events: list = []
    for t, ld in steps:
        step = gear_step(spec, status, status["engine"], ld, T0 + t)
        status = {**status, **step.fields}
        status["conditions"] = [{"type": "GearAdvice", "status": "True" if step.condition[0] else "False",
                                 "reason": step.condition[1], "message": step.condition[2]}]
        events += [e[0] for e in step.events]
        o = override(spec, status)
        status["engine"] = o.engine if o else status["engine"]
    return status, events


def test_auto_shifts_up_after_the_window_and_back_down_after_cooldown() -> None:
    busy = [(t, L(8, window=60, span=60)) for t in range(0, 70, 10)]
    status, events = status_after({"gearShift": AUTO}, busy)
    assert status["engine"] == "paged" and status["gearShift"]["shiftedAt"]
    assert status["gearShift"]["reason"].startswith("observed p95 8 concurrent")
    assert events == ["GearAdvice", "GearShift"]
    idle = busy + [(t, L(0, window=60, span=60)) for t in range(70, 200, 10)]
    status, events = status_after({"gearShift": AUTO}, idle)
    assert status["engine"] == "gguf"
    assert events == ["GearAdvice", "GearShift", "GearAdvice", "GearShift"]


def test_auto_follows_the_crossover_the_pods_report() -> None:
    """3 streams: on pods that report no crossover (the default 4) gguf stays; on pods on an AVX512-BF16 CPU
    (crossover 2) the same load shifts to paged, and the reason names the crossover and its CPU class."""
    status, events = status_after({"gearShift": AUTO}, [(t, L(3, window=60, span=60)) for t in range(0, 200, 10)])
    assert status["engine"] == "gguf" and "GearShift" not in events
    assert status["conditions"][0]["reason"] == "WithinBand"
    busy = [(t, L(3, window=60, span=60, x=BF16)) for t in range(0, 70, 10)]
    status, events = status_after({"gearShift": AUTO}, busy)
    assert status["engine"] == "paged" and events == ["GearAdvice", "GearShift"]
    assert "crossover (2 on the pods' CPU: avx512_bf16)" in status["gearShift"]["reason"]
    # one stream stays on paged only down to half that crossover: 1 goes back after cooldown + window
    idle = busy + [(t, L(1, window=60, span=60, x=BF16)) for t in range(70, 200, 10)]
    status, events = status_after({"gearShift": AUTO}, idle)
    assert status["engine"] == "gguf" and events == ["GearAdvice", "GearShift", "GearAdvice", "GearShift"]


def test_advise_mode_only_changes_the_condition_and_posts_events() -> None:
    busy = [(t, L(8, window=60, span=60)) for t in range(0, 200, 10)]
    status, events = status_after({}, busy)
    assert status["engine"] == "gguf" and "engine" not in status["gearShift"]
    assert status["conditions"][0]["status"] == "True" and status["conditions"][0]["reason"] == "AboveCrossover"
    assert events == ["GearAdvice"]


def test_no_load_writes_nothing_and_a_fixed_engine_is_never_shifted() -> None:
    spec = parse_spec(isvc())
    step = gear_step(spec, {"engine": "gguf"}, "gguf", None, T0)
    assert "load" not in step.fields and step.condition[1] == "NoData" and not step.events
    status, events = status_after({"engine": "gguf", "gearShift": AUTO},
                                  [(t, L(8, window=60, span=60)) for t in range(0, 200, 10)])
    assert status["engine"] == "gguf" and events == ["GearAdvice"]  # advised, never shifted: gguf was requested
    assert status["conditions"][0]["reason"] == "AboveCrossover"
    safetensors = parse_spec({**isvc(), "spec": {"model": {"uri": "hf://org/repo"}}})
    assert gear_step(safetensors, {"engine": "paged"}, "paged", L(8), T0).condition[1] == "NoChoice"


def test_unchanged_load_keeps_status_identical() -> None:
    """Between meaningful steps the status is byte-for-byte the same: no write per scrape."""
    spec = parse_spec(isvc(gearShift={"window": "60s"}))
    first = gear_step(spec, {"engine": "gguf"}, "gguf", L(3.0, window=60, span=60), T0)
    prev = {"engine": "gguf", **first.fields, "conditions": [
        {"type": "GearAdvice", "reason": first.condition[1], "message": first.condition[2]}]}
    again = gear_step(spec, prev, "gguf", L(3.2, window=60, span=60), T0 + 10)
    assert again.fields == first.fields and again.condition == first.condition and not again.events


def test_a_gap_in_the_evidence_keeps_the_last_advice_and_writes_nothing() -> None:
    """An operator restart empties the windows: the advice and its clock in status stand until a full
    window says otherwise (no flip to Observing, no write, no Event)."""
    spec = parse_spec(isvc(gearShift={"mode": "auto", "window": "60s"}))
    busy = gear_step(spec, {"engine": "gguf"}, "gguf", L(8, window=60, span=60), T0)
    prev = {"engine": "gguf", **busy.fields, "conditions": [
        {"type": "GearAdvice", "status": "True", "reason": busy.condition[1], "message": busy.condition[2]}]}
    for gap in (None, L(8, window=60, span=20)):
        again = gear_step(spec, prev, "gguf", gap, T0 + 30)
        assert again.condition == busy.condition and again.fields["gearShift"] == prev["gearShift"]
        assert not again.events and not again.shifted


def test_plan_explains_that_auto_may_run_the_other_engine() -> None:
    notes = plan_notes(parse_spec(isvc(gearShift={"mode": "auto", "window": "5m"})))
    assert any("may run the other engine" in n and "5m" in n for n in notes)
    assert plan_notes(parse_spec(isvc())) == []
