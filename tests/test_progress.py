"""The progress reporter's arithmetic and throttle (engine/progress.py), with the clock passed in."""

from __future__ import annotations

import pytest
from gearshift.engine.progress import Progress, duration, rate_and_eta


@pytest.mark.parametrize(("seconds", "text"), [(0.42, "0.4s"), (9.96, "10.0s"), (17, "17s"), (125, "2m05s"),
                                               (7384, "2h03m"), (-1, "0.0s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(("done", "total", "base", "elapsed", "want"), [
    (50, 100, 0, 5, (10.0, 5.0)),      # 10/s, 50 left
    (60, 100, 40, 2, (10.0, 4.0)),     # resumed at 40: only this run's 20 count toward the rate
    (30, None, 0, 3, (10.0, None)),    # no size: a rate, no ETA
    (0, 100, 0, 5, (None, None)),      # nothing moved yet
    (10, 100, 0, 0, (None, None)),     # no time passed
])
def test_rate_and_eta(done: float, total: float | None, base: float, elapsed: float, want: tuple) -> None:
    assert rate_and_eta(done, total, base, elapsed) == want


def test_reports_every_few_seconds_and_every_step() -> None:
    mb = 2**20
    p = Progress(total=100 * mb, start=0.0, every_s=5.0, step=0.25)
    assert p.update(10 * mb, 1.0) is None                       # neither 5 s nor a 25% step
    assert p.update(25 * mb, 2.0) == "25.0 MiB of 100.0 MiB (25%), 12.5 MiB/s, ETA 6.0s"
    assert p.update(30 * mb, 3.0) is None
    assert p.update(40 * mb, 7.5) == "40.0 MiB of 100.0 MiB (40%), 5.3 MiB/s, ETA 11s"  # 5 s since the last
    assert p.update(100 * mb, 8.0) == "100.0 MiB of 100.0 MiB (100%), 12.5 MiB/s"        # no ETA when done
    assert p.finished(8.0) == "100.0 MiB in 8.0s (12.5 MiB/s)"


def test_a_resumed_download_reports_only_this_runs_rate() -> None:
    mb = 2**20
    p = Progress(total=100 * mb, start=0.0, done=50 * mb, step=0.1)
    assert p.update(55 * mb, 1.0) is None  # still in the 50% step
    assert p.update(60 * mb, 2.0) == "60.0 MiB of 100.0 MiB (60%), 5.0 MiB/s, ETA 8.0s"


def test_unknown_size_gives_amount_and_rate() -> None:
    p = Progress(total=None, start=0.0, every_s=1.0)
    assert p.update(3 * 2**20, 2.0) == "3.0 MiB, 1.5 MiB/s"
