"""The built-in replica controller: replicas from observed concurrency, no metrics adapter. Pure.

The HPA's algorithm on the engine's in-flight requests (running + waiting, summed over ready pods):
desired = ceil(in_flight / targetConcurrency), left alone within a 10% tolerance of the target, bounded by
minReplicas/maxReplicas, and stabilised like the HPA's `behavior`: scaling up follows the lowest
recommendation of the last UP_WINDOW seconds, scaling down the highest of the last DOWN_WINDOW seconds,
so one quiet scrape never removes a replica that the next burst needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TOLERANCE = 0.1  # the HPA's --horizontal-pod-autoscaler-tolerance
UP_WINDOW = 0.0  # seconds; the HPA's default scaleUp stabilizationWindowSeconds
DOWN_WINDOW = 300.0  # seconds; the HPA's default scaleDown stabilizationWindowSeconds


@dataclass(frozen=True)
class Bounds:
    min_replicas: int
    max_replicas: int
    target: int  # concurrent requests per replica


def recommend(current: int, in_flight: float, bounds: Bounds) -> int:
    """The replica count for the load now, before stabilisation."""
    current = max(current, 1)
    ratio = in_flight / (current * bounds.target)
    if abs(ratio - 1.0) <= TOLERANCE:
        want = current
    else:
        want = math.ceil(in_flight / bounds.target - 1e-9)
    return min(max(want, bounds.min_replicas), bounds.max_replicas)


def stabilise(history: list[tuple[float, int]], now: float, current: int,
              up_window: float = UP_WINDOW, down_window: float = DOWN_WINDOW) -> int:
    """The replicas to set from the recommendations `history` [(t, replicas)], newest last.

    Up: the minimum recommendation within up_window (a 0 window takes the newest); down: the maximum
    within down_window. A count between them is current itself: no change."""
    if not history:
        return current
    newest = history[-1][1]
    ups = [r for t, r in history if now - t <= up_window] or [newest]
    downs = [r for t, r in history if now - t <= down_window] or [newest]
    up_to, down_to = min(ups), max(downs)
    if up_to > current:
        return up_to
    if down_to < current:
        return down_to
    return current


def prune(history: list[tuple[float, int]], now: float, keep: float) -> list[tuple[float, int]]:
    return [(t, r) for t, r in history if now - t <= keep]
