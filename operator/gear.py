"""Gear advice and automatic shifting from observed load. Pure: the load and the time are passed in.

Advice compares the observed p95 concurrency per replica with the crossover the resource's pods report for
their CPU (engine/crossover.py's measured table, read from each pod's /metrics: 2 on CPUs with AVX512-BF16,
4 on AVX2-only ones, 4 where a pod reports none): which engine serves that many streams better and by how
much, read off the same measured table. Hysteresis keeps it from flapping: up to paged at or above the
crossover, back down to gguf only well below it (DOWN_FRACTION of the crossover), and anything in between
keeps the engine that runs. In `auto` mode a shift happens when the same advice has held for the whole
window, the window was fully observed, and the last shift is at least `cooldown` ago.
"""

from __future__ import annotations

from dataclasses import dataclass

from gearshift.engine.crossover import CONSERVATIVE_CLASS, MEASURED, measured
from gearshift.operator.load import Crossover, Load

DOWN_FRACTION = 0.5  # shift back to gguf only at or below half the crossover
NO_DATA = "no pod has been scraped yet"
ADVICE_REASONS = ("AboveCrossover", "BelowCrossover", "WithinBand")  # the reasons that name an engine


def crossover_text(x: Crossover) -> str:
    """The crossover and where it comes from, for the advice message."""
    if x.cpu_class is None:
        return f"{x.value}, the default: a pod does not report its CPU's crossover"
    return f"{x.value} on the pods' CPU: {x.cpu_class}"


def throughput(engine: str, concurrency: float, cpu_class: str | None = None) -> float:
    """Measured output tokens/s of `engine` at `concurrency` streams on `cpu_class` (None: the default)."""
    return measured(cpu_class or CONSERVATIVE_CLASS).throughput(engine, concurrency)


@dataclass(frozen=True)
class Advice:
    engine: str | None  # the engine to run for this load; None: not enough evidence yet
    reason: str  # the GearAdvice condition's reason (CamelCase)
    message: str

    @property
    def key(self) -> tuple[str | None, str]:
        """What a change of advice means: an Event is posted when this changes."""
        return self.engine, self.reason


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def advise(running: str, load: Load | None, window_text: str) -> Advice:
    """The engine that serves the observed load better, with hysteresis around the crossover its pods report
    (load.crossover)."""
    if load is None or load.samples == 0:
        return Advice(None, "NoData", NO_DATA)
    if not load.covered:
        # no figures in the words: they would change with every scrape, and so would the status
        return Advice(None, "Observing", f"observing the load on {running}: advice after {window_text} of it")
    x = load.crossover
    p95 = load.p95
    head = f"p95 {_fmt(p95)} concurrent per replica over {window_text} on {running}"
    down = x.value * DOWN_FRACTION
    cls = (x.cpu_class or CONSERVATIVE_CLASS).split("/")[0]
    cls = cls if cls in MEASURED else CONSERVATIVE_CLASS  # a class never measured: the conservative run's figures
    gguf, paged = throughput("gguf", max(p95, 1.0), cls), throughput("paged", max(p95, 1.0), cls)
    table = f"measured on {cls}"
    if p95 >= x.value:
        return Advice("paged", "AboveCrossover",
                      f"{head}: at or above the crossover ({crossover_text(x)}); paged serves {_fmt(max(p95, 1))} "
                      f"streams at ~{paged / gguf:.1f}x the output tokens/s of gguf ({table})")
    if p95 <= down:
        return Advice("gguf", "BelowCrossover",
                      f"{head}: well below the crossover ({crossover_text(x)}); gguf serves {_fmt(max(p95, 1))} "
                      f"stream{'s' if p95 > 1 else ''} at ~{gguf / paged:.1f}x the output tokens/s of paged "
                      f"({table}), in a fraction of its memory")
    return Advice(running, "WithinBand",
                  f"{head}: between {_fmt(down)} and the crossover ({crossover_text(x)}); {running} stays "
                  "(hysteresis)")


@dataclass(frozen=True)
class GearState:
    """What the shifter remembers of one resource (kept in status.gearShift, so a restart keeps it)."""
    advised: str | None = None  # the engine the advice names
    advised_since: float | None = None  # when it started naming it
    last_shift: float | None = None  # when the operator last switched the engine


def hold(state: GearState, advice: Advice, now: float) -> GearState:
    """Track how long the same engine has been advised."""
    if advice.engine is None:
        return GearState(None, None, state.last_shift)
    if advice.engine != state.advised or state.advised_since is None:
        return GearState(advice.engine, now, state.last_shift)
    return state


def should_shift(state: GearState, running: str, now: float, window: float, cooldown: float) -> str | None:
    """The engine to switch to now, or None: the advice differs from what runs, has held for the window,
    and the cooldown since the last shift has passed."""
    if state.advised is None or state.advised == running or state.advised_since is None:
        return None
    if now - state.advised_since < window:
        return None
    if state.last_shift is not None and now - state.last_shift < cooldown:
        return None
    return state.advised
