"""Progress of long work (a model download, a weight load) as throttled one-line reports with rate and ETA.

Pure: the caller passes the clock's readings, so the throttle and the arithmetic are table-testable.

    p = Progress(total=size, start=time.monotonic(), done=resumed_bytes)
    line = p.update(done, time.monotonic())   # None, or a report: every `every_s` seconds or `step` of total
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    """0.42 -> '0.4s', 17 -> '17s', 125 -> '2m05s', 7384 -> '2h03m'."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate_and_eta(done: float, total: float | None, base: float, elapsed: float) -> tuple[float | None, float | None]:
    """(units per second since the start, seconds left) from `done` of `total`, `base` already done at the
    start (a resumed download's bytes: not part of this run's rate). None where it cannot be known yet."""
    moved = done - base
    if elapsed <= 0 or moved <= 0:
        return None, None
    rate = moved / elapsed
    return rate, (max(0.0, total - done) / rate if total else None)


@dataclass
class Progress:
    """Throttled reports: at most one per `every_s` seconds, plus one each time another `step` of the
    total is crossed (so a short job still says how it went, a long one is heard from every few seconds)."""

    total: float | None
    start: float
    done: float = 0.0  # already done at `start` (resumed)
    every_s: float = 5.0
    step: float = 0.25
    fmt: Callable[[float], str] = mib  # how an amount reads: bytes -> "12.0 MiB"
    unit: str = "MiB/s"
    per_unit: float = 2**20  # the rate's divisor for `unit`
    _base: float = field(init=False)
    _last_t: float = field(init=False)
    _last_step: int = field(init=False)

    def __post_init__(self) -> None:
        self._base, self._last_t, self._last_step = self.done, self.start, self._step_of(self.done)

    def _step_of(self, done: float) -> int:
        return int(done * round(1 / self.step) // self.total) if self.total and self.step else 0  # no 5.999

    def update(self, done: float, now: float) -> str | None:
        self.done = done
        step = self._step_of(done)
        if now - self._last_t < self.every_s and step == self._last_step:
            return None
        self._last_t, self._last_step = now, step
        return self.line(now)

    def line(self, now: float) -> str:
        """'12.0 MiB of 40.0 MiB (30%), 3.1 MiB/s, ETA 9s' (what is known of it)."""
        rate, eta = rate_and_eta(self.done, self.total, self._base, now - self.start)
        text = self.fmt(self.done)
        if self.total:
            text += f" of {self.fmt(self.total)} ({min(100, int(100 * self.done // self.total))}%)"
        if rate is not None:
            text += f", {rate / self.per_unit:.1f} {self.unit}"
        if eta is not None and self.done < (self.total or 0):
            text += f", ETA {duration(eta)}"
        return text

    def finished(self, now: float) -> str:
        """The closing report: what was done, in how long, at what rate."""
        rate, _ = rate_and_eta(self.done, None, self._base, now - self.start)
        text = f"{self.fmt(self.done)} in {duration(now - self.start)}"
        return text + (f" ({rate / self.per_unit:.1f} {self.unit})" if rate is not None else "")
