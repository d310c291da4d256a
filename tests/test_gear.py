"""Observed load, gear advice, shifting and built-in replicas as pure functions: tables, time passed in.
The spec, the policy and the reconcile's gear step that use them: test_gear_step.py."""

from __future__ import annotations

import pytest
from gearshift.engine.crossover import CONSERVATIVE_CLASS, MEASURED, crossover
from gearshift.engine.outputs import EngineStats
from gearshift.engine.server.metrics import ServerMetrics
from gearshift.operator import gear, load, replicas
from gearshift.operator.gear import Advice, GearState, advise, hold, should_shift
from gearshift.operator.load import (
    DEFAULT_CROSSOVER,
    Crossover,
    Load,
    LoadWindow,
    PodSample,
    Tick,
    load_changed,
    parse_metrics,
    pods_crossover,
)
from gearshift.operator.policy import CROSSOVER_CONCURRENCY
from gearshift.operator.replicas import Bounds, recommend, stabilise


def tick(t: float, *per_pod: tuple[float, float, float]) -> Tick:
    return Tick(t, {f"p{i}": PodSample(*s) for i, s in enumerate(per_pod)})


# ----------------------------------------------------------------------------------------- metrics

def test_parse_metrics_reads_what_the_engines_export() -> None:
    """The body of the real metrics module, not a hand-written copy: names drift together or fail here."""
    stats = EngineStats(num_running=3, num_waiting=5)
    m = ServerMetrics("smol", lambda: stats, cpu_class="avx512_bf16")
    m.generation_tokens_c.inc(1234)
    s = parse_metrics(m.render().decode())
    assert s == PodSample(running=3, waiting=5, generated=1234, crossover=2, cpu_class="avx512_bf16")


def test_a_pod_without_the_crossover_gauge_reports_none() -> None:
    """An engine image from before the gauge: the load is read, the crossover is unknown (the default)."""
    m = ServerMetrics("smol", lambda: EngineStats(num_running=1, num_waiting=1))
    m.generation_tokens_c.inc(1)
    body = "".join(ln for ln in m.render().decode().splitlines(keepends=True) if "crossover" not in ln)
    assert parse_metrics(body) == PodSample(1, 1, 1, None, None)


@pytest.mark.parametrize("body", ["", "# nothing here\n", "gearshift:num_requests_running{model_name=\"m\"} 1\n"])
def test_parse_metrics_without_the_figures_is_an_error(body: str) -> None:
    with pytest.raises(ValueError, match="no gearshift:"):
        parse_metrics(body)


# ------------------------------------------------------------------------------------- window maths

# (ticks as (t, [(running, waiting, generated) per pod]), now, window) -> (mean, p95, tok/s, span)
WINDOW_TABLE = [
    # steady 2 in flight on one pod, 100 tokens every 10 s
    ([(0, [(2, 0, 0)]), (10, [(2, 0, 100)]), (20, [(2, 0, 200)])], 20, 60, (2.0, 2.0, 10.0, 20)),
    # gguf: 1 running + 7 waiting is 8 concurrent
    ([(0, [(1, 7, 0)]), (10, [(1, 7, 50)])], 10, 60, (8.0, 8.0, 5.0, 10)),
    # a burst of 10 for 10 s out of 100: time-weighted mean 1.9 (not the per-sample 2.8), p95 = 10
    ([(0, [(1, 0, 0)]), (50, [(10, 0, 0)]), (60, [(1, 0, 0)]), (80, [(1, 0, 0)])], 100, 100,
     (1.9, 10.0, 0.0, 100)),
    # a burst shorter than 5% of the window does not move the p95
    ([(0, [(1, 0, 0)]), (50, [(10, 0, 0)]), (54, [(1, 0, 0)])], 100, 100, (1.36, 1.0, 0.0, 100)),
    # two pods: per replica is the mean of the pods; tokens add up
    ([(0, [(4, 0, 0), (2, 0, 0)]), (10, [(4, 0, 80), (2, 0, 20)])], 20, 60, (3.0, 3.0, 10.0, 20)),
    # a restarted pod's counter starts again from 0: its new value is the delta
    ([(0, [(1, 0, 500)]), (10, [(1, 0, 40)])], 10, 60, (1.0, 1.0, 4.0, 10)),
    # ticks older than the window fall out; the one just before the window still holds at its start
    ([(0, [(9, 0, 0)]), (50, [(1, 0, 0)]), (100, [(1, 0, 0)])], 110, 60, (1.0, 1.0, 0.0, 60)),
    # no pod answering: 0 in flight
    ([(0, []), (10, [])], 10, 60, (0.0, 0.0, 0.0, 10)),
]


@pytest.mark.parametrize(("ticks", "now", "window", "want"), WINDOW_TABLE)
def test_window_maths(ticks: list, now: float, window: float, want: tuple) -> None:
    w = LoadWindow(window)
    for t, pods in ticks:
        w.add(tick(t, *pods))
    got = w.load(now)
    mean, p95, tps, span = want
    assert got.mean == pytest.approx(mean, abs=0.01)
    assert got.p95 == pytest.approx(p95)
    assert got.tokens_per_second == pytest.approx(tps)
    assert got.span == pytest.approx(span)


def test_window_drops_old_ticks_and_ignores_time_going_back() -> None:
    w = LoadWindow(30)
    for t in range(0, 200, 10):
        w.add(tick(t, (1, 0, t)))
    w.add(tick(100, (50, 0, 0)))  # a late round
    assert [t.t for t in w.ticks] == [160, 170, 180, 190]
    assert w.load(190).mean == 1.0


def L(p95: float, mean: float | None = None, tps: float = 0.0, span: float = 600, window: float = 600,
      x: Crossover = DEFAULT_CROSSOVER) -> Load:
    return Load(window=window, span=span, mean=p95 if mean is None else mean, p95=p95, tokens_per_second=tps,
                samples=10, crossover=x)


@pytest.mark.parametrize(("previous", "new", "changed"), [
    (None, L(0), True),  # first write
    ({"window": "10m", "meanConcurrency": 0, "p95Concurrency": 0, "outputTokensPerSecond": 0}, L(0), False),
    ({"window": "10m", "meanConcurrency": 0, "p95Concurrency": 0, "outputTokensPerSecond": 0}, L(0.3), False),
    ({"window": "10m", "meanConcurrency": 0, "p95Concurrency": 0, "outputTokensPerSecond": 0}, L(1), True),
    ({"window": "10m", "meanConcurrency": 8, "p95Concurrency": 8, "outputTokensPerSecond": 120}, L(8.9, tps=130), False),
    ({"window": "10m", "meanConcurrency": 8, "p95Concurrency": 8, "outputTokensPerSecond": 120}, L(10, tps=120), True),
    ({"window": "10m", "meanConcurrency": 8, "p95Concurrency": 8, "outputTokensPerSecond": 120}, L(8, tps=150), True),
    ({"window": "5m", "meanConcurrency": 0, "p95Concurrency": 0, "outputTokensPerSecond": 0}, L(0), True),
])
def test_status_load_is_rewritten_only_on_a_meaningful_step(previous: dict | None, new: Load, changed: bool) -> None:
    assert load_changed(previous, new, "10m") is changed


# ------------------------------------------------------------------------------------------ advice

def test_create_time_policy_uses_the_conservative_measured_crossover() -> None:
    """One table (engine/crossover.py): each CPU class's crossover is read off its measured run, and the
    policy's create-time constant is the conservative class's."""
    assert {c: m.crossover for c, m in MEASURED.items()} == {"avx512_bf16": 2, "avx2": 4}
    assert CROSSOVER_CONCURRENCY == crossover(CONSERVATIVE_CLASS) == DEFAULT_CROSSOVER.value == 4


@pytest.mark.parametrize(("c", "engine", "cls", "tps"), [
    (1, "gguf", None, 76.3), (4, "paged", None, 78.5), (0.5, "paged", None, 26.8), (64, "paged", None, 205.2),
    (6, "paged", None, 103.9), (2, "paged", "avx512_bf16", 168.4), (1, "gguf", "avx512_bf16", 119.1),
    (3, "paged", "other", 67.2),  # never measured: the conservative table
])
def test_throughput_interpolates_the_measured_table(c: float, engine: str, cls: str | None, tps: float) -> None:
    assert gear.throughput(engine, c, cls) == pytest.approx(tps, abs=0.1)


BF16 = Crossover(2, "avx512_bf16")
AVX2 = Crossover(4, "avx2")


# pods of one tick (crossover, cpu_class) -> the crossover the advice uses
@pytest.mark.parametrize(("pods", "want"), [
    ([(2, "avx512_bf16")], BF16),
    ([(2, "avx512_bf16"), (2, "avx512_bf16")], BF16),
    ([(2, "avx512_bf16"), (4, "avx2")], AVX2),  # replicas on different CPUs: the later shift to paged
    ([(4, "avx2"), (4, "other")], Crossover(4, "avx2/other")),
    ([(2, "avx512_bf16"), (None, None)], DEFAULT_CROSSOVER),  # one pod from an image without the gauge
    ([(None, None)], DEFAULT_CROSSOVER),
    ([], DEFAULT_CROSSOVER),
])
def test_the_crossover_of_a_resource_is_what_its_pods_report(pods: list, want: Crossover) -> None:
    assert pods_crossover({f"p{i}": PodSample(1, 0, 0, x, c) for i, (x, c) in enumerate(pods)}) == want


def test_the_window_carries_the_latest_ticks_crossover() -> None:
    w = LoadWindow(60)
    w.add(Tick(0, {"a": PodSample(1, 0, 0, 4, "avx2")}))
    w.add(Tick(10, {"b": PodSample(1, 0, 0, 2, "avx512_bf16")}))  # the pod was replaced on another node
    assert w.load(20).crossover == BF16


X = CROSSOVER_CONCURRENCY
# (running engine, load) -> (advised engine, reason, words in the message); crossover: the default (no pod
# reports one), which is the conservative 4
ADVICE_TABLE = [
    ("gguf", None, None, "NoData", ["no pod"]),
    ("gguf", L(14, span=100), None, "Observing", ["advice after 10m"]),
    ("gguf", L(14), "paged", "AboveCrossover", ["p95 14 concurrent per replica over 10m on gguf",
                                                 f"crossover ({X}, the default", "~2.3x", "measured on avx2"]),
    ("gguf", L(X), "paged", "AboveCrossover", ["at or above"]),
    ("gguf", L(X - 0.5), "gguf", "WithinBand", ["gguf stays (hysteresis)"]),
    ("paged", L(X - 0.5), "paged", "WithinBand", ["paged stays"]),
    ("paged", L(X * gear.DOWN_FRACTION), "gguf", "BelowCrossover", ["well below", "~1.2x"]),
    ("paged", L(0), "gguf", "BelowCrossover", ["p95 0 concurrent", "~2.8x"]),
    ("paged", L(32), "paged", "AboveCrossover", ["~3.1x"]),
    # pods on an AVX2-only CPU report 4: the same thresholds, and the message says where it comes from
    ("gguf", L(3, x=AVX2), "gguf", "WithinBand", ["between 2 and the crossover (4 on the pods' CPU: avx2)"]),
    ("gguf", L(4, x=AVX2), "paged", "AboveCrossover", ["crossover (4 on the pods' CPU: avx2)", "~1.2x"]),
    # pods on an AVX512-BF16 CPU report 2: 2 streams already advise paged, and only 1 goes back to gguf
    ("gguf", L(2, x=BF16), "paged", "AboveCrossover", ["crossover (2 on the pods' CPU: avx512_bf16)", "~1.4x",
                                                        "measured on avx512_bf16"]),
    ("gguf", L(1.5, x=BF16), "gguf", "WithinBand", ["between 1 and the crossover (2"]),
    ("paged", L(1.5, x=BF16), "paged", "WithinBand", ["paged stays"]),
    ("paged", L(1, x=BF16), "gguf", "BelowCrossover", ["well below the crossover (2", "gguf serves 1 stream at ~1.3x"]),
    ("paged", L(0, x=BF16), "gguf", "BelowCrossover", ["p95 0 concurrent"]),
    ("gguf", L(14, x=BF16), "paged", "AboveCrossover", ["~5.8x"]),
    # a CPU class never measured reports the conservative 4, and the ratio comes from the conservative run
    ("gguf", L(4, x=Crossover(4, "other")), "paged", "AboveCrossover", ["crossover (4 on the pods' CPU: other)",
                                                                        "~1.2x", "(measured on avx2)"]),
]


@pytest.mark.parametrize(("running", "load_", "engine", "reason", "words"), ADVICE_TABLE)
def test_advice_table(running: str, load_: Load | None, engine: str | None, reason: str, words: list[str]) -> None:
    a = advise(running, load_, "10m")
    assert (a.engine, a.reason) == (engine, reason)
    for w in words:
        assert w in a.message, (w, a.message)


# ------------------------------------------------------------------------------ hysteresis, cooldown

UP = Advice("paged", "AboveCrossover", "")
DOWN = Advice("gguf", "BelowCrossover", "")
BAND_G = Advice("gguf", "WithinBand", "")
NONE = Advice(None, "Observing", "")


def run_shifter(steps: list[tuple[float, Advice]], running: str, window: float, cooldown: float,
                last_shift: float | None = None) -> list[tuple[float, str]]:
    """Feed advice over time like the operator does; returns [(t, engine shifted to)]."""
    state, shifts = GearState(last_shift=last_shift), []
    for t, advice in steps:
        state = hold(state, advice, t)
        to = should_shift(state, running, t, window, cooldown)
        if to:
            shifts.append((t, to))
            running = to
            state = GearState(state.advised, state.advised_since, last_shift=t)
    return shifts


@pytest.mark.parametrize(("steps", "running", "last_shift", "want"), [
    # advice must hold for the whole window (60 s) before a shift
    ([(0, UP), (30, UP), (59, UP)], "gguf", None, []),
    ([(0, UP), (30, UP), (60, UP)], "gguf", None, [(60, "paged")]),
    # a break in the advice restarts the clock
    ([(0, UP), (30, BAND_G), (40, UP), (90, UP), (100, UP)], "gguf", None, [(100, "paged")]),
    ([(0, UP), (30, NONE), (40, UP), (100, UP)], "gguf", None, [(100, "paged")]),
    # advice naming the running engine never shifts
    ([(0, BAND_G), (100, BAND_G)], "gguf", None, []),
    # cooldown: the last shift was at -10 s, cooldown 120 s -> not before 110 s
    ([(0, UP), (60, UP), (100, UP), (110, UP)], "gguf", -10, [(110, "paged")]),
    # up then down: the down shift waits for its own window and for the cooldown since the up shift
    ([(0, UP), (60, UP), (70, DOWN), (130, DOWN), (170, DOWN), (180, DOWN)], "gguf", None,
     [(60, "paged"), (180, "gguf")]),
])
def test_shift_hysteresis_and_cooldown(steps: list, running: str, last_shift: float | None, want: list) -> None:
    assert run_shifter(steps, running, window=60, cooldown=120, last_shift=last_shift) == want


def test_load_that_sits_between_the_thresholds_never_flaps() -> None:
    """3 streams (between 2 and the crossover 4), or 1.5 on a CPU whose crossover is 2, on either engine:
    advice keeps what runs."""
    for running in ("gguf", "paged"):
        for load_ in (L(X - 1), L(1.5, x=BF16)):
            steps = [(t, advise(running, load_, "1m")) for t in range(0, 1000, 10)]
            assert run_shifter(steps, running, window=60, cooldown=60) == []


# ------------------------------------------------------------------------------------------ replicas

B = Bounds(min_replicas=1, max_replicas=5, target=4)


@pytest.mark.parametrize(("current", "in_flight", "want"), [
    (1, 0, 1), (1, 4, 1), (1, 4.3, 1),  # within 10% of the target: no change
    (1, 5, 2), (1, 16, 4), (2, 16, 4), (1, 100, 5),  # bounded by max
    (4, 4, 1), (3, 0, 1),  # down to min
    (2, 8.5, 2), (2, 9, 3),
])
def test_replica_recommendation(current: int, in_flight: float, want: int) -> None:
    assert recommend(current, in_flight, B) == want


@pytest.mark.parametrize(("history", "now", "current", "want"), [
    ([], 0, 2, 2),
    ([(0, 3)], 0, 1, 3),  # up at once (up window 0)
    ([(0, 3), (10, 1)], 10, 3, 3),  # down waits: the highest of the last 300 s is 3
    ([(0, 3), (301, 1)], 301, 3, 1),  # after the down window
    ([(0, 3), (100, 2), (200, 1)], 310, 3, 2),
])
def test_replica_stabilisation(history: list, now: float, current: int, want: int) -> None:
    assert stabilise(history, now, current) == want


def test_replica_up_window_takes_the_lowest() -> None:
    assert stabilise([(0, 5), (10, 3), (20, 4)], 20, 1, up_window=30) == 3
    assert replicas.prune([(0, 5), (10, 3), (20, 4)], 20, 15) == [(10, 3), (20, 4)]
    assert load.ceil_concurrency(3.0) == 3 and load.ceil_concurrency(0) == 1
