"""The open loop run by duration: every arrival due in ``[start, start + duration)``, no more, no fewer.

The counts below are worked out by hand: arrival ``i`` is due ``i / rate`` seconds after the start, so
a duration holds the arrivals with ``i / rate < duration``. ``ceil(rate * duration)`` gets these wrong
where the float product lands just above a whole number (50/s for 1.1 s: 55.00000000000001).
"""

from __future__ import annotations

import pytest

from mnist_client.loadtest import LoadTestConfig, parse_target, run
from mnist_client.loadtest.pacer import NS_PER_S, OpenLoop, arrivals_in
from mnist_client.loadtest.payload import load_test_set
from tests.loadtest_servers import Behaviour, Oracle, RestServer

IMAGES = 20


@pytest.mark.parametrize(
    ("rate", "duration_s", "arrivals"),
    [
        (50.0, 1.1, 55),  # due at 0, 0.02, ..., 1.08 s; the 56th would be at 1.1 s, the end itself
        (100.0, 1.5, 150),
        (100.0, 1.1, 110),  # 100 * 1.1 is 110.00000000000001 in floats
        (90.0, 0.7, 63),  # 90 * 0.7 is 62.99999999999999: ceil is right here, the count must be too
        (3.0, 1.0, 3),  # 0, 1/3, 2/3
        (3.0, 1.01, 4),  # and 1.0 < 1.01
        (7.0, 0.3, 3),  # 0, 1/7, 2/7 (0.2857 < 0.3)
        (0.5, 3.0, 2),  # 0 and 2 s
        (80.0, 0.0, 0),
    ],
)
def test_arrivals_in_a_duration(rate: float, duration_s: float, arrivals: int) -> None:
    assert arrivals_in(rate, duration_s) == arrivals
    pacer = OpenLoop.for_duration(rate=rate, start_ns=0, duration_s=duration_s)
    assert pacer.scheduled == arrivals
    due = []
    while (intended := pacer.take(10**15)) is not None:  # far in the future: every arrival is due
        due.append(intended)
    assert len(due) == arrivals
    assert all(0 <= t < duration_s * NS_PER_S for t in due)  # inside [start, start + duration)


@pytest.mark.parametrize(("rate", "duration_s"), [(0.0, 1.0), (-5.0, 1.0), (float("inf"), 1.0), (10.0, -1.0)])
def test_arrivals_in_refuses_a_rate_or_duration_that_means_nothing(rate: float, duration_s: float) -> None:
    with pytest.raises(ValueError, match="expected"):
        arrivals_in(rate, duration_s)


def test_a_run_by_duration_sends_the_arrivals_of_that_duration(mnist_dir) -> None:
    test_set = load_test_set(mnist_dir, limit=IMAGES)
    behaviour = Behaviour(keep_alive=True)
    with RestServer(Oracle(test_set.images, test_set.labels), behaviour) as rest:
        config = LoadTestConfig(targets=(parse_target(rest.url, "rest"),), mode="open", rates=(50.0,),
                                requests=None, duration_s=1.1, warmup_requests=3, distinct_images=IMAGES,
                                processes=2, max_in_flight=8, timeout_s=10.0)
        (m,) = run(config).measurements
    assert m.scheduled == 55 and m.ok == 55 and not m.errors
    assert m.send_lag.count == 55
    assert behaviour.predicts == 1 + 3 + 55  # pre-flight, warm-up, the 55 arrivals and nothing after them
    assert m.accuracy == 1.0
