"""Observed load of one InferenceService: a sliding window of scrapes of its pods' /metrics. Pure.

A tick is one scrape round of every ready pod of a resource at time `t` (seconds, any monotonic clock:
the caller passes it in). Concurrency is requests in flight per replica, running + waiting: the gguf
runner decodes one request at a time and queues the rest, so `running` alone would hide its demand.
Between ticks the concurrency is taken to hold its last value (a step function), which is what makes
the mean and p95 time-weighted: a burst seen by one tick counts for as long as it lasted, not once per
scrape. Output tokens/s comes from the deltas of each pod's `generation_tokens` counter (a counter that
went down is a restarted pod: its new value is the delta), summed over pods, over the window's span.
The crossover is what the latest tick's pods report for their CPU (`crossover_concurrency`,
engine/crossover.py): the largest of them, and the conservative default where a pod reports none.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gearshift.engine.crossover import CONSERVATIVE_CROSSOVER
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "gearshift:"  # engine/server/metrics.py's metric names
RUNNING, WAITING, GENERATED = "num_requests_running", "num_requests_waiting", "generation_tokens"
CROSSOVER = "crossover_concurrency"


@dataclass(frozen=True)
class PodSample:
    running: float
    waiting: float
    generated: float  # the cumulative output-token counter
    crossover: int | None = None  # the engine crossover of the pod's CPU; None: not reported (older image)
    cpu_class: str | None = None


@dataclass(frozen=True)
class Crossover:
    """The crossover the advice uses for a resource, and the CPU class it was measured for."""
    value: int
    cpu_class: str | None  # None: a pod does not report its CPU's, so the conservative default


DEFAULT_CROSSOVER = Crossover(CONSERVATIVE_CROSSOVER, None)


def pods_crossover(pods: dict[str, PodSample]) -> Crossover:
    """The largest crossover the pods report (pods on different CPUs: the one that shifts to paged last);
    the default as soon as one pod reports none."""
    reported = [(p.crossover, p.cpu_class or "") for p in pods.values() if p.crossover is not None]
    if not pods or len(reported) < len(pods):
        return DEFAULT_CROSSOVER
    top = max(v for v, _ in reported)
    return Crossover(top, "/".join(sorted({c for v, c in reported if v == top and c})) or None)


@dataclass(frozen=True)
class Tick:
    t: float
    pods: dict[str, PodSample] = field(default_factory=dict)  # pod name -> its scrape

    @property
    def concurrency(self) -> float:
        """Requests in flight per replica (0 with no pod answering)."""
        if not self.pods:
            return 0.0
        return sum(p.running + p.waiting for p in self.pods.values()) / len(self.pods)

    @property
    def in_flight(self) -> float:
        return sum(p.running + p.waiting for p in self.pods.values())


@dataclass(frozen=True)
class Load:
    window: float  # seconds asked for
    span: float  # seconds the ticks cover (< window right after a start)
    mean: float  # time-weighted mean concurrency per replica
    p95: float  # time-weighted 95th percentile of concurrency per replica
    tokens_per_second: float  # achieved output tokens/s, all replicas together
    samples: int
    crossover: Crossover = DEFAULT_CROSSOVER  # what the latest tick's pods report

    @property
    def covered(self) -> bool:
        """Whether the ticks span the whole window (advice needs a full window of evidence)."""
        return self.span >= self.window * 0.9


def parse_metrics(text: str) -> PodSample:
    """A /metrics body -> the figures the window needs. Raises ValueError on a body without them."""
    found: dict[str, float] = {}
    crossover: tuple[int | None, str | None] = (None, None)
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix(PREFIX)
        for s in family.samples:
            # counters are exposed as `<name>_total`; the family name drops the suffix
            if name in (RUNNING, WAITING, GENERATED) and s.name in (family.name, family.name + "_total"):
                found[name] = found.get(name, 0.0) + float(s.value)
            elif name == CROSSOVER and s.name == family.name and s.value >= 1:
                crossover = (int(s.value), s.labels.get("cpu_class") or None)
    missing = [n for n in (RUNNING, WAITING, GENERATED) if n not in found]
    if missing:
        raise ValueError(f"no {PREFIX}{missing[0]} in the metrics")
    return PodSample(found[RUNNING], found[WAITING], found[GENERATED], *crossover)


def _steps(ticks: list[Tick], now: float, start: float) -> list[tuple[float, float]]:
    """(concurrency, seconds it held) for each tick, clipped to [start, now]."""
    out = []
    for i, tick in enumerate(ticks):
        begin = max(tick.t, start)
        end = min(ticks[i + 1].t if i + 1 < len(ticks) else now, now)
        if end > begin:
            out.append((tick.concurrency, end - begin))
    return out


def time_weighted_mean(steps: list[tuple[float, float]]) -> float:
    total = sum(d for _, d in steps)
    return sum(v * d for v, d in steps) / total if total > 0 else 0.0


def time_weighted_quantile(steps: list[tuple[float, float]], q: float) -> float:
    """The smallest value v such that the load was <= v for at least a share q of the time."""
    total = sum(d for _, d in steps)
    if total <= 0:
        return 0.0
    acc = 0.0
    for v, d in sorted(steps):
        acc += d
        if acc >= q * total - 1e-9:
            return v
    return max(v for v, _ in steps)


def tokens_per_second(ticks: list[Tick]) -> float:
    """Output tokens/s from counter deltas between consecutive ticks, summed over pods."""
    if len(ticks) < 2 or ticks[-1].t <= ticks[0].t:
        return 0.0
    tokens = 0.0
    for prev, cur in zip(ticks, ticks[1:], strict=False):
        for pod, s in cur.pods.items():
            before = prev.pods.get(pod)
            if before is None:
                continue  # a new pod: its first scrape is the baseline
            delta = s.generated - before.generated
            tokens += delta if delta >= 0 else s.generated  # the pod restarted: the counter began at 0
    return tokens / (ticks[-1].t - ticks[0].t)


class LoadWindow:
    """The ticks of one resource within `window` seconds (plus the one before, which still holds)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.ticks: deque[Tick] = deque()

    def add(self, tick: Tick) -> None:
        if self.ticks and tick.t <= self.ticks[-1].t:
            return  # a late or duplicate round: time never goes back
        self.ticks.append(tick)
        start = tick.t - self.window
        while len(self.ticks) >= 2 and self.ticks[1].t <= start:
            self.ticks.popleft()

    def load(self, now: float) -> Load:
        ticks = list(self.ticks)
        start = now - self.window
        steps = _steps(ticks, now, start)
        span = sum(d for _, d in steps)
        inside = [t for t in ticks if t.t >= start]
        return Load(window=self.window, span=span, mean=time_weighted_mean(steps),
                    p95=time_weighted_quantile(steps, 0.95), tokens_per_second=tokens_per_second(inside),
                    samples=len(inside), crossover=pods_crossover(ticks[-1].pods) if ticks else DEFAULT_CROSSOVER)


# A status write is worth it when a figure moves by at least this much (absolute or relative, whichever
# is larger): the status is for humans and the advice, not a time series (Prometheus has that).
CONCURRENCY_STEP = 0.5
TOKENS_STEP = 2.0
RELATIVE_STEP = 0.15


def _moved(old: float | None, new: float, absolute: float) -> bool:
    if old is None:
        return True
    return abs(new - old) >= max(absolute, RELATIVE_STEP * abs(old))


def round_load(load: Load) -> dict[str, float]:
    return {"meanConcurrency": round(load.mean, 2), "p95Concurrency": round(load.p95, 2),
            "outputTokensPerSecond": round(load.tokens_per_second, 1)}


def load_changed(previous: dict | None, load: Load, window_text: str) -> bool:
    """Whether status.load should be rewritten: a figure moved by a meaningful step, or the window changed."""
    previous = previous or {}
    if previous.get("window") != window_text:
        return True
    figures = round_load(load)
    return (_moved(previous.get("meanConcurrency"), figures["meanConcurrency"], CONCURRENCY_STEP)
            or _moved(previous.get("p95Concurrency"), figures["p95Concurrency"], CONCURRENCY_STEP)
            or _moved(previous.get("outputTokensPerSecond"), figures["outputTokensPerSecond"], TOKENS_STEP))


def ceil_concurrency(value: float) -> int:
    return max(1, math.ceil(value - 1e-9))
