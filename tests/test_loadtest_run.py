"""The load tester end to end against servers on free ports: accuracy, agreement, errors, sweeps, counts."""

from __future__ import annotations

import threading

import grpc
import pytest

from mnist_client.loadtest import LoadTestConfig, TargetUnreachableError, parse_target, run
from mnist_client.loadtest.pacer import ClosedLoop
from mnist_client.loadtest.payload import load_test_set
from mnist_client.loadtest.records import RecordSink
from mnist_client.loadtest.rest_worker import HttpEngine
from stack.processes import free_port
from tests.loadtest_servers import Behaviour, GrpcServer, Oracle, RestServer

IMAGES = 100  # distinct test images in every payload: small, fast to encode, still real


@pytest.fixture(scope="module")
def test_set(mnist_dir):
    return load_test_set(mnist_dir, limit=IMAGES)


def config(*targets, **overrides) -> LoadTestConfig:
    settings = dict(targets=targets, concurrency=(2,), requests=60, warmup_requests=4, distinct_images=IMAGES,
                    timeout_s=5.0)
    settings.update(overrides)
    return LoadTestConfig(**settings)


def test_rest_and_grpc_side_by_side_report_accuracy_and_agreement(test_set):
    exact = Oracle(test_set.images, test_set.labels)
    wrong_quarter = Oracle(test_set.images, test_set.labels, wrong_every=4)
    with RestServer(exact) as rest, GrpcServer(wrong_quarter) as grpc_server:
        report = run(config(parse_target(rest.url, "rest"), parse_target(grpc_server.target, "grpc"),
                            requests=IMAGES, concurrency=(4,)))
    assert [m.target for m in report.measurements] == ["rest", "grpc"]
    for m in report.measurements:
        assert m.ok == IMAGES and not m.errors
        assert m.latency.count == IMAGES
        assert m.throughput_rps > 0
    # Every image answered exactly once per target (request count = distinct images, one image each).
    assert report.accuracy("rest") == 1.0
    assert report.accuracy("grpc") == pytest.approx(0.75)
    (pair,) = report.agreements()
    assert (pair.a, pair.b, pair.images) == ("rest", "grpc", IMAGES)
    assert pair.rate == pytest.approx(0.75)


def test_request_count_is_exact_and_warmup_excluded(test_set):
    behaviour = Behaviour(keep_alive=True)
    with RestServer(Oracle(test_set.images, test_set.labels), behaviour) as rest:
        report = run(config(parse_target(rest.url, "rest"), requests=50, warmup_requests=7, processes=2,
                            concurrency=(4,), images_per_request=3))
    (m,) = report.measurements
    assert m.ok == 50 and m.latency.count == 50
    assert m.images == 150 and m.accuracy == 1.0
    assert m.warmup_requests == 7
    assert behaviour.predicts == 1 + 7 + 50  # pre-flight, warm-up, measured


def test_sweep_over_concurrency_and_duration(test_set):
    behaviour = Behaviour(keep_alive=True)
    with RestServer(Oracle(test_set.images, test_set.labels), behaviour) as rest:
        report = run(config(parse_target(rest.url, "rest"), requests=None, duration_s=0.4, concurrency=(1, 3)))
    assert [m.point for m in report.measurements] == [1.0, 3.0]
    for m in report.measurements:
        assert m.ok > 0 and not m.errors
        assert m.elapsed_s >= 0.35  # requests kept starting until the 0.4 s were over
    # Every call the report counts was answered by the server, and nothing else: pre-flight, warm-ups, measured.
    assert behaviour.predicts == 1 + sum(m.warmup_requests + m.requests for m in report.measurements)


def test_npy_bodies_and_batches(test_set):
    with RestServer(Oracle(test_set.images, test_set.labels)) as rest:
        report = run(config(parse_target(rest.url, "rest"), rest_format="npy", images_per_request=10, requests=10))
    (m,) = report.measurements
    assert m.ok == 10 and m.images == 100 and m.accuracy == 1.0


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [(503, "unavailable", "UNAVAILABLE"), (500, "server_error", "INTERNAL"), (400, "server_error", "INVALID_ARGUMENT")],
)
def test_rest_errors_are_counted_by_kind(test_set, status, kind, code):
    behaviour = Behaviour(fail_status=status, from_call=2)  # the pre-flight call passes, the rest fail
    with RestServer(Oracle(test_set.images, test_set.labels), behaviour) as rest:
        report = run(config(parse_target(rest.url, "rest"), requests=20, warmup_requests=0))
    (m,) = report.measurements
    assert m.ok == 0 and m.errors == {kind: 20}
    assert m.error_codes == {f"{kind}/{code}": 20}
    assert f"HTTP {status}" in m.error_examples[kind][0]
    assert m.error_rate == 1.0 and m.latency.count == 0


def test_grpc_errors_and_timeouts_are_counted_by_kind(test_set):
    behaviour = Behaviour(fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED, from_call=2)
    with GrpcServer(Oracle(test_set.images, test_set.labels), behaviour) as server:
        report = run(config(parse_target(server.target, "grpc"), requests=10, warmup_requests=0))
        (m,) = report.measurements
        assert m.errors == {"server_error": 10} and m.error_codes == {"server_error/RESOURCE_EXHAUSTED": 10}

        behaviour.fail_code = None
        behaviour.delay_s = 0.5
        behaviour.from_call = behaviour.predicts + 2
        report = run(config(parse_target(server.target, "grpc"), requests=4, warmup_requests=0, timeout_s=0.1))
    (m,) = report.measurements
    assert m.errors == {"deadline_exceeded": 4}


def test_rest_timeouts_are_deadline_exceeded(test_set):
    behaviour = Behaviour(delay_s=0.5, from_call=2)
    with RestServer(Oracle(test_set.images, test_set.labels), behaviour) as rest:
        report = run(config(parse_target(rest.url, "rest"), requests=4, warmup_requests=0, timeout_s=0.1))
    (m,) = report.measurements
    assert m.errors == {"deadline_exceeded": 4}
    assert "no response within 0.1 s" in m.error_examples["deadline_exceeded"][0]


def test_refused_connections_are_unavailable():
    batches = []
    sink = RecordSink(0, batches.append)
    engine = HttpEngine("127.0.0.1", free_port(), [b"POST / HTTP/1.1\r\n\r\n"], [1], 1.0, "POST /")
    engine.run(ClosedLoop(requests=5), 2, 0, sink, record_lag=False)
    errors = [error for batch in batches for error in batch.errors]
    assert len(errors) == 5
    assert {(kind, code) for kind, code, _ in errors} == {("unavailable", "UNAVAILABLE")}
    assert "could not connect" in errors[0][2]


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_unreachable_target_fails_fast_with_a_clear_error(protocol):
    address = f"http://127.0.0.1:{free_port()}" if protocol == "rest" else f"127.0.0.1:{free_port()}"
    with pytest.raises(TargetUnreachableError, match=rf"target '{protocol}' .*{address}.* is the server running"):
        run(config(parse_target(address, protocol), timeout_s=1.0))


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_open_loop_reports_intended_and_achieved_rate(test_set, protocol):
    oracle = Oracle(test_set.images, test_set.labels)
    server = RestServer(oracle, Behaviour(keep_alive=True)) if protocol == "rest" else GrpcServer(oracle)
    with server:
        address = server.url if protocol == "rest" else server.target
        report = run(config(parse_target(address, protocol), mode="open", rates=(80.0,), requests=60, processes=2,
                            max_in_flight=8))
    (m,) = report.measurements
    assert m.ok == 60 and m.scheduled == 60 and m.accuracy == 1.0
    assert m.send_lag.count == 60  # every arrival's lateness is known
    # 60 arrivals at 80/s: the last one is due 59/80 s after the first, and none goes out early, so the
    # achieved rate cannot pass 60 requests over that span, however fast the server.
    assert m.elapsed_s >= 59 / 80
    assert m.summary()["intended_rps"] == 80.0
    assert 0 < m.summary()["achieved_rps"] <= 60 / (59 / 80)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_stop_ends_the_phase_early_and_lets_calls_in_flight_finish(test_set, protocol):
    oracle = Oracle(test_set.images, test_set.labels)
    behaviour = Behaviour(delay_s=0.05, from_call=2)  # every call is in flight for a while
    server = RestServer(oracle, behaviour) if protocol == "rest" else GrpcServer(oracle, behaviour)
    stop = threading.Event()

    def stop_once_measuring(progress) -> None:
        if progress.completed >= 20:
            stop.set()

    with server:
        address = server.url if protocol == "rest" else server.target
        report = run(config(parse_target(address, protocol), requests=None, duration_s=30.0, concurrency=(4, 8)),
                     progress=stop_once_measuring, stop=stop)
    (m,) = report.measurements  # the second sweep point never started
    assert m.ok > 0 and not m.errors  # nothing was cut off mid-call
    assert m.elapsed_s < 30.0  # ended by the stop, before its duration
    assert behaviour.predicts == 1 + 4 + m.ok  # pre-flight, warm-up, and every measured call answered
