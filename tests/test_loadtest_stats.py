"""Statistics: HDR percentiles on known samples, exact encode/add, union of windows, pacer schedules."""

from __future__ import annotations

import math
import random

import pytest

from mnist_client.loadtest.pacer import ClosedLoop, OpenLoop, share
from mnist_client.loadtest.stats import HIGHEST_US, LatencyHistogram, Measurement, union_length


def nearest_rank(samples: list[int], percentile: float) -> int:
    ordered = sorted(samples)
    rank = math.ceil(percentile * len(ordered) / 100 - 1e-9)  # tolerate 99.9 * 1000 / 100 = 999.0000000000001
    return ordered[max(1, rank) - 1]


@pytest.mark.parametrize(
    "samples",
    [
        list(range(1, 10_001)),  # uniform 1 us .. 10 ms
        [500] * 900 + [20_000] * 90 + [250_000] * 9 + [3_000_000],  # bimodal with a tail
        [random.Random(7).randint(50, 5_000_000) for _ in range(20_000)],
    ],
)
def test_percentiles_match_exact_values_within_hdr_precision(samples):
    histogram = LatencyHistogram()
    histogram.record_many(samples)
    assert histogram.count == len(samples)
    for percentile in (50.0, 90.0, 99.0, 99.9, 100.0):
        exact = nearest_rank(samples, percentile)
        # 3 significant digits: every value is within 0.1% of the recorded one.
        assert histogram.value_at(percentile) == pytest.approx(exact, rel=1e-3), percentile
    assert histogram.max == pytest.approx(max(samples), rel=1e-3)
    assert histogram.min == pytest.approx(min(samples), rel=1e-3)
    assert histogram.mean == pytest.approx(sum(samples) / len(samples), rel=1e-3)


def test_known_percentiles_of_a_simple_sample():
    histogram = LatencyHistogram()
    histogram.record_many([1000] * 50 + [2000] * 40 + [9000] * 9 + [50_000])
    values = histogram.values_at((50.0, 90.0, 99.0, 99.9))
    assert values[50.0] == pytest.approx(1000, rel=1e-3)
    assert values[90.0] == pytest.approx(2000, rel=1e-3)
    assert values[99.0] == pytest.approx(9000, rel=1e-3)
    assert values[99.9] == pytest.approx(50_000, rel=1e-3)


def test_values_beyond_the_range_are_clamped_and_counted():
    histogram = LatencyHistogram()
    histogram.record(HIGHEST_US * 2)
    histogram.record(-5)
    assert histogram.count == 2 and histogram.clamped == 1
    assert histogram.max == pytest.approx(HIGHEST_US, rel=1e-3)


def test_encoded_histograms_add_up_to_the_histogram_of_the_union():
    rng = random.Random(3)
    a = [rng.randint(100, 200_000) for _ in range(5000)]
    b = [rng.randint(1_000, 2_000_000) for _ in range(3000)]
    ha, hb, union = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    ha.record_many(a)
    hb.record_many(b)
    union.record_many(a + b)
    merged = LatencyHistogram.decode(ha.encode())
    merged.add(LatencyHistogram.decode(hb.encode()))
    assert merged == union
    assert merged.counts() == union.counts()
    assert merged.values_at() == union.values_at()
    assert merged.min == union.min and merged.max == union.max


def test_empty_histogram_reports_zeros():
    histogram = LatencyHistogram.decode(LatencyHistogram().encode())
    assert histogram.count == 0 and histogram.values_at() == {50.0: 0, 90.0: 0, 99.0: 0, 99.9: 0}
    assert histogram.max == histogram.min == 0


def test_union_of_windows():
    assert union_length([]) == 0
    assert union_length([(0, 10), (2, 5)]) == 10  # pods at the same time
    assert union_length([(0, 10), (5, 12)]) == 12
    assert union_length([(0, 10), (20, 25)]) == 15  # runs one after the other


def test_measurement_throughput_and_add():
    a = Measurement("rest", "rest", "http://x", "closed", 4, 1, ok=90, windows=[(100.0, 110.0)])
    a.record_error("unavailable", "UNAVAILABLE", "refused")
    a.record_error("unavailable", "UNAVAILABLE", "refused")
    b = Measurement("rest", "rest", "http://x", "closed", 4, 1, ok=98, windows=[(100.0, 110.0)])
    assert a.throughput_rps == pytest.approx(9.2)
    a.add(b)
    assert a.requests == 190 and a.errors == {"unavailable": 2}
    assert a.error_examples == {"unavailable": ["refused"]}
    assert a.throughput_rps == pytest.approx(19.0)  # both machines in the same 10 s


def test_open_loop_schedule_interleaves_workers_exactly():
    rate, total, workers = 250.0, 1000, 3
    pacers = [OpenLoop(rate=rate, start_ns=0, total=total, worker=w, workers=workers) for w in range(workers)]
    intended = []
    for pacer in pacers:
        while (t := pacer.take(10**12)) is not None:  # far in the future: everything is due
            intended.append(t)
    assert sorted(intended) == [int(i * 1e9 / rate) for i in range(total)]
    assert sum(OpenLoop(rate=rate, start_ns=0, total=total, worker=w, workers=workers).scheduled
               for w in range(workers)) == total


def test_open_loop_keeps_intended_times_of_overdue_requests():
    pacer = OpenLoop(rate=100.0, start_ns=0, total=10)
    assert pacer.take(0) == 0
    assert pacer.take(5_000_000) is None  # the next one is due at 10 ms
    assert pacer.next_due_ns(5_000_000) == 10_000_000
    # A stall: at 55 ms, five requests are overdue and keep their own times.
    assert [pacer.take(55_000_000) for _ in range(6)] == [10_000_000, 20_000_000, 30_000_000, 40_000_000,
                                                          50_000_000, None]
    assert OpenLoop.for_duration(rate=100.0, start_ns=0, duration_s=1.5).scheduled == 150


def test_closed_loop_by_count_and_by_deadline():
    by_count = ClosedLoop(requests=2)
    assert by_count.take(5) == 5 and by_count.take(6) == 6 and by_count.take(7) is None and by_count.done
    by_time = ClosedLoop(end_ns=100)
    assert by_time.take(99) == 99 and by_time.next_due_ns(100) is None and by_time.take(100) is None
    assert [share(10, 3, i) for i in range(3)] == [4, 3, 3]
