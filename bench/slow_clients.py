"""Ordinary requests' latency while slow, stalled and idle clients hold connections to the servers.

    python -m bench.slow_clients --rest http://127.0.0.1:8080 --grpc 127.0.0.1:8500 \
        --tfs-rest http://127.0.0.1:8501                                                  # (make serve)

For each server it alternates rounds without and with the slow clients (A B A B ...), timing
ordinary requests (REST: GET /healthz and one-image predict; gRPC: health Check and one-image
Predict) from one client, and reports p50/p99 per round, the medians over rounds, and every
failure. The slow clients (64+ by default, all from one thread):

- REST: connections that trickle a request head one byte per interval and never finish it;
  ones that send a complete head and trickle the body; idle keep-alive connections
- gRPC: idle HTTP/2 connections; calls whose request message never comes (slow body); TCP
  connections that trickle the HTTP/2 preface

A connection the server closes is opened again at once, so the pressure stays constant; the
report counts those. The tests (tests/test_slow_clients.py) use the same classes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import select
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import requests

from bench.results import write_result
from mnist_client import contract
from mnist_client.grpc_client import GrpcClient
from mnist_client.retry import RetryPolicy

log = logging.getLogger(__name__)

PREDICT_PATH = f"/v1/models/{contract.MODEL_NAME}:predict"
GRPC_PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_INTERVAL_S = 0.5


# --- slow connections ---------------------------------------------------------------------------


@dataclass
class Trickle:
    """One TCP connection: ``prefix`` at once, then ``slow`` one byte per tick, then idle.

    Whatever the server sends is read and dropped; when it closes the connection, ``reopen``.
    """

    prefix: bytes
    slow: bytes
    sock: socket.socket | None = None
    sent: int = 0

    def open(self, address: tuple[str, int]) -> None:
        sock = socket.create_connection(address, timeout=5.0)
        sock.setblocking(False)
        if self.prefix:
            _send_all(sock, self.prefix)
        self.sock, self.sent = sock, 0

    def tick(self) -> bool:
        """Send the next slow byte; False once the server has closed the connection."""
        assert self.sock is not None
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return False
        except BlockingIOError:
            pass
        except OSError:
            return False
        if self.sent < len(self.slow):
            try:
                self.sent += self.sock.send(self.slow[self.sent : self.sent + 1])
            except BlockingIOError:
                pass
            except OSError:
                return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + 5.0
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [sock], [], remaining)[1]:
                raise TimeoutError("the server took no bytes for 5 s") from None


def http_slow_connections(host: str, slow_headers: int, slow_bodies: int, idle: int) -> list[Trickle]:
    """The three kinds of slow HTTP client, ``slow_headers + slow_bodies + idle`` connections."""
    head = f"POST {PREDICT_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    body_length = 100_000
    never_ending_header = b"X-Slow: " + b"a" * 4000
    connections = [Trickle(head.encode(), never_ending_header) for _ in range(slow_headers)]
    full_head = (head + f"Content-Length: {body_length}\r\n\r\n").encode()
    connections += [Trickle(full_head, b'{"instances": [' + b" " * (body_length - 16)) for _ in range(slow_bodies)]
    keepalive = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    connections += [Trickle(keepalive, b"") for _ in range(idle)]
    return connections


def http2_slow_prefaces(count: int) -> list[Trickle]:
    return [Trickle(b"", HTTP2_PREFACE) for _ in range(count)]


@dataclass
class SlowStats:
    opened: int = 0
    reopened: int = 0  # the server closed (or cancelled) it, and the slow client came back
    refused: int = 0  # the server would not accept a new connection or call


class TrickleDriver:
    """Drives Trickle connections from one thread: open all, then a tick every ``interval_s``."""

    def __init__(self, address: tuple[str, int], connections: list[Trickle], interval_s: float = DEFAULT_INTERVAL_S):
        self.address = address
        self.connections = connections
        self.interval_s = interval_s
        self.stats = SlowStats()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)
        self._error: BaseException | None = None

    def _open(self, connection: Trickle) -> None:
        try:
            connection.open(self.address)
            self.stats.opened += 1
        except OSError:
            self.stats.refused += 1

    def _run(self) -> None:
        try:
            for connection in self.connections:
                self._open(connection)
            self.ready.set()
            while not self._stop.wait(self.interval_s):  # the trickle's own pace, not a synchronisation
                for connection in self.connections:
                    if connection.sock is None or not connection.tick():
                        connection.close()
                        self.stats.reopened += 1
                        self._open(connection)
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__/__exit__
            self._error = exc
            self.ready.set()
        finally:
            for connection in self.connections:
                connection.close()

    def __enter__(self) -> TrickleDriver:
        self._thread.start()
        if not self.ready.wait(60) or self._error is not None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"slow clients could not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class SlowGrpcStreams:
    """Idle HTTP/2 connections, and calls whose request message never arrives, each on its own connection.

    A call the server cancels (its read deadline) is made again at once; one it refuses is counted.
    """

    def __init__(self, target: str, idle: int, slow_calls: int) -> None:
        self.target = target
        self.stats = SlowStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._channels: list[grpc.Channel] = []
        self._idle, self._slow_calls = idle, slow_calls
        self.calls_started = 0

    def _channel(self) -> grpc.Channel:
        # Own subchannel pool: a new TCP connection per channel, not one shared by all.
        channel = grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self._channels.append(channel)
        return channel

    def _never(self) -> Iterator[bytes]:
        self._stop.wait()
        return
        yield b""  # a generator that sends nothing until the block ends

    def _start_call(self, channel: grpc.Channel) -> None:
        call = channel.stream_unary(GRPC_PREDICT_METHOD)
        future = call.future(self._never())
        with self._lock:
            self.calls_started += 1
        future.add_done_callback(lambda done: self._again(channel, done))

    def _again(self, channel: grpc.Channel, done: grpc.Future) -> None:
        if self._stop.is_set():
            return
        code = done.code() if done.exception() is not None else None
        with self._lock:
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.stats.refused += 1  # refused at once, it holds nothing: not tried again
                return
            self.stats.reopened += 1
        threading.Thread(target=self._start_call, args=(channel,), daemon=True).start()

    def __enter__(self) -> SlowGrpcStreams:
        for _ in range(self._idle):
            grpc.channel_ready_future(self._channel()).result(timeout=30)
            self.stats.opened += 1
        for _ in range(self._slow_calls):
            channel = self._channel()
            grpc.channel_ready_future(channel).result(timeout=30)
            self._start_call(channel)
            self.stats.opened += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for channel in self._channels:
            channel.close()


# --- ordinary requests ---------------------------------------------------------------------------


@dataclass
class Timings:
    """Latencies (ms) of ordinary calls and what went wrong with the others."""

    name: str
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"calls": len(self.latencies_ms) + len(self.failures), "failures": self.failures[:10],
                "failed": len(self.failures), "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "max_ms": max(self.latencies_ms, default=float("nan"))}


def time_calls(name: str, call: Callable[[], None], count: int) -> Timings:
    """Run ``call`` ``count`` times in a row; a call that raises is a failure, with its reason."""
    timings = Timings(name)
    for _ in range(count):
        started = time.perf_counter()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
            timings.failures.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        timings.latencies_ms.append((time.perf_counter() - started) * 1000)
    return timings


def one_image() -> np.ndarray:
    """A fixed 28x28 image (a bright square): the server's answer is not what is measured."""
    image = np.zeros((1, contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH), dtype=np.float32)
    image[0, 8:20, 8:20] = 1.0
    return image


HEALTH_PATHS = {"pytorch": "/healthz", "tfserving": f"/v1/models/{contract.MODEL_NAME}"}


class RestCalls:
    """GET ``health_path`` and one-image predict on one keep-alive session, no retries, ``timeout_s`` each.

    ``health_path``: /healthz on the PyTorch server; TF Serving's REST API (and the stand-in's) has
    none, so there the model status, GET /v1/models/mnist, stands for it.
    """

    def __init__(self, url: str, timeout_s: float = 3.0, verify: bool | str = True,
                 health_path: str = HEALTH_PATHS["pytorch"]) -> None:
        self.url = url.rstrip("/")
        self.health_path = health_path
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy in the environment must not answer for 127.0.0.1
        self.session.verify = verify
        self.body = {"instances": one_image().tolist()}

    def healthz(self) -> None:
        answer = self.session.get(f"{self.url}{self.health_path}", timeout=self.timeout_s)
        answer.raise_for_status()

    def predict(self) -> None:
        answer = self.session.post(f"{self.url}{PREDICT_PATH}", json=self.body, timeout=self.timeout_s)
        answer.raise_for_status()
        if len(answer.json()["predictions"]) != 1:
            raise ValueError(f"expected one prediction, got {answer.text[:200]}")

    def close(self) -> None:
        self.session.close()


class GrpcCalls:
    """grpc.health.v1 Check and one-image Predict on one channel, no retries, ``timeout_s`` each."""

    def __init__(self, target: str, timeout_s: float = 3.0) -> None:
        self.client = GrpcClient(target, timeout=timeout_s, readiness="health", retry=RetryPolicy(max_attempts=1))
        self.image = one_image()

    def health(self) -> None:
        if not self.client.ready():
            raise RuntimeError("health check did not answer SERVING")

    def predict(self) -> None:
        if len(self.client.predict(self.image).classes) != 1:
            raise ValueError("expected one class")

    def close(self) -> None:
        self.client.close()


def rest_round(url: str, calls: int, health_path: str = HEALTH_PATHS["pytorch"]) -> list[Timings]:
    client = RestCalls(url, health_path=health_path)
    try:
        return [time_calls("rest healthz", client.healthz, calls), time_calls("rest predict", client.predict, calls)]
    finally:
        client.close()


def grpc_round(target: str, calls: int) -> list[Timings]:
    client = GrpcCalls(target)
    try:
        return [time_calls("grpc health", client.health, calls), time_calls("grpc predict", client.predict, calls)]
    finally:
        client.close()


def address_of(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def slow_rest_clients(url: str, per_kind: int) -> Iterator[TrickleDriver]:
    host, port = address_of(url)
    with TrickleDriver((host, port), http_slow_connections(host, per_kind, per_kind, per_kind)) as driver:
        yield driver


@contextlib.contextmanager
def slow_grpc_clients(target: str, per_kind: int) -> Iterator[tuple[SlowGrpcStreams, TrickleDriver]]:
    host, port = address_of(target)
    with SlowGrpcStreams(target, idle=per_kind, slow_calls=per_kind) as streams, \
            TrickleDriver((host, port), http2_slow_prefaces(per_kind)) as prefaces:  # fmt: skip
        yield streams, prefaces


# --- the verdict (tests and the compose test) ---------------------------------------------------

ALLOWED_P99_RISE_MS = 100.0


def pool_rounds(rounds: list[list[Timings]]) -> dict[str, Timings]:
    """Every round's timings of one call kind put together, by name."""
    pooled: dict[str, Timings] = {}
    for timings in rounds:
        for timing in timings:
            into = pooled.setdefault(timing.name, Timings(timing.name))
            into.latencies_ms += timing.latencies_ms
            into.failures += timing.failures
    return pooled


def harm(without: dict[str, Timings], with_slow: dict[str, Timings],
         allowed_rise_ms: float = ALLOWED_P99_RISE_MS) -> list[str]:
    """What the slow clients did to ordinary calls: failures, or a p99 more than ``allowed_rise_ms`` higher."""
    problems = []
    for name, base in without.items():
        loaded = with_slow[name]
        if base.failures:
            problems.append(f"{name} failed without slow clients: {base.failures[:3]}")
        if loaded.failures:
            problems.append(f"{name} failed while slow clients held connections: {loaded.failures[:3]}")
        if loaded.percentile(99) > base.percentile(99) + allowed_rise_ms:
            problems.append(f"{name}: p99 {loaded.percentile(99):.1f} ms with slow clients, "
                            f"{base.percentile(99):.1f} ms without (allowed: +{allowed_rise_ms:.0f} ms)")
    return problems


def check_server(measure: Callable[[], list[Timings]], attack: Callable[[], Any], rounds: int = 2) -> list[str]:
    """Interleaved rounds without and with the slow clients; the problems found (none: unharmed)."""
    measure()  # warm: first calls pay connection set-up and model warm-up
    without, with_slow = [], []
    for _ in range(rounds):
        without.append(measure())
        with attack():
            with_slow.append(measure())
    return harm(pool_rounds(without), pool_rounds(with_slow))


# --- the bench -----------------------------------------------------------------------------------


def run(rest_url: str | None, grpc_target: str | None, rounds: int, calls: int, per_kind: int,
        tfs_rest_url: str | None = None) -> dict[str, Any]:
    """Interleaved rounds (without, with) per server; medians of the per-round p50/p99."""
    servers: list[tuple[str, Callable[[], list[Timings]], Callable[[], Any]]] = []
    if rest_url:
        servers.append((f"pytorch-rest {rest_url}", lambda: rest_round(rest_url, calls),
                        lambda: slow_rest_clients(rest_url, per_kind)))
    if tfs_rest_url:
        servers.append((f"tfs-rest {tfs_rest_url}", lambda: rest_round(tfs_rest_url, calls, HEALTH_PATHS["tfserving"]),
                        lambda: slow_rest_clients(tfs_rest_url, per_kind)))
    if grpc_target:
        servers.append((f"grpc {grpc_target}", lambda: grpc_round(grpc_target, calls),
                        lambda: slow_grpc_clients(grpc_target, per_kind)))
    result: dict[str, Any] = {"rounds": rounds, "calls_per_kind": calls, "slow_clients_per_kind": per_kind,
                              "servers": {}}
    for name, measure, attack in servers:
        rows: dict[str, dict[str, list[Any]]] = {}
        slow_stats: list[dict[str, int]] = []
        for _ in range(rounds):
            for condition in ("without", "with"):
                if condition == "without":
                    timings = measure()
                else:
                    with attack() as held:
                        timings = measure()
                        drivers = held if isinstance(held, tuple) else (held,)
                        slow_stats.append({k: sum(getattr(d.stats, k) for d in drivers)
                                           for k in ("opened", "reopened", "refused")})
                for timing in timings:
                    row = rows.setdefault(timing.name, {"without": [], "with": []})
                    row[condition].append(timing.summary())
        result["servers"][name] = {"calls": {
            call: {condition: {"p50_ms_median": statistics.median(r["p50_ms"] for r in runs),
                               "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
                               "p99_ms_spread": [min(r["p99_ms"] for r in runs), max(r["p99_ms"] for r in runs)],
                               "failed": sum(r["failed"] for r in runs), "rounds": runs}
                   for condition, runs in row.items()}
            for call, row in rows.items()}, "slow_clients": slow_stats}
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"ordinary calls without / with {3 * result['slow_clients_per_kind']} slow clients "
             f"({result['rounds']} interleaved rounds of {result['calls_per_kind']} calls; medians of the rounds)",
             f"{'server':32} {'call':14} {'p50 ms':>17} {'p99 ms':>17} {'failed':>9}"]
    for server, entry in result["servers"].items():
        for call, row in entry["calls"].items():
            a, b = row["without"], row["with"]
            lines.append(f"{server:32} {call:14} {a['p50_ms_median']:8.2f}/{b['p50_ms_median']:<8.2f} "
                         f"{a['p99_ms_median']:8.2f}/{b['p99_ms_median']:<8.2f} {a['failed']:>4}/{b['failed']:<4}")
        lines.append(f"{'':32} slow clients per round: {entry['slow_clients']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rest", help="the PyTorch REST server's URL (http://host:port), or leave out")
    parser.add_argument("--grpc", help="a gRPC server's host:port (the stand-in, or TF Serving), or leave out")
    parser.add_argument("--tfs-rest", help="a TF Serving REST API's URL (the stand-in's, or TF Serving's), or leave out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds without/with (default 3)")
    parser.add_argument("--calls", type=int, default=200, help="ordinary calls of each kind per round (200)")
    parser.add_argument("--per-kind", type=int, default=32,
                        help="slow clients of each of the three kinds (default 32: 96 in all)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if not args.rest and not args.grpc and not args.tfs_rest:
        build_parser().error("give --rest, --grpc, --tfs-rest or several")
    for name in ("rounds", "calls", "per_kind"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be at least 1")
    result = run(args.rest, args.grpc, args.rounds, args.calls, args.per_kind, args.tfs_rest)
    write_result(args.output_dir, "slow_clients", result, format_table(result))
    return result


if __name__ == "__main__":
    main()
