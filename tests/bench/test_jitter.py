"""The wake-up probe that the results-at-scale phase reports beside its latencies."""

from __future__ import annotations

import time

from bench.jitter import WakeupProbe, summary_us


def test_the_summary_reads_microseconds_from_seconds() -> None:
    round_trips = [0.00001] * 98 + [0.002, 0.005]  # 98 of 10 us, one of 2 ms, one of 5 ms
    assert summary_us(round_trips) == {
        "round_trips": 100,
        "p50": 10.0,
        "p99": 5000.0,
        "max": 5000.0,
        "over_1ms": 2,
    }
    assert summary_us([]) == {"round_trips": 0}


def test_the_probe_measures_round_trips_for_as_long_as_it_runs() -> None:
    with WakeupProbe(interval_s=0.01) as probe:
        time.sleep(1.0)
    found = probe.result
    assert 10 <= found["round_trips"] <= 110  # one every 10 ms and a little, for under a second
    assert 0 < found["p50"] <= found["p99"] <= found["max"]
