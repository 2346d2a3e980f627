"""Retries: only what is safe, with exponential backoff and jitter, under one deadline.

Counting servers show that probes are retried, that a predict is retried only when it provably never
left the client (connection refused), and that a predict which may have run is never sent twice.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: F401 - import TF now, not in a timed test

from client_fakes import Behaviour, GrpcServer, RestServer
from mnist_client.errors import DeadlineExceededError, ServerError, UnavailableError
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from mnist_client.retry import RetryPolicy, call_with_retries, is_retryable_predict, is_retryable_probe
from stack.processes import free_port

IMAGE = np.zeros((1, 28, 28), np.uint8)
FAST = RetryPolicy(max_attempts=20, initial_backoff=0.02, max_backoff=0.2)
# Reconnect quickly after a refused connection, so the tests need not wait gRPC's default 1 s backoff.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


# -- the backoff loop on a fake clock -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors: list[Exception]):
    calls: list[float] = []

    def attempt(remaining: float) -> str:
        calls.append(remaining)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    return attempt, calls


def test_backoff_grows_exponentially_up_to_the_cap():
    clock = FakeClock()
    attempt, calls = failing([UnavailableError("down", request_sent=False)] * 5)
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2)
    result = call_with_retries(
        attempt,
        policy=policy,
        timeout=100,
        retryable=is_retryable_predict,
        description="t",
        sleep=clock.sleep,
        clock=clock,
        rng=lambda: 1.0,
    )
    assert result == "ok" and len(calls) == 6
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert calls[0] == 100 and calls[-1] == pytest.approx(100 - sum(clock.sleeps))  # each attempt gets what is left


def test_jitter_scales_each_pause_within_its_ceiling():
    clock = FakeClock()
    attempt, _ = failing([UnavailableError("down", request_sent=False)] * 3)
    draws = iter([0.5, 0.0, 0.25])
    call_with_retries(
        attempt,
        policy=RetryPolicy(initial_backoff=0.2, max_backoff=1.0),
        timeout=10,
        retryable=is_retryable_predict,
        description="t",
        sleep=clock.sleep,
        clock=clock,
        rng=lambda: next(draws),
    )
    assert clock.sleeps == pytest.approx([0.1, 0.0, 0.2])


def test_gives_up_after_max_attempts_with_the_last_error():
    clock = FakeClock()
    errors = [UnavailableError(f"down {i}", request_sent=False) for i in range(5)]
    attempt, calls = failing(errors)
    with pytest.raises(UnavailableError, match="down 2"):
        call_with_retries(
            attempt,
            policy=RetryPolicy(max_attempts=3),
            timeout=10,
            retryable=is_retryable_predict,
            description="t",
            sleep=clock.sleep,
            clock=clock,
            rng=lambda: 1.0,
        )
    assert len(calls) == 3


def test_never_sleeps_past_the_deadline():
    clock = FakeClock()
    attempt, calls = failing([UnavailableError("down", request_sent=False)] * 100)
    with pytest.raises(UnavailableError):
        call_with_retries(
            attempt,
            policy=RetryPolicy(max_attempts=100, initial_backoff=0.3, max_backoff=0.3),
            timeout=1.0,
            retryable=is_retryable_predict,
            description="t",
            sleep=clock.sleep,
            clock=clock,
            rng=lambda: 1.0,
        )
    assert len(calls) == 4 and clock.now == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("error", "predict", "probe"),
    [
        (UnavailableError("refused", request_sent=False), True, True),
        (UnavailableError("reset after sending", request_sent=True), False, True),
        (DeadlineExceededError("slow"), False, True),
        (ServerError("bad request", code="INVALID_ARGUMENT", status=400), False, False),
    ],
)
def test_what_is_retryable(error, predict, probe):
    assert is_retryable_predict(error) is predict
    assert is_retryable_probe(error) is probe


# -- REST, against servers that count ------------------------------------------------------------------


def start_later(start, delay: float) -> dict:
    started: dict = {}
    thread = threading.Timer(delay, lambda: started.setdefault("server", start()))
    thread.start()
    started["thread"] = thread
    return started


def test_rest_predict_is_retried_while_the_connection_is_refused():
    port = free_port()
    later = start_later(lambda: RestServer(port=port), 0.3)
    try:
        with RestClient(f"http://127.0.0.1:{port}", timeout=5, retry=FAST) as client:
            started = time.monotonic()
            client.predict(IMAGE)
            assert time.monotonic() - started >= 0.25
    finally:
        later["thread"].join()
        later["server"].stop()
    assert later["server"].behaviour.calls["predict"] == 1


def test_rest_retries_end_at_the_deadline(caplog):
    caplog.set_level(logging.DEBUG, logger="mnist_client.retry")
    # Attempts enough for over a minute of backoff: only the 0.5 s deadline can end these retries.
    endless = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2)
    with RestClient(f"http://127.0.0.1:{free_port()}", timeout=0.5, retry=endless) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            client.predict(IMAGE)
        elapsed = time.monotonic() - started
    retries = sum("retrying" in record.message for record in caplog.records)
    assert caught.value.request_sent is False
    assert 2 <= retries < endless.max_attempts - 1
    assert elapsed < 30  # a safety bound far below the policy's own minute: the deadline ended them


def test_rest_probes_are_retried_but_not_past_a_client_error():
    server = RestServer(Behaviour(fail_status=503, fail_probes=True, fail_times=2))
    try:
        with RestClient(server.url, retry=FAST) as client:
            assert client.metadata().matches_contract()
            assert server.behaviour.calls["metadata"] == 3
            server.behaviour.fail_status, server.behaviour.fail_times = 400, None
            with pytest.raises(ServerError):
                client.model_status()
            assert server.behaviour.calls["status"] == 1
    finally:
        server.stop()


def test_rest_predict_answered_503_is_not_retried():
    server = RestServer(Behaviour(fail_status=503, fail_times=1))
    try:
        with RestClient(server.url, retry=FAST) as client, pytest.raises(UnavailableError) as caught:
            client.predict(IMAGE)
    finally:
        server.stop()
    assert caught.value.request_sent is True and caught.value.status == 503
    assert server.behaviour.calls["predict"] == 1


def test_rest_predict_whose_connection_breaks_after_sending_is_not_retried():
    """The server reads the whole request, then drops the connection: it may have run, so no retry."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                received.append(connection.recv(65536))
                connection.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=2, retry=FAST) as client:
            with pytest.raises(UnavailableError, match="connection broken") as caught:
                client.predict(IMAGE, timeout=2)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert caught.value.request_sent is True
    assert len(received) == 1 and received[0].startswith(b"POST /v1/models/mnist:predict")


# -- gRPC ----------------------------------------------------------------------------------------------


def test_grpc_predict_is_retried_while_no_server_is_up():
    port = free_port()
    later = start_later(lambda: GrpcServer(port=port), 0.3)
    try:
        with GrpcClient(f"127.0.0.1:{port}", timeout=10, retry=FAST, channel_options=FAST_RECONNECT) as client:
            assert client.predict(IMAGE).model_version == 1
    finally:
        later["thread"].join()
        later["server"].stop()
    assert later["server"].behaviour.calls["predict"] == 1


def test_grpc_unavailable_from_a_server_is_not_retried_for_predict_but_is_for_probes():
    server = GrpcServer(Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE, fail_times=2, fail_probes=True))
    try:
        with GrpcClient(server.target, retry=FAST) as client:
            with pytest.raises(UnavailableError) as caught:
                client.predict(IMAGE)
            assert caught.value.request_sent is True
            assert server.behaviour.calls["predict"] == 1
            assert client.metadata().matches_contract()
            assert server.behaviour.calls["metadata"] == 3
    finally:
        server.stop()


def test_grpc_predict_cut_off_by_a_dying_server_is_not_retried():
    server = GrpcServer(Behaviour(stall_seconds=1.0))
    outcome: dict = {}

    def call() -> None:
        with GrpcClient(server.target, timeout=5, retry=FAST) as client:
            try:
                client.predict(IMAGE)
            except Exception as error:  # noqa: BLE001 - the test inspects whatever comes out
                outcome["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 60  # a safety bound: the call normally arrives within milliseconds
    while server.behaviour.calls["predict"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop(grace=0)
    thread.join(10)
    error = outcome["error"]
    assert isinstance(error, UnavailableError) and error.request_sent is True, repr(error)
    assert server.behaviour.calls["predict"] == 1


def test_grpc_ready_is_one_attempt_and_wait_until_ready_polls():
    server = GrpcServer(Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE, fail_times=2, fail_probes=True))
    try:
        with GrpcClient(server.target, retry=FAST) as client:
            assert client.ready() is False
            assert server.behaviour.calls["status"] == 1
            client.wait_until_ready(timeout=5, poll_interval=0.01)
            assert server.behaviour.calls["status"] == 3
    finally:
        server.stop()
