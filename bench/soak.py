"""Soak: both servers under steady load for minutes; memory and p99 latency must stay flat.

Starts the PyTorch REST server (gunicorn with serving/torch_server/gunicorn_conf.py, access log off)
and the TF Serving stand-in (``python -m serving.tfs_standin``) on 127.0.0.1 and free ports, with the
newest exports under ``--models-dir``. Then, interval after interval, the load tester library
(``mnist_client.loadtest.run``, closed loop, real MNIST test images) drives both at once, one run per
server and interval, while a sampler reads the RSS of every gunicorn worker, of the gunicorn master
and of the stand-in (psutil) once a second.

Per interval it records p50/p99/p999 latency, requests/s and errors per server and the median RSS
per process. A series is flat when its least-squares slope over the run, and its change from the
first to the last interval, stay within bounds (memory: 5% or 16 MiB per run, whichever is larger;
p99: the last interval at most 1.5x the first, a loose bound because the machine is shared). A worker
that gunicorn replaces during the soak (a crash) is reported as such: its series restarts.

    python -m bench.soak --minutes 3 [--interval 20] [--concurrency 2] [--models-dir models]

Not part of the default test suite or ``make bench`` time budget (it runs for minutes by design).
Writes ``<output-dir>/soak.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from bench.results import write_result
from mnist_client import contract
from mnist_client.loadtest import LoadTestConfig, Target, run
from serving.model_repository import latest_version, model_base_path
from stack.config import REPO_ROOT, free_port_config
from stack.servers import running_server

log = logging.getLogger("bench.soak")

NAME = "soak"
MIB = 1024 * 1024
MEMORY_TOLERANCE = (0.05, 16 * MIB)  # relative, absolute: the larger one applies
P99_MAX_RATIO = 1.5
SAMPLE_SECONDS = 1.0


class RssSampler:
    """Samples the RSS of named processes every second; gunicorn workers are found as the master's children."""

    def __init__(self, gunicorn: psutil.Process, standin: psutil.Process) -> None:
        self._gunicorn, self._standin = gunicorn, standin
        self._samples: dict[str, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.workers_seen: set[int] = set()

    def _processes(self) -> dict[str, psutil.Process]:
        found = {"gunicorn_master": self._gunicorn, "standin": self._standin}
        for child in self._gunicorn.children():
            found[f"gunicorn_worker_{child.pid}"] = child
            self.workers_seen.add(child.pid)
        return found

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                processes = self._processes()
            except psutil.Error:
                continue
            for name, process in processes.items():
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                with self._lock:
                    self._samples[name].append(rss)

    def take(self) -> dict[str, int]:
        """Median RSS per process since the last call (and forget those samples)."""
        with self._lock:
            samples, self._samples = self._samples, defaultdict(list)
        return {name: int(statistics.median(values)) for name, values in samples.items() if values}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def drive(target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
    """One closed-loop run of the load tester on one target; the interval's figures."""
    config = LoadTestConfig(targets=(target,), concurrency=(concurrency,), duration_s=seconds, processes=1,
                            warmup_requests=5)
    measurement = run(config).measurements[0]
    latency = measurement.latency
    return {
        "requests": measurement.requests,
        "errors": sum(measurement.errors.values()),
        "error_kinds": dict(measurement.error_codes),
        "rps": round(measurement.throughput_rps, 1),
        "p50_ms": latency.value_at(50) / 1000 if latency.count else None,
        "p99_ms": latency.value_at(99) / 1000 if latency.count else None,
        "p999_ms": latency.value_at(99.9) / 1000 if latency.count else None,
    }


def drive_both(rest: Target, grpc_: Target, concurrency: int, seconds: float) -> dict[str, dict[str, Any]]:
    """Both servers loaded at the same time for ``seconds``; their figures by name."""
    figures: dict[str, dict[str, Any]] = {}

    def measure(name: str, target: Target) -> None:
        figures[name] = drive(target, concurrency, seconds)

    threads = [threading.Thread(target=measure, args=("rest", rest)),
               threading.Thread(target=measure, args=("grpc", grpc_))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if set(figures) != {"rest", "grpc"}:
        raise RuntimeError("a load run failed (see the log above)")
    return figures


def slope_per_minute(values: list[float], seconds_per_point: float) -> float:
    """Least-squares slope of ``values`` against time, per minute."""
    n = len(values)
    if n < 2:
        return 0.0
    xs = [i * seconds_per_point / 60 for i in range(n)]
    mean_x, mean_y = sum(xs) / n, sum(values) / n
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values)) / denominator


def memory_verdict(values: list[int], interval_s: float) -> dict[str, Any]:
    first, last = values[0], values[-1]
    allowed = max(MEMORY_TOLERANCE[0] * first, MEMORY_TOLERANCE[1])
    slope = slope_per_minute([float(v) for v in values], interval_s)
    run_minutes = (len(values) - 1) * interval_s / 60
    return {
        "first_mib": round(first / MIB, 1),
        "last_mib": round(last / MIB, 1),
        "max_mib": round(max(values) / MIB, 1),
        "slope_mib_per_min": round(slope / MIB, 3),
        "flat": last - first <= allowed and slope * run_minutes <= allowed,
    }


def latency_verdict(values: list[float], interval_s: float) -> dict[str, Any]:
    return {
        "first_p99_ms": round(values[0], 3),
        "last_p99_ms": round(values[-1], 3),
        "max_p99_ms": round(max(values), 3),
        "slope_ms_per_min": round(slope_per_minute(values, interval_s), 4),
        "last_over_first": round(values[-1] / values[0], 2) if values[0] else None,
        "flat": values[-1] <= P99_MAX_RATIO * values[0],
    }


def analyse(intervals: list[dict[str, Any]], interval_s: float) -> dict[str, Any]:
    verdicts: dict[str, Any] = {"memory": {}, "p99": {}}
    names = sorted({name for row in intervals for name in row["rss"]})
    for name in names:
        values = [row["rss"][name] for row in intervals if name in row["rss"]]
        present = sum(1 for row in intervals if name in row["rss"])
        if present < len(intervals):  # a worker born or gone mid-soak: gunicorn replaced one
            verdicts["memory"][name] = {"intervals": present, "note": "not present for the whole soak (replaced)"}
            continue
        verdicts["memory"][name] = memory_verdict(values, interval_s)
    for server in ("rest", "grpc"):
        values = [row[server]["p99_ms"] for row in intervals if row[server]["p99_ms"] is not None]
        if values:
            verdicts["p99"][server] = latency_verdict(values, interval_s)
    checked = [v["flat"] for group in verdicts.values() for v in group.values() if "flat" in v]
    verdicts["all_flat"] = bool(checked) and all(checked)
    return verdicts


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['minutes']} min, {len(result['intervals'])} intervals of {result['interval_s']} s, "
        f"concurrency {result['concurrency']} per server (shared machine: {result['cpus']} CPUs, "
        f"load average at the end {result['load_average_end']})",
        "",
        f"{'t (s)':>6} {'REST rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'gRPC rps':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'err':>4}  RSS MiB (workers..., stand-in)",
    ]

    def ms(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for row in result["intervals"]:
        rest, grpc_ = row["rest"], row["grpc"]
        workers = [v for k, v in sorted(row["rss"].items()) if k.startswith("gunicorn_worker_")]
        rss = ", ".join(f"{v / MIB:.0f}" for v in [*workers, row["rss"].get("standin", 0)])
        lines.append(
            f"{row['t_s']:>6.0f} {rest['rps']:>9.1f} {ms(rest['p50_ms']):>7} {ms(rest['p99_ms']):>7} "
            f"{rest['errors']:>4} {grpc_['rps']:>9.1f} {ms(grpc_['p50_ms']):>7} {ms(grpc_['p99_ms']):>7} "
            f"{grpc_['errors']:>4}  {rss}"
        )
    lines.append("")
    lines.append(f"{'series':<28} {'first':>8} {'last':>8} {'slope/min':>10} flat")
    verdicts = result["verdicts"]
    for name, v in verdicts["memory"].items():
        if "flat" in v:
            lines.append(f"{name + ' RSS MiB':<28} {v['first_mib']:>8.1f} {v['last_mib']:>8.1f} "
                         f"{v['slope_mib_per_min']:>10.3f} {'yes' if v['flat'] else 'NO'}")
        else:
            lines.append(f"{name + ' RSS':<28} {v['note']}")
    for name, v in verdicts["p99"].items():
        lines.append(f"{name + ' p99 ms':<28} {v['first_p99_ms']:>8.2f} {v['last_p99_ms']:>8.2f} "
                     f"{v['slope_ms_per_min']:>10.3f} {'yes' if v['flat'] else 'NO'}")
    lines.append(f"all flat: {'yes' if verdicts['all_flat'] else 'NO'}; total errors: {result['total_errors']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="soak length (default 3)")
    parser.add_argument("--interval", type=float, default=20.0, help="seconds per measured interval (default 20)")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop requests in flight per server")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load before the first measured interval (default 10, not reported)")
    parser.add_argument("--rest-workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.minutes <= 0 or args.interval <= 0 or args.concurrency < 1 or args.rest_workers < 1 or args.warmup < 0:
        parser.error("--minutes, --interval, --concurrency and --rest-workers must be positive, --warmup >= 0")
    torch_base = model_base_path(args.models_dir, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    tf_base = model_base_path(args.models_dir, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    for base, make in ((torch_base, "train-torch"), (tf_base, "train-tf")):
        if latest_version(base) is None:
            parser.error(f"no exported model under {base}; run `make {make}` first (or pass --models-dir)")
    intervals_wanted = max(2, round(args.minutes * 60 / args.interval))

    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    # Each server alone, with no nginx in front (its RSS is what is watched); the stand-in gRPC only.
    config = replace(free_port_config(args.models_dir.resolve(), scratch), tfs_rest_port=0)
    rest_env = {"MNIST_REST_WORKERS": str(args.rest_workers), "MNIST_REST_DEVICE": "cpu", "MNIST_REST_ACCESS_LOG": "off"}
    rest_target = Target("rest", "rest", config.rest_url)
    grpc_target = Target("grpc", "grpc", config.grpc_target)
    intervals: list[dict[str, Any]] = []
    try:
        with running_server(config, "torch", env=rest_env, proxy=False) as gunicorn, \
                running_server(config, "tf", proxy=False) as standin:
            sampler = RssSampler(psutil.Process(gunicorn.pid), psutil.Process(standin.pid))
            sampler.start()
            try:
                if args.warmup > 0:  # first-request costs (lazy imports, allocator growth) are not drift
                    drive_both(rest_target, grpc_target, args.concurrency, args.warmup)
                    sampler.take()
                started_at = time.monotonic()
                for number in range(1, intervals_wanted + 1):
                    figures = drive_both(rest_target, grpc_target, args.concurrency, args.interval)
                    row = {"t_s": round(time.monotonic() - started_at, 1), **figures, "rss": sampler.take()}
                    intervals.append(row)
                    log.info("interval %d/%d: REST p99 %s ms, gRPC p99 %s ms, errors %d/%d", number,
                             intervals_wanted, figures["rest"]["p99_ms"], figures["grpc"]["p99_ms"],
                             figures["rest"]["errors"], figures["grpc"]["errors"])
            finally:
                sampler.stop()
            workers_seen = sorted(sampler.workers_seen)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result: dict[str, Any] = {
        "benchmark": NAME,
        "minutes": args.minutes,
        "interval_s": args.interval,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "rest_workers": args.rest_workers,
        "workers_seen": workers_seen,
        "workers_replaced": len(workers_seen) - args.rest_workers,
        "models": {"torch": latest_version(torch_base), "tf": latest_version(tf_base)},
        "client": "mnist_client.loadtest.run, closed loop, one run per server and interval, both servers at once",
        "cpus": os.cpu_count(),
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "intervals": intervals,
        "total_errors": sum(row["rest"]["errors"] + row["grpc"]["errors"] for row in intervals),
        "verdicts": analyse(intervals, args.interval),
        "bounds": {"memory_relative": MEMORY_TOLERANCE[0], "memory_absolute_mib": MEMORY_TOLERANCE[1] / MIB,
                   "p99_max_ratio_last_to_first": P99_MAX_RATIO},
    }
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
