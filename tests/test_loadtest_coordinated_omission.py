"""Coordinated omission: a server that stalls on purpose, loaded in an open and in a closed loop.

The server answers one request at a time and stalls once for STALL_S. In the open loop (one request in
flight at most, a fixed arrival rate) every request scheduled during the stall waits behind it; their
latencies, measured from each request's intended send time, must include that wait. A closed loop
(and any tester that measures from the actual send) records a single slow request instead.
"""

from __future__ import annotations

import pytest

from mnist_client.loadtest import LoadTestConfig, parse_target, run
from mnist_client.loadtest.payload import load_test_set
from tests.loadtest_servers import Behaviour, Oracle, RestServer

RATE = 100.0  # arrivals per second
REQUESTS = 150  # 1.5 s of arrivals
STALL_AT = 30  # measured request number ~29 (after the pre-flight call), 0.3 s into the run
STALL_S = 0.5
SLOW_US = 200_000  # requests slower than 200 ms


def slow_requests(measurement) -> int:
    return sum(count for value, count in measurement.latency.counts().items() if value >= SLOW_US)


@pytest.fixture(scope="module")
def oracle(mnist_dir):
    test_set = load_test_set(mnist_dir, limit=50)
    return Oracle(test_set.images, test_set.labels)


def stalled_run(oracle: Oracle, **load) -> object:
    behaviour = Behaviour(stall_at_call=STALL_AT, stall_s=STALL_S, keep_alive=True)
    with RestServer(oracle, behaviour, threaded=False) as server:
        config = LoadTestConfig(targets=(parse_target(server.url, "rest"),), requests=REQUESTS, warmup_requests=0,
                                distinct_images=50, processes=1, **load)
        (measurement,) = run(config).measurements
    assert measurement.ok == REQUESTS
    return measurement


def test_open_loop_counts_the_queue_behind_a_stall(oracle):
    m = stalled_run(oracle, mode="open", rates=(RATE,), max_in_flight=1)
    # Arrivals during the first (STALL_S - 0.2 s) of the stall waited at least 200 ms each: ~30 requests.
    expected = (STALL_S - SLOW_US / 1e6) * RATE
    assert slow_requests(m) >= 0.6 * expected
    latency = m.latency_ms()
    assert latency["max"] >= STALL_S * 1000 * 0.95
    assert latency["p90"] >= 100.0  # a tenth of all requests queued behind the stall
    # The pacer reports how late requests went out: the queued ones by up to the stall.
    assert m.send_lag.max >= (STALL_S - 0.1) * 1e6
    assert m.scheduled == REQUESTS


def test_closed_loop_sees_one_slow_request(oracle):
    m = stalled_run(oracle, mode="closed", concurrency=(1,))
    # The stalled request itself is seen...
    assert slow_requests(m) >= 1
    assert m.latency_ms()["max"] >= STALL_S * 1000 * 0.95
    # ...but not the queue behind it: nothing was sent during the stall, so only the stalled request waited it
    # out, where the open loop above counts at least 0.6 x (STALL_S - 0.2 s) x RATE slow requests (a loaded
    # machine may add a few slow requests of its own, not a queue's worth).
    assert slow_requests(m) < 0.6 * (STALL_S - SLOW_US / 1e6) * RATE
