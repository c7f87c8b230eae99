"""Wall-clock timing of a callable the way every latency figure here is taken: warm-up, then timed calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_times(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """ms of each of `runs` calls, after `warmup` untimed ones (first-call allocation and planning)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return times


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one untimed warm-up call."""
    return statistics.median(call_times(fn, repeats)) / 1000
