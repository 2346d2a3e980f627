"""The gRPC call loop: pre-serialized PredictRequests sent as raw bytes on one channel.

Requests are serialized once by the client library (:meth:`mnist_client.grpc_client.GrpcClient.prepare`).
Closed loop: one thread per in-flight slot, each making blocking calls back to back; measured here
against a bare grpcio loop, this beat chaining futures from completion callbacks, which all run on the
channel's single polling thread. Open loop: the calling thread follows the pacer's schedule and sends
futures, so a slow answer never delays the next arrival. Answers are decoded and errors translated by
the client library, so kinds and codes are the ones applications see.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from mnist_client.errors import MnistClientError
from mnist_client.grpc_client import DEFAULT_MAX_MESSAGE_BYTES, PREDICT_METHOD, parse_prediction, translate_rpc_error
from mnist_client.loadtest.pacer import Pacer
from mnist_client.loadtest.records import RecordSink
from mnist_client.protos import predict_pb2

_WAKE_S = 0.05  # the calling thread wakes at least this often to flush records and check for a stop


def channel_options(load_balancing: str | None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ]
    if load_balancing:
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
    return options


class _WithMetadata:
    """A unary-unary callable that adds fixed metadata (the bearer token) to every call."""

    def __init__(self, callable_: grpc.UnaryUnaryMultiCallable, metadata: tuple[tuple[str, str], ...]) -> None:
        self._callable = callable_
        self._metadata = metadata

    def __call__(self, request: bytes, timeout: float | None = None) -> bytes:
        return self._callable(request, timeout=timeout, metadata=self._metadata)

    def future(self, request: bytes, timeout: float | None = None) -> grpc.Future:
        return self._callable.future(request, timeout=timeout, metadata=self._metadata)


class GrpcEngine:
    """Runs one phase of gRPC load: calls from a pacer, at most ``slots`` in flight, on one channel."""

    def __init__(
        self,
        target: str,
        requests: list[bytes],
        batch_sizes: list[int],
        timeout_s: float,
        load_balancing: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        authorization: str | None = None,
    ) -> None:
        """``credentials``: TLS (security.Security.grpc_credentials); ``authorization``: sent as metadata."""
        self._target = target
        options = channel_options(load_balancing)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        predict = self._channel.unary_unary(PREDICT_METHOD, request_serializer=None, response_deserializer=None)
        if authorization is not None:
            metadata = (("authorization", authorization),)
            predict = _WithMetadata(predict, metadata)
        self._predict = predict
        self._requests = requests
        self._batch_sizes = batch_sizes
        self._timeout_s = timeout_s
        self._what = f"Predict at {target}"
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)

    def close(self) -> None:
        self._channel.close()

    def run(
        self,
        pacer: Pacer,
        slots: int,
        first_payload: int,
        sink: RecordSink,
        *,
        record_lag: bool,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run until the pacer is done and every call finished; returns the last finish time (ns).

        ``record_lag`` marks an open loop (the pacer's schedule, lateness recorded); otherwise a closed one.
        """
        if record_lag:
            return self._run_open(pacer, slots, first_payload, sink, should_stop)
        return self._run_closed(pacer, slots, first_payload, sink, should_stop)

    def _run_closed(
        self, pacer: Pacer, slots: int, first_payload: int, sink: RecordSink, should_stop: Callable[[], bool]
    ) -> int:
        lock = self._lock
        predict = self._predict
        requests = self._requests
        n_payloads = len(requests)
        timeout_s = self._timeout_s
        monotonic_ns = time.monotonic_ns
        state = {"next_payload": first_payload % n_payloads, "last_end": monotonic_ns(), "stopping": False}

        def slot() -> None:
            while True:
                with lock:
                    if state["stopping"]:
                        return
                    intended = pacer.take(monotonic_ns())
                    if intended is None:
                        return
                    payload = state["next_payload"]
                    state["next_payload"] = payload + 1 if payload + 1 < n_payloads else 0
                try:
                    answer, error = predict(requests[payload], timeout=timeout_s), None
                except grpc.RpcError as exc:
                    answer, error = None, exc
                end = monotonic_ns()
                outcome = self._outcome(answer, error, payload)
                with lock:
                    if outcome[0] == "ok":
                        sink.ok(payload, (end - intended) // 1000, outcome[1])
                    else:
                        sink.error(*outcome[1])
                    if end > state["last_end"]:
                        state["last_end"] = end

        threads = [threading.Thread(target=slot, name=f"loadtest-slot-{i}", daemon=True) for i in range(slots)]
        for thread in threads:
            thread.start()
        while True:
            alive = [thread for thread in threads if thread.is_alive()]
            if not alive:
                break
            alive[0].join(_WAKE_S)
            now = monotonic_ns()
            if now >= sink.next_flush_ns:
                with lock:
                    sink.flush(now)
                    if not state["stopping"] and should_stop():
                        state["stopping"] = True
        for thread in threads:
            thread.join()
        with lock:
            sink.flush(monotonic_ns())
        return state["last_end"]

    def _run_open(
        self, pacer: Pacer, slots: int, first_payload: int, sink: RecordSink, should_stop: Callable[[], bool]
    ) -> int:
        lock = self._lock
        idle = self._idle
        predict_future = self._predict.future
        requests = self._requests
        n_payloads = len(requests)
        timeout_s = self._timeout_s
        state = {"in_flight": 0, "next_payload": first_payload % n_payloads, "last_end": time.monotonic_ns(),
                 "stopping": False}
        monotonic_ns = time.monotonic_ns

        def launch(intended: int, now: int) -> None:
            # Called with the (re-entrant) lock held: a call that completes before add_done_callback
            # runs its callback right here, in this thread.
            payload = state["next_payload"]
            state["next_payload"] = payload + 1 if payload + 1 < n_payloads else 0
            state["in_flight"] += 1
            sink.lag((now - intended) // 1000)
            try:
                future = predict_future(requests[payload], timeout=timeout_s)
                future.add_done_callback(lambda f, p=payload, t=intended: on_done(f, p, t))
            except Exception as exc:  # a closed channel raises ValueError at once
                state["in_flight"] -= 1
                sink.error("unavailable", "UNAVAILABLE", f"{self._what}: could not start the call ({exc})")

        def on_done(future: grpc.Future, payload: int, intended: int) -> None:
            now = monotonic_ns()
            try:
                error = future.exception()
                answer = future.result() if error is None else None
            except grpc.FutureCancelledError:  # the channel was closed under it
                answer, error = None, grpc.FutureCancelledError()
            outcome = self._outcome(answer, error, payload)
            with lock:
                if outcome[0] == "ok":
                    sink.ok(payload, (now - intended) // 1000, outcome[1])
                else:
                    sink.error(*outcome[1])
                state["in_flight"] -= 1
                state["last_end"] = max(state["last_end"], now)
                idle.notify()

        with lock:
            while True:
                now = monotonic_ns()
                if not state["stopping"]:
                    while state["in_flight"] < slots:
                        intended = pacer.take(now)
                        if intended is None:
                            break
                        launch(intended, now)
                if now >= sink.next_flush_ns:
                    sink.flush(now)
                    if should_stop():
                        state["stopping"] = True
                if state["in_flight"] == 0 and (state["stopping"] or pacer.next_due_ns(now) is None):
                    break
                wait_s = _WAKE_S
                if state["in_flight"] < slots:
                    next_due = pacer.next_due_ns(now)
                    if next_due is not None:
                        wait_s = min(wait_s, max(0.0, (next_due - now) / 1e9))
                if wait_s > 0:
                    idle.wait(wait_s)
            sink.flush(monotonic_ns())
            return state["last_end"]

    def _outcome(self, answer: bytes | None, error: BaseException | None, payload: int) -> tuple[str, object]:
        """("ok", class bytes) or ("error", (kind, code, message)) for a finished call."""
        if error is None:
            try:
                response = predict_pb2.PredictResponse.FromString(answer)
                prediction = parse_prediction(response, self._batch_sizes[payload])
            except MnistClientError as exc:
                return "error", (exc.kind, exc.code, str(exc))
            except Exception as exc:  # undecodable bytes: protobuf's DecodeError
                return "error", ("protocol", "DATA_LOSS", f"{self._what}: undecodable answer ({exc})")
            return "ok", prediction.classes.astype(np.uint8).tobytes()
        if isinstance(error, grpc.FutureCancelledError):
            return "error", ("unavailable", "CANCELLED", f"{self._what}: call cancelled (channel closed)")
        if isinstance(error, grpc.RpcError):
            translated = translate_rpc_error(error, self._what, self._timeout_s)
        else:
            translated = MnistClientError(f"{self._what}: {type(error).__name__}: {error}")
        return "error", (translated.kind, translated.code, str(translated))
