"""How fast the PyTorch REST server recovers when a gunicorn worker is SIGKILLed under load.

Starts gunicorn with serving/torch_server/gunicorn_conf.py (``--workers`` sync workers, access log off)
on 127.0.0.1 and a free port, serving the newest TorchScript export under ``--models-dir``, and keeps
``--threads`` client threads posting one-image predicts back to back. Each round waits until every
worker has its model loaded (their ``mnist_rest_model_version`` gauges), SIGKILLs the lowest worker pid
and records:

- ``failed``: requests that did not get a 200 between the kill and the recovery (a sync worker holds
  one request at a time, so at most one is expected);
- ``first_success_s``: from the kill until the first 200 to a request started after it (the surviving
  workers carry the traffic);
- ``all_workers_s``: from the kill until gunicorn's replacement has loaded its model and every worker
  reports it (the replacement imports torch and loads the model first).

Rounds repeat on the same server; the JSON and the table give each figure's median, min, max and
spread ((max - min) / median) over the rounds. The correctness side (at most one lost request, the
replacement serving) is tested in tests/test_reliability_faults.py, which asserts no timing.

    python -m bench.worker_recovery [--rounds 5] [--threads 4] [--workers 2] [--models-dir models]

Writes ``<output-dir>/worker_recovery.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.results import write_result
from mnist_client import contract
from mnist_client.cpus import usable_cpus
from serving.model_repository import latest_version, model_base_path
from stack.config import REPO_ROOT, free_port_config
from stack.servers import running_server

log = logging.getLogger("bench.worker_recovery")

NAME = "worker_recovery"
FIGURES = ("failed", "first_success_s", "all_workers_s")
SAFETY_S = 180.0  # a round that has not recovered by then is reported as a failure of the bench


class Traffic:
    """``threads`` threads posting predicts back to back; every outcome kept as (started, ended, ok)."""

    def __init__(self, url: str, threads: int) -> None:
        image = np.zeros((1, *contract.IMAGE_SHAPE), dtype=contract.INPUT_DTYPE)
        self._body = {"instances": image.tolist()}
        self._url = f"{url}/v1/models/{contract.MODEL_NAME}:predict"
        self.outcomes: list[tuple[float, float, bool]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = session.post(self._url, json=self._body, timeout=30).status_code == 200
                except requests.RequestException:
                    ok = False
                with self._lock:
                    self.outcomes.append((started, time.monotonic(), ok))

    def since(self, t: float) -> list[tuple[float, float, bool]]:
        """Outcomes of the requests started at or after ``t``."""
        with self._lock:
            return [o for o in self.outcomes if o[0] >= t]

    def failures_ending_after(self, t: float) -> int:
        """Requests that ended without a 200 at or after ``t`` (also those started before it)."""
        with self._lock:
            return sum(1 for _, end, ok in self.outcomes if not ok and end >= t)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def loaded_workers(url: str) -> set[int]:
    """Pids of the workers whose model-version gauge says a model is loaded."""
    try:
        text = requests.get(f"{url}/metrics", timeout=10).text
    except requests.RequestException:
        return set()
    return {
        int(sample.labels["pid"])
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mnist_rest_model_version" and sample.value > 0
    }


def wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + SAFETY_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not recovered after {SAFETY_S:.0f} s: {what}")
        time.sleep(0.02)


def one_round(master: psutil.Process, url: str, traffic: Traffic, workers: int) -> dict[str, Any]:
    def pids() -> set[int]:
        return {child.pid for child in master.children()}

    wait(lambda: len(pids()) == workers and loaded_workers(url) == pids(), "every worker loaded")
    before = time.monotonic()
    wait(lambda: sum(ok for _, _, ok in traffic.since(before)) >= 20, "traffic before the kill")
    victim = min(pids())
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait(lambda: any(ok for _, _, ok in traffic.since(killed)), "a success after the kill")
    first_success = min(end for _, end, ok in traffic.since(killed) if ok) - killed

    def replaced() -> bool:
        current = pids()
        return len(current) == workers and victim not in current and loaded_workers(url) == current

    wait(replaced, "the replacement worker loaded")
    all_workers = time.monotonic() - killed
    failed = traffic.failures_ending_after(killed)  # the victim's in-flight request included
    return {"failed": failed, "first_success_s": round(first_success, 4), "all_workers_s": round(all_workers, 3)}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in FIGURES:
        values = [r[name] for r in rounds]
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median if median > 0 else 0.0
        out[name] = {"median": median, "min": min(values), "max": max(values), "spread": round(spread, 3)}
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"worker recovery: gunicorn ({result['workers']} sync workers) under {result['threads']} client threads, "
        f"{len(result['rounds'])} SIGKILLs ({result['cpus']} usable CPUs, load average at the end "
        f"{result['load_average_end']})",
        "",
        f"{'figure':<18} {'median':>9} {'min':>9} {'max':>9} {'spread':>7}",
    ]
    for name, s in result["summary"].items():
        lines.append(f"{name:<18} {s['median']:>9.3f} {s['min']:>9.3f} {s['max']:>9.3f} {s['spread']:>7.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_recovery", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="worker kills, one after the other (default 5)")
    parser.add_argument("--threads", type=int, default=4, help="client threads posting back to back (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.rounds < 1 or args.threads < 1 or args.workers < 2:
        parser.error("--rounds and --threads must be >= 1, --workers >= 2 (one must survive the kill)")
    base = model_base_path(args.models_dir, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    if latest_version(base) is None:
        parser.error(f"no exported model under {base}; run `make train-torch` first (or pass --models-dir)")
    # Sync workers (MNIST_REST_THREADS=1): one request each, so a kill loses at most one and the
    # figures are gunicorn's recovery alone (the default gthread workers also drop their kept-alive
    # connections, which tests/test_reliability_faults.py covers).
    env = {"MNIST_REST_WORKERS": str(args.workers), "MNIST_REST_THREADS": "1", "MNIST_REST_MODEL_BASE_PATH": str(base),
           "MNIST_REST_DEVICE": "cpu", "MNIST_REST_ACCESS_LOG": "off"}
    rounds = []
    # gunicorn alone (no nginx in front): its workers are what is killed and measured.
    with tempfile.TemporaryDirectory(prefix="worker-recovery-") as scratch, \
            running_server(free_port_config(args.models_dir.resolve(), Path(scratch)), "torch", env=env,
                           proxy=False) as gunicorn:
        master = psutil.Process(gunicorn.pid)
        url = gunicorn.rest_url
        with Traffic(url, args.threads) as traffic:
            for number in range(1, args.rounds + 1):
                figures = one_round(master, url, traffic, args.workers)
                log.info("round %d: %s", number, figures)
                rounds.append(figures)
    result = {
        "target": "PyTorch REST server (gunicorn, sync workers)",
        "model_version": latest_version(base),
        "workers": args.workers,
        "threads": args.threads,
        "cpus": usable_cpus(),
        "rounds": rounds,
        "summary": summarise(rounds),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
