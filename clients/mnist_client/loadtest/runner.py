"""``run(config) -> Report``: the library entry point that the CLI is a thin layer over.

For each sweep point, each round (``repeats``), each target in turn (so that targets never compete for
the machine, and a disturbance of the machine falls on every target alike): warm-up calls on every
worker (not counted), a common start time, the measured phase, its records into the reporter, and
who used the CPU meanwhile (the server, the load tester, anything else; see ``cpu_usage``). Before anything else, every target must
answer one real prediction through the client library, so that a wrong address or a server that is
down fails in a second with a clear message instead of filling a report with errors.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mnist_client.errors import MnistClientError
from mnist_client.loadtest import cpu_usage
from mnist_client.loadtest.config import LoadTestConfig, Target
from mnist_client.loadtest.errors import LoadTestError, TargetUnreachableError
from mnist_client.loadtest.pacer import arrivals_in, share
from mnist_client.loadtest.payload import Payload, TestSet, build_payload, load_test_set
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.reporter import Reporter
from mnist_client.loadtest.rest_worker import build_request
from mnist_client.loadtest.stats import GENERATOR_BUSY_WARNING, Measurement
from mnist_client.loadtest.workers import Plan, TargetSpec, WorkerPool

log = logging.getLogger(__name__)

_START_DELAY_S = 0.05  # between telling workers the start time and that time
_GRACE_S = 30.0  # a phase running this much past its expected end (plus the timeout) is stuck


@dataclass(frozen=True)
class Progress:
    """Where a run stands, passed to the ``progress`` callback about ten times a second."""

    target: str
    mode: str
    point: float
    phase: int  # 1-based index of this (target, point) among all phases
    phases: int
    completed: int  # requests finished in this phase
    errors: int
    elapsed_s: float
    total_requests: int | None  # when the phase is a request count
    duration_s: float | None  # when the phase is a duration
    finished: bool = False


ProgressCallback = Callable[[Progress], None]


def run(
    config: LoadTestConfig,
    *,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
    server_pids: Mapping[str, int | Sequence[int]] | None = None,
) -> Report:
    """Load every target of ``config`` at every sweep point and return the report.

    ``progress`` is called from this thread while phases run. Setting ``stop`` ends the current phase
    early (in-flight requests finish) and skips the rest; the report then holds what was measured.
    ``server_pids`` maps target names to the process id (or ids: a proxy and its server) of the server
    behind them, descendants included, so each round can tell the server's CPU from everything else's.
    Raises :class:`~mnist_client.loadtest.errors.LoadTestError` subclasses for unusable settings, data
    or targets.
    """
    test_set = load_test_set(config.data_dir, limit=config.distinct_images)
    payloads = {target.name: build_payload(target, config, test_set) for target in config.targets}
    for target in config.targets:
        preflight(target, config, test_set)

    reporter = Reporter(test_set.labels)
    phases = [(point, target) for point in config.points for _ in range(config.repeats) for target in config.targets]
    workers_needed = max(config.worker_processes(point) for point in config.points)
    offsets = {target.name: 0 for target in config.targets}
    with WorkerPool() as pool:
        pool.ensure(workers_needed)
        for target in config.targets:
            pool.broadcast(workers_needed, ("target", target.name, _target_spec(target, payloads[target.name], config)))
        for number, (point, target) in enumerate(phases, start=1):
            if stop is not None and stop.is_set():
                break
            measurement = reporter.begin(
                Measurement(
                    target=target.name,
                    protocol=target.protocol,
                    address=target.address,
                    mode=config.mode,
                    point=float(point),
                    images_per_request=config.images_per_request,
                ),
                payloads[target.name].image_indices,
            )
            cpu = _run_phase(pool, config, target, point, len(payloads[target.name]), offsets[target.name],
                             reporter, measurement, progress, stop, number, len(phases), server_pids or {})
            reporter.end(cpu)
            # The next sweep point carries on through the images where this one's measured requests stopped.
            offsets[target.name] += measurement.requests
    return reporter.report(config.to_dict())


def preflight(target: Target, config: LoadTestConfig, test_set: TestSet) -> None:
    """One real prediction through the client library; :class:`TargetUnreachableError` if it fails."""
    images = test_set.images[: config.images_per_request]
    timeout = min(config.timeout_s, 30.0)
    try:
        if target.protocol == "rest":
            from mnist_client.rest import RestClient

            security = config.security if target.tls else None
            with RestClient(target.address, model_version=config.model_version, timeout=timeout,
                            binary=config.rest_format == "npy", token=config.security.token,
                            ca_file=security and security.ca_file, insecure=bool(security and security.insecure),
                            client_cert=security and security.client_cert,
                            client_key=security and security.client_key) as client:
                client.predict(images)
        else:
            from mnist_client.grpc_client import GrpcClient

            tls = config.security if target.tls else None
            with GrpcClient(target.grpc_target, model_version=config.model_version, timeout=timeout,
                            tls=tls is not None, root_certificates=tls and tls.ca_file,
                            client_certificate_chain=tls and tls.client_cert,
                            client_private_key=tls and tls.client_key) as client:
                client.predict(images)
    except MnistClientError as exc:
        hint = (
            "is the server running and listening there?"
            if exc.kind in ("unavailable", "deadline_exceeded")
            else "does it serve this model and version?"
        )
        raise TargetUnreachableError(
            f"target {target.name!r} ({target.protocol} {target.address}) failed its first prediction "
            f"[{exc.kind}]: {exc}; {hint}"
        ) from None


def _target_spec(target: Target, payload: Payload, config: LoadTestConfig) -> TargetSpec:
    batch_sizes = [len(images) for images in payload.image_indices]
    if target.protocol == "rest":
        requests = [
            build_request(target.host, target.port, payload.path, payload.content_type, body,
                          config.security.authorization())
            for body in payload.bodies
        ]
        what = f"POST {'https' if target.tls else 'http'}://{target.host}:{target.port}{payload.path}"
    else:
        requests = list(payload.bodies)
        what = f"Predict at {target.grpc_target}"
    load_balancing = "round_robin" if target.protocol == "grpc" and target.address.startswith("dns:///") else None
    return TargetSpec(
        protocol=target.protocol,
        host=target.host,
        port=target.port,
        grpc_target=target.grpc_target if target.protocol == "grpc" else "",
        what=what,
        requests=requests,
        batch_sizes=batch_sizes,
        timeout_s=config.timeout_s,
        load_balancing=load_balancing,
        tls=target.tls,
        security=config.security,
    )


def _run_phase(
    pool: WorkerPool,
    config: LoadTestConfig,
    target: Target,
    point: float,
    n_payloads: int,
    payload_offset: int,
    reporter: Reporter,
    measurement: Measurement,
    progress: ProgressCallback | None,
    stop: threading.Event | None,
    number: int,
    phases: int,
    server_pids: Mapping[str, int | Sequence[int]],
) -> dict[str, float | int | None]:
    """Warm up, then measure one round; returns who used the CPU during the measured part."""
    workers = config.worker_processes(point)
    indices = list(range(workers))
    in_flight = config.in_flight(point)
    slots = [max(1, share(in_flight, workers, i)) for i in indices]
    first_payloads = [(payload_offset + i * n_payloads // workers) % n_payloads for i in indices]

    _warm_up(pool, config, target, slots, first_payloads, measurement)

    # Measured phase: every worker starts at the same instant.
    start_ns = time.monotonic_ns() + int(_START_DELAY_S * 1e9)
    start_wall = time.time() + (start_ns - time.monotonic_ns()) / 1e9
    open_total = 0
    if config.mode == "open":
        open_total = config.requests if config.requests is not None else arrivals_in(point, config.duration_s)
        measurement.scheduled = open_total
    cpu_before = cpu_usage.snapshot(server_pids)
    for i in indices:
        plan = Plan(
            mode=config.mode,
            slots=slots[i],
            start_ns=start_ns,
            first_payload=first_payloads[i],
            requests=share(config.requests, workers, i) if config.mode == "closed" and config.requests else None,
            duration_s=config.duration_s if config.mode == "closed" else None,
            rate=float(point),
            total=open_total,
            worker=i,
            workers=workers,
        )
        pool.send(i, ("measure", target.name, plan))

    expected_s = config.duration_s if config.duration_s is not None else (
        open_total / point if config.mode == "open" else None
    )
    deadline = None if expected_s is None else time.monotonic() + expected_s + config.timeout_s + _GRACE_S
    pending = set(indices)
    last_end_ns = start_ns
    worker_cpu: list[float] = []
    parent_cpu_start = time.process_time()
    aborted = False
    last_progress = 0.0
    try:
        while pending:
            for message in pool.receive(sorted(pending), 0.1):
                kind = message[0]
                if kind == "records":
                    reporter.add(message[1])
                elif kind == "done":
                    pending.discard(message[1])
                    last_end_ns = max(last_end_ns, message[2])
                    worker_cpu.append(message[3])
                elif kind == "failed":
                    raise LoadTestError(f"worker {message[1]} failed while loading {target.name}:\n{message[2]}")
            if not aborted and ((stop is not None and stop.is_set()) or (deadline and time.monotonic() > deadline)):
                if deadline and time.monotonic() > deadline:
                    log.warning("%s: phase ran past its expected end; stopping it", target.name)
                aborted = True
                pool.broadcast(workers, ("abort",))
            now = time.monotonic()
            if progress is not None and now - last_progress >= 0.1:
                last_progress = now
                progress(_progress(measurement, config, number, phases, start_ns, finished=False))
    except BaseException:
        if not aborted:
            try:
                pool.broadcast(workers, ("abort",))
            except OSError:
                pass
        raise
    cpu_after = cpu_usage.snapshot(server_pids)
    elapsed_s = max(0, last_end_ns - start_ns) / 1e9
    measurement.windows.append((start_wall, start_wall + elapsed_s))
    # What the load generator itself cost: if a worker kept its CPU busy, it (not the server) set the pace.
    generator_cpu_s = sum(worker_cpu) + (time.process_time() - parent_cpu_start)
    measurement.generator_cpu_s += generator_cpu_s
    if elapsed_s > 0 and worker_cpu:
        measurement.generator_busy = max(measurement.generator_busy, max(worker_cpu) / elapsed_s)
    if measurement.generator_busy > GENERATOR_BUSY_WARNING:
        log.warning("%s at %g: a worker process used %.0f%% of a CPU; the load generator may be the bottleneck "
                    "(more --processes, or a machine of its own)", target.name, point,
                    100 * measurement.generator_busy)
    if progress is not None:
        progress(_progress(measurement, config, number, phases, start_ns, finished=True))
    cpu = cpu_usage.usage(cpu_before, cpu_after, target.name, generator_cpu_s)
    problem = cpu_usage.contention(cpu)
    if problem:
        log.warning("%s at %g: %s; the figures describe more than the server", target.name, point, problem)
    return cpu


def _warm_up(
    pool: WorkerPool,
    config: LoadTestConfig,
    target: Target,
    slots: list[int],
    first_payloads: list[int],
    measurement: Measurement,
) -> None:
    """Unmeasured calls on every worker, so that connections, caches and the server are warm."""
    workers = len(slots)
    for i in range(workers):
        pool.send(i, ("warmup", target.name, slots[i], share(config.warmup_requests, workers, i), first_payloads[i]))
    rounds = math.ceil(config.warmup_requests / sum(slots))
    deadline = time.monotonic() + config.timeout_s * (1 + rounds) + _GRACE_S
    pending = set(range(workers))
    while pending:
        if time.monotonic() > deadline:
            raise LoadTestError(f"{target.name}: warm-up did not finish in time")
        for message in pool.receive(sorted(pending), 0.5):
            if message[0] == "failed":
                raise LoadTestError(f"worker {message[1]} failed during warm-up:\n{message[2]}")
            if message[0] == "warm":
                _, worker, ok, errors = message
                measurement.warmup_requests += ok + errors
                measurement.warmup_errors += errors
                pending.discard(worker)
    if measurement.warmup_requests and measurement.warmup_errors == measurement.warmup_requests:
        log.warning("%s: every warm-up call failed; measuring anyway", target.name)


def _progress(m: Measurement, config: LoadTestConfig, number: int, phases: int, start_ns: int, *,
              finished: bool) -> Progress:
    total = None
    if config.requests is not None:
        total = config.requests
    elif config.mode == "open":
        total = m.scheduled
    return Progress(
        target=m.target,
        mode=m.mode,
        point=m.point,
        phase=number,
        phases=phases,
        completed=m.requests,
        errors=sum(m.errors.values()),
        elapsed_s=max(0.0, (time.monotonic_ns() - start_ns) / 1e9),
        total_requests=total,
        duration_s=config.duration_s,
        finished=finished,
    )
