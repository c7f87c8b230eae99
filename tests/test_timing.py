"""Latency figures: one untimed warm-up call, then the median of the timed ones."""

from pocketdiff.devices import timing


def test_median_seconds_skips_the_warm_up_and_takes_the_median(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 10.5, 20.0, 23.0])  # begin/end of three timed calls: 5.0, 0.5, 3.0 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.median_seconds(lambda: calls.append(1), 3) == 3.0
    assert len(calls) == 4  # the warm-up ran, untimed
