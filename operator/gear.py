"""Gear advice and automatic shifting from observed load. Pure: the load and the time are passed in.

Advice compares the observed p95 concurrency per replica with the crossover of the measured serving table
(bench/serve.py, the README's "Serving load" table): which engine serves that many streams better and by
how much. Hysteresis keeps it from flapping: up to paged at or above the crossover, back down to gguf only
well below it (DOWN_FRACTION of the crossover), and anything in between keeps the engine that runs.
In `auto` mode a shift happens when the same advice has held for the whole window, the window was fully
observed, and the last shift is at least `cooldown` ago.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gearshift.operator.load import Load

# Output tokens/s by concurrency, gguf vs paged: bench/serve.py, SmolLM2-135M-Instruct Q4_1, 2 threads,
# idle 2-core VM, 2026-11-26 06:23 UTC (docs/bench/serve-2026-11-26.json). policy.CROSSOVER_CONCURRENCY is
# the first concurrency at which paged is ahead (tests/test_gear.py checks that the two agree). The
# 2026-11-30 run on an AVX-512-BF16 VM reads 2 (README "Serving load" says why the constant stays 4).
MEASURED_TOKENS_PER_SECOND: dict[int, tuple[float, float]] = {
    1: (76.3, 26.8), 2: (60.8, 51.2), 4: (66.6, 78.5), 8: (67.2, 121.9), 16: (64.0, 156.1), 32: (66.8, 205.2),
}
DOWN_FRACTION = 0.5  # shift back to gguf only at or below half the crossover
NO_DATA = "no pod has been scraped yet"
ADVICE_REASONS = ("AboveCrossover", "BelowCrossover", "WithinBand")  # the reasons that name an engine


def measured_crossover() -> int:
    return min(c for c, (gguf, paged) in MEASURED_TOKENS_PER_SECOND.items() if paged > gguf)


def throughput(engine: str, concurrency: float) -> float:
    """Measured output tokens/s of `engine` at `concurrency` streams, interpolated on log2(concurrency)."""
    col = 0 if engine == "gguf" else 1
    points = sorted(MEASURED_TOKENS_PER_SECOND.items())
    c = min(max(concurrency, points[0][0]), points[-1][0])
    for (c0, v0), (c1, v1) in zip(points, points[1:], strict=False):
        if c0 <= c <= c1:
            w = (math.log2(c) - math.log2(c0)) / (math.log2(c1) - math.log2(c0))
            return v0[col] + w * (v1[col] - v0[col])
    return points[-1][1][col]


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


def advise(running: str, load: Load | None, crossover: int, window_text: str) -> Advice:
    """The engine that serves the observed load better, with hysteresis around `crossover`."""
    if load is None or load.samples == 0:
        return Advice(None, "NoData", NO_DATA)
    if not load.covered:
        # no figures in the words: they would change with every scrape, and so would the status
        return Advice(None, "Observing", f"observing the load on {running}: advice after {window_text} of it")
    p95 = load.p95
    head = f"p95 {_fmt(p95)} concurrent per replica over {window_text} on {running}"
    down = crossover * DOWN_FRACTION
    gguf, paged = throughput("gguf", max(p95, 1.0)), throughput("paged", max(p95, 1.0))
    if p95 >= crossover:
        ratio = paged / gguf
        return Advice("paged", "AboveCrossover",
                      f"{head}: at or above the crossover ({crossover}); paged serves {_fmt(max(p95, 1))} streams "
                      f"at ~{ratio:.1f}x the output tokens/s of gguf (measured table)")
    if p95 <= down:
        ratio = gguf / paged
        return Advice("gguf", "BelowCrossover",
                      f"{head}: well below the crossover ({crossover}); gguf serves {_fmt(max(p95, 1))} "
                      f"stream{'s' if p95 > 1 else ''} at ~{ratio:.1f}x the output tokens/s of paged, "
                      "in a fraction of its memory")
    return Advice(running, "WithinBand",
                  f"{head}: between {_fmt(down)} and the crossover ({crossover}); {running} stays (hysteresis)")


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
