"""Worker processes: they only make calls and emit result records.

One Python process cannot generate enough load to find a server's limit on its own (the GIL
serialises its request handling), so the load is spread over several processes, each running one
event loop (:mod:`~mnist_client.loadtest.rest_worker`, :mod:`~mnist_client.loadtest.grpc_worker`).
The parent talks to each over a pipe:

- ``("target", name, spec)``: encoded requests for a target, sent once and kept;
- ``("warmup", name, slots, count, first_payload)``: send ``count`` unmeasured calls, answer
  ``("warm", worker, ok, errors)``;
- ``("measure", name, plan)``: wait for the common start time, run the plan, stream ``("records", batch)``
  and finish with ``("done", worker, last_end_ns, cpu_seconds)``; an ``("abort",)`` meanwhile stops it early;
- ``("exit",)``.

Workers are fresh interpreters running :func:`main` joined to the parent by
a socket pair: the parent may hold gRPC channels, which do not survive ``fork``, and unlike
multiprocessing's ``spawn`` this never re-imports the caller's main module, so ``run()`` works from any
script without a ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from mnist_client.loadtest.errors import LoadTestError
from mnist_client.loadtest.pacer import ClosedLoop, OpenLoop
from mnist_client.loadtest.records import RecordBatch, RecordSink
from mnist_client.loadtest.security import Security

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0  # a spawned worker must report ready within this


@dataclass(frozen=True)
class TargetSpec:
    """What a worker needs to call one target."""

    protocol: str
    host: str
    port: int
    grpc_target: str
    what: str  # for error messages: "POST http://..." or "Predict at host:port"
    requests: list[bytes]  # full HTTP requests (REST) or serialized PredictRequests (gRPC)
    batch_sizes: list[int]
    timeout_s: float
    load_balancing: str | None = None
    tls: bool = False  # https / grpcs:// (the TLS files and the token travel in ``security``)
    security: Security = field(default_factory=Security)


@dataclass(frozen=True)
class Plan:
    """One worker's part of a measured phase."""

    mode: str  # "closed" or "open"
    slots: int  # most requests in flight in this worker
    start_ns: int  # common start time (time.monotonic_ns) of every worker
    first_payload: int
    requests: int | None = None  # closed loop with a request count: this worker's share
    duration_s: float | None = None  # closed loop with a duration
    rate: float = 0.0  # open loop: the rate of all workers together
    total: int = 0  # open loop: arrivals of all workers together
    worker: int = 0
    workers: int = 1


class _Worker:
    """The worker process's side: engines per target, and the command loop."""

    def __init__(self, conn: multiprocessing.connection.Connection, index: int) -> None:
        self._conn = conn
        self._index = index
        self._targets: dict[str, TargetSpec] = {}
        self._engines: dict[str, Any] = {}
        self._abort = False

    def serve(self) -> None:
        self._conn.send(("ready", self._index))
        while True:
            message = self._conn.recv()
            command = message[0]
            try:
                if command == "exit":
                    break
                if command == "target":
                    self._set_target(message[1], message[2])
                elif command == "warmup":
                    self._warmup(*message[1:])
                elif command == "measure":
                    self._measure(message[1], message[2])
                elif command == "abort":
                    continue  # arrived after the phase ended: nothing to stop
                else:
                    raise LoadTestError(f"unknown worker command {command!r}")
            except Exception:  # report to the parent rather than die silently
                self._conn.send(("failed", self._index, traceback.format_exc()))
        for engine in self._engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()

    def _set_target(self, name: str, spec: TargetSpec) -> None:
        old = self._engines.pop(name, None)
        if old is not None and hasattr(old, "close"):
            old.close()
        self._targets[name] = spec

    def _engine(self, name: str) -> Any:
        spec = self._targets[name]
        engine = self._engines.get(name)
        if engine is None:
            if spec.protocol == "rest":
                from mnist_client.loadtest.rest_worker import HttpEngine

                engine = HttpEngine(spec.host, spec.port, spec.requests, spec.batch_sizes, spec.timeout_s, spec.what,
                                    ssl_context=spec.security.ssl_context() if spec.tls else None)
            else:
                from mnist_client.loadtest.grpc_worker import GrpcEngine

                engine = GrpcEngine(
                    spec.grpc_target, spec.requests, spec.batch_sizes, spec.timeout_s, spec.load_balancing,
                    credentials=spec.security.grpc_credentials() if spec.tls else None,
                    authorization=spec.security.authorization(),
                )
            self._engines[name] = engine
        return engine

    def _should_stop(self) -> bool:
        while not self._abort and self._conn.poll():
            if self._conn.recv()[0] == "abort":
                self._abort = True
        return self._abort

    def _warmup(self, name: str, slots: int, count: int, first_payload: int) -> None:
        collected = RecordBatch(self._index)

        def keep(batch: RecordBatch) -> None:
            collected.ok_payloads.extend(batch.ok_payloads)
            collected.errors.extend(batch.errors)

        sink = RecordSink(self._index, keep)
        sink.next_flush_ns = time.monotonic_ns() + 10**12  # nothing streams during warm-up
        if count > 0:
            engine = self._engine(name)
            engine.run(ClosedLoop(requests=count), max(1, min(slots, count)), first_payload, sink, record_lag=False)
        self._conn.send(("warm", self._index, len(collected.ok_payloads), len(collected.errors)))

    def _measure(self, name: str, plan: Plan) -> None:
        self._abort = False
        sink = RecordSink(self._index, lambda batch: self._conn.send(("records", batch)))
        engine = self._engine(name)
        if plan.mode == "closed":
            pacer: Any = ClosedLoop(
                requests=plan.requests,
                end_ns=None if plan.duration_s is None else plan.start_ns + int(plan.duration_s * 1e9),
            )
        else:
            pacer = OpenLoop(rate=plan.rate, start_ns=plan.start_ns, total=plan.total,
                             worker=plan.worker, workers=plan.workers)
        delay = (plan.start_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        sink.next_flush_ns = time.monotonic_ns()
        cpu_start = time.process_time()  # all threads of this process (gRPC's included)
        last_end = engine.run(pacer, plan.slots, plan.first_payload, sink, record_lag=plan.mode == "open",
                              should_stop=self._should_stop)
        self._conn.send(("done", self._index, last_end, time.process_time() - cpu_start))


def worker_main(conn: multiprocessing.connection.Connection, index: int) -> None:
    """Serve commands from the parent until it says exit or goes away."""
    try:
        _Worker(conn, index).serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent went away: nothing left to report to
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process (``--fd FD --index I``), started by :class:`WorkerPool` only."""
    parser = argparse.ArgumentParser(description="mnist-loadtest worker process (started by the load tester)")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the parent")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (Ctrl-C reaches it too)
    _raise_open_file_limit()
    worker_main(multiprocessing.connection.Connection(args.fd), args.index)


def _raise_open_file_limit() -> None:
    """One socket per in-flight request: lift the soft open-files limit to the hard one where allowed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
        if wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError) as exc:  # pragma: no cover - platform dependent
        log.debug("open-files limit left as is: %s", exc)


class WorkerPool:
    """The parent's handle on the worker processes, kept for a whole run (they start once)."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen] = []
        self._conns: list[multiprocessing.connection.Connection] = []

    def __len__(self) -> int:
        return len(self._processes)

    def ensure(self, count: int) -> None:
        """Start workers until there are ``count``; wait until each has reported ready."""
        started = []
        while len(self._processes) < count:
            index = len(self._processes)
            parent_sock, child_sock = socket.socketpair()
            try:
                process = subprocess.Popen(
                    [sys.executable, "-c", "from mnist_client.loadtest.workers import main; main()",
                     "--fd", str(child_sock.fileno()), "--index", str(index)],
                    pass_fds=(child_sock.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                )
            finally:
                child_sock.close()
            self._processes.append(process)
            self._conns.append(multiprocessing.connection.Connection(parent_sock.detach()))
            started.append(index)
        deadline = time.monotonic() + _START_TIMEOUT_S
        for index in started:
            conn = self._conns[index]
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise LoadTestError(f"worker process {index} did not start within {_START_TIMEOUT_S:g} s")
                message = conn.recv()
            except EOFError:
                code = self._processes[index].wait(timeout=5.0)
                raise LoadTestError(f"worker process {index} exited at start (exit code {code}); see its stderr") from None
            if message[0] != "ready":
                raise LoadTestError(f"worker process {index} sent {message[0]!r} instead of 'ready'")

    def send(self, index: int, message: tuple) -> None:
        self._conns[index].send(message)

    def broadcast(self, count: int, message: tuple) -> None:
        for index in range(count):
            self._conns[index].send(message)

    def receive(self, indices: list[int], timeout_s: float) -> list[tuple]:
        """Messages ready from the given workers within ``timeout_s``; raises if a worker died."""
        ready = multiprocessing.connection.wait([self._conns[i] for i in indices], timeout_s)
        messages = []
        for conn in ready:
            index = self._conns.index(conn)  # type: ignore[arg-type]
            try:
                while conn.poll():
                    messages.append(conn.recv())
            except EOFError:
                code = self._processes[index].poll()
                raise LoadTestError(f"worker process {index} exited unexpectedly (exit code {code})") from None
        return messages

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("exit",))
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.warning("worker process %s did not exit; terminating it", process.pid)
                process.terminate()
                process.wait(timeout=5.0)
        for conn in self._conns:
            conn.close()
        self._processes.clear()
        self._conns.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

