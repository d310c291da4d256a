"""Observed load -> what the reconcile does with it: status.load, the GearAdvice condition, the engine an
`auto` resource runs, the replicas of the built-in controller, and the Events for changes.

`gear_step` is pure (the load, the previous status and the wall-clock `now` are passed in); `Observer`
only keeps the in-memory windows and replica recommendations per resource, fed by operator/scrape.py.
What must survive an operator restart (the engine shifted to, since when advice held, the last shift)
lives in status.gearShift, not in memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gearshift.engine.crossover import CONSERVATIVE_CROSSOVER, MEASURED, crossover
from gearshift.operator import replicas as rc
from gearshift.operator.gear import (
    ADVICE_REASONS,
    DOWN_FRACTION,
    NO_DATA,
    Advice,
    GearState,
    advise,
    hold,
    should_shift,
)
from gearshift.operator.load import Load, LoadWindow, Tick, ceil_concurrency, load_changed, round_load
from gearshift.operator.policy import ObservedGear
from gearshift.operator.spec import InferenceServiceSpec
from gearshift.operator.status import _condition

Key = tuple[str, str]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def can_advise(spec: InferenceServiceSpec) -> bool:
    """Both engines could serve it: a GGUF file on CPU (advice is given even where an engine is requested:
    it tells a team that its requested engine no longer fits its load)."""
    return spec.model.uri.format == "gguf" and not spec.hardware.accelerator


def can_shift(spec: InferenceServiceSpec) -> bool:
    """The policy chooses the engine (engine auto), so `auto` mode may switch it."""
    return spec.engine == "auto" and can_advise(spec)


def override(spec: InferenceServiceSpec, previous: dict[str, Any]) -> ObservedGear | None:
    """The engine an `auto` resource runs because of observed load (from status), or None: the declared
    concurrency decides."""
    g = previous.get("gearShift") or {}
    if spec.gear_shift.mode != "auto" or not can_shift(spec) or g.get("engine") not in ("gguf", "paged"):
        return None
    return ObservedGear(engine=g["engine"], reason=g.get("reason") or "observed load",
                        concurrency=int(g.get("concurrency") or 1))


def _crossovers() -> str:
    """The measured crossover per CPU class, for `gearshift plan` (it does not know the node's CPU)."""
    return ", ".join(f"{crossover(c)} on {c}" for c in sorted(MEASURED)) + \
        f"; {CONSERVATIVE_CROSSOVER} until a pod reports it"


def plan_notes(spec: InferenceServiceSpec) -> list[str]:
    """What `gearshift plan` cannot show, because it depends on the load the pods will see."""
    notes = []
    gs = spec.gear_shift
    if gs.mode == "auto" and can_shift(spec):
        notes.append(f"spec.gearShift.mode auto: the operator may run the other engine than planned here when "
                     f"the observed p95 concurrency per replica over {gs.window_text} reaches the crossover its pods "
                     f"report for their CPU ({_crossovers()}) or falls to {DOWN_FRACTION:.0%} of it, held for "
                     f"{gs.window_text}, at most one shift per {gs.cooldown_text}; status.engine says which runs")
    elif gs.mode == "auto":
        notes.append("spec.gearShift.mode auto shifts only engine auto on a GGUF model on CPU: here it advises")
    if spec.autoscaling and spec.autoscaling.controller == "operator":
        a = spec.autoscaling
        notes.append(f"autoscaling.controller operator: the operator sets the Deployment's replicas "
                     f"({a.min_replicas}-{a.max_replicas}) from the observed concurrency, "
                     f"{a.target_concurrency} per replica; no HPA")
    return notes


@dataclass
class GearStep:
    fields: dict[str, Any] = field(default_factory=dict)  # status.load and status.gearShift
    condition: tuple[bool, str, str] | None = None  # GearAdvice (status, reason, message)
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message), Normal
    shifted: bool = False


def _advice_condition(advice: Advice, running: str, previous_cond: dict[str, Any] | None,
                      load_written: bool) -> tuple[bool, str, str]:
    ok = advice.engine is not None and advice.engine != running
    message = advice.message
    # The message quotes the load; between meaningful steps keep the old words (no write per scrape).
    if previous_cond and previous_cond.get("reason") == advice.reason and not load_written:
        message = previous_cond.get("message", message)
    return ok, advice.reason, message


def gear_step(spec: InferenceServiceSpec, previous: dict[str, Any], running: str | None, load: Load | None,
              now: float) -> GearStep:
    """status.load, status.gearShift, GearAdvice and Events for one reconcile."""
    gs = spec.gear_shift
    out = GearStep()
    prev_load = previous.get("load")
    load_written = False
    if load is not None and load.samples > 0:
        if load_changed(prev_load, load, gs.window_text):
            out.fields["load"] = {"window": gs.window_text, **round_load(load), "sampledAt": iso(now)}
            load_written = True
        else:
            out.fields["load"] = prev_load
    prev_conds = {c.get("type"): c for c in previous.get("conditions") or []}
    if not can_advise(spec):
        out.condition = (False, "NoChoice", "only the paged engine serves safetensors weights or an "
                         "accelerator: nothing to advise")
        return out
    if running is None:
        out.condition = (False, "NoData", NO_DATA)
        return out
    advice = advise(running, load, gs.window_text)
    prev = previous.get("gearShift") or {}
    prev_cond = prev_conds.get("GearAdvice")
    if advice.engine is None and prev_cond and prev_cond.get("reason") in ADVICE_REASONS \
            and prev.get("mode") == gs.mode:
        # A gap in the evidence (an operator restart empties the windows): the last advice and its clock
        # stand until a full window says otherwise, so a restart costs no writes and no Events.
        out.condition = (prev_cond.get("status") == "True", prev_cond["reason"], prev_cond.get("message", ""))
        out.fields["gearShift"] = prev
        return out
    out.condition = _advice_condition(advice, running, prev_cond, load_written)

    state = GearState(prev.get("advised"), epoch(prev.get("advisedSince")), epoch(prev.get("shiftedAt")))
    new = hold(state, advice, now)
    g: dict[str, Any] = {"mode": gs.mode}
    if new.advised is not None:
        g["advised"], g["advisedSince"] = new.advised, iso(new.advised_since or now)
    for k in ("engine", "reason", "concurrency", "shiftedAt"):
        if k in prev and gs.mode == "auto":
            g[k] = prev[k]
    if advice.engine is not None and advice.engine != prev.get("advised"):
        out.events.append(("GearAdvice", f"{advice.engine} advised: {advice.message}"))
    if gs.mode == "auto" and can_shift(spec) and load is not None:
        to = should_shift(new, running, now, gs.window, gs.cooldown)
        if to is not None:
            g.update(engine=to, concurrency=ceil_concurrency(load.p95), shiftedAt=iso(now),
                     reason=f"observed {advice.message[0].lower()}{advice.message[1:]}; shifted from {running} "
                            "(spec.gearShift.mode auto)")
            out.events.append(("GearShift", f"shifting {running} -> {to}: {advice.message}"))
            out.shifted = True
    out.fields["gearShift"] = g
    return out


def merge_gear(status: dict[str, Any], step: GearStep, previous: dict[str, Any], generation: int,
               now_text: str) -> None:
    """Put the step's fields and its GearAdvice condition into a status from compute_status."""
    status.update(step.fields)
    if step.condition is not None:
        prev_conds = {c["type"]: c for c in previous.get("conditions") or [] if "type" in c}
        status["conditions"].append(_condition("GearAdvice", *step.condition, generation, prev_conds, now_text))


class Observer:
    """The per-resource windows the scrape loop fills and the reconcile reads."""

    def __init__(self) -> None:
        self._windows: dict[Key, LoadWindow] = {}
        self._history: dict[Key, list[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def add(self, key: Key, tick: Tick, window: float) -> None:
        with self._lock:
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = LoadWindow(window)
            w.window = window
            w.add(tick)

    def load(self, key: Key, now: float) -> Load | None:
        with self._lock:
            w = self._windows.get(key)
            return w.load(now) if w is not None and w.ticks else None

    def latest(self, key: Key) -> Tick | None:
        with self._lock:
            w = self._windows.get(key)
            return w.ticks[-1] if w is not None and w.ticks else None

    def forget(self, key: Key) -> None:
        with self._lock:
            self._windows.pop(key, None)
            self._history.pop(key, None)

    def replicas(self, key: Key, spec: InferenceServiceSpec, current: int | None, now: float) -> int:
        """The built-in controller's replica count (autoscaling.controller: operator)."""
        a = spec.autoscaling
        assert a is not None and a.target_concurrency is not None
        bounds = rc.Bounds(a.min_replicas, a.max_replicas, a.target_concurrency)
        current = min(max(current or a.min_replicas, a.min_replicas), a.max_replicas)
        tick = self.latest(key)
        if tick is None or not tick.pods or now - tick.t > 60:
            return current  # no fresh evidence: leave it where it is
        with self._lock:
            hist = self._history.setdefault(key, [])
            if not hist or hist[-1][0] < tick.t:
                hist.append((tick.t, rc.recommend(current, tick.in_flight, bounds)))
            hist[:] = rc.prune(hist, now, rc.DOWN_WINDOW)
            return rc.stabilise(list(hist), now, current)
