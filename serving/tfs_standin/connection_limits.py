"""What keeps slow, stalled or idle gRPC clients from starving the stand-in's other callers.

The stand-in runs grpcio's synchronous server: a unary call takes a pool thread as soon as its
headers arrive and holds it while the request message comes in. A client that opens streams and
then sends their messages slowly (or never) would hold every thread, and ordinary calls would
wait behind them. Three things bound that (docs/reliability.md lists them with their defaults):

- ``RequestReadDeadline``: a unary call whose request message has not fully arrived within
  ``--standin_request_read_timeout_seconds`` is cancelled, which frees its thread;
- extra pool threads (``--standin_slow_call_slots``) beyond the handler threads, so that calls
  still receiving their request cannot take the threads ordinary calls need; past the pool's size
  a new call is refused at once with RESOURCE_EXHAUSTED (never queued behind the slow ones);
- HTTP/2 connection limits (``CONNECTION_DEFAULTS``): streams per connection, keep-alive
  enforcement, idle and maximum connection age, handshake deadline, and connections at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)

DEFAULT_REQUEST_READ_TIMEOUT_S = 10.0
DEFAULT_SLOW_CALL_SLOTS = 256

# Server channel arguments, each overridable with --grpc_channel_arguments (key=value).
CONNECTION_DEFAULTS: dict[str, int] = {
    # Streams (calls) one HTTP/2 connection may have open at once (gRPC's default: unbounded).
    "grpc.max_concurrent_streams": 100,
    # Connections open at once; past it new ones are closed at accept (gRPC's default: unbounded).
    "grpc.max_allowed_incoming_connections": 1024,
    # A TCP connection must finish its TLS and HTTP/2 handshake within 10 s (gRPC's default: 120 s).
    "grpc.server_handshake_timeout_ms": 10_000,
    # Close connections without a call for 5 min, and any connection after 30 min (GOAWAY, so
    # clients reconnect cleanly); in-flight calls then get 30 s to finish (gRPC: never, never, -).
    "grpc.max_connection_idle_ms": 300_000,
    "grpc.max_connection_age_ms": 1_800_000,
    "grpc.max_connection_age_grace_ms": 30_000,
    # The server pings a connection quiet for 60 s and drops it if no answer comes within 20 s
    # (gRPC's default: every 2 h), so dead peers do not hold connections.
    "grpc.keepalive_time_ms": 60_000,
    "grpc.keepalive_timeout_ms": 20_000,
    # Keep-alive enforcement (gRPC's defaults, written out): a client may ping at most every 5 min
    # when no call is open, and never without a call; after 2 pings too many it gets GOAWAY.
    "grpc.http2.min_recv_ping_interval_without_data_ms": 300_000,
    "grpc.http2.max_ping_strikes": 2,
    "grpc.keepalive_permit_without_calls": 0,
}


class _Reaper:
    """One thread that cancels calls whose request did not arrive by their deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._pending: dict[int, Callable[[], Any]] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, cancel: Callable[[], Any]) -> int:
        with self._wake:
            ticket = next(self._ids)
            self._pending[ticket] = cancel
            heapq.heappush(self._heap, (deadline, ticket))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-read-deadline", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == ticket:
                self._wake.notify()
        return ticket

    def release(self, ticket: int) -> None:
        with self._wake:
            self._pending.pop(ticket, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][1] not in self._pending:
                    heapq.heappop(self._heap)  # answered in time
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, ticket = self._heap[0]
                now = time.monotonic()
                if now < deadline:
                    self._wake.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                cancel = self._pending.pop(ticket)
            cancel()


class RequestReadDeadline(grpc.ServerInterceptor):
    """Cancel a unary call whose request message has not arrived within ``timeout_s`` seconds.

    The unary handler is served as a client-streaming one (the same bytes on the wire) so that
    the request is read here, under the deadline, before the real handler runs.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._reaper = _Reaper()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming or self.timeout_s <= 0:
            return handler
        unary = handler.unary_unary
        method = handler_call_details.method

        def read_then_handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            ticket = self._reaper.watch(time.monotonic() + self.timeout_s, context.cancel)
            try:
                request = next(requests)
            except grpc.RpcError:
                # Cancelled by the deadline (or by the client): nobody is left to answer.
                log.info("%s: request not received within %.1f s; call cancelled", method, self.timeout_s)
                return None
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} expects one request message, got none")
            finally:
                self._reaper.release(ticket)
            return unary(request, context)

        return grpc.stream_unary_rpc_method_handler(
            read_then_handle, handler.request_deserializer, handler.response_serializer
        )
