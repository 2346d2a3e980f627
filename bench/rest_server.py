"""The PyTorch REST server under gunicorn, driven by wrk, next to the in-process floor in one run.

1. The floor: ``bench.inprocess.measure_torch`` on the newest TorchScript export (one intra-op
   thread, as each worker runs): batch-1 latency and batch-256 images/s.
2. The server as configured by ``serving/torch_server/gunicorn_conf.py`` (sync workers, one per
   CPU, access log on), on 127.0.0.1 and a free port, driven by wrk with real MNIST test images
   (``bench/rest_wrk.lua``, bodies as ``mnist_client`` sends them):
   - single-image JSON at concurrency 1, 4 and 16: p50, p99, requests/s;
   - batch-256 requests, JSON and ``.npy`` (uint8): images/s, one request at a time (the same
     parallelism as the single-threaded floor) and two at a time (every worker busy).
3. Worker classes and micro-batching at concurrency 1 and 16: the default sync workers, gthread workers
   (keep-alive) with one and eight threads, and eight threads with micro-batching (requests of one
   worker can only meet in one forward pass when the worker has several threads).

Ratios to the floor are computed from figures of this same run. Targets (2-core machine, wrk sharing
the cores): >= 2,500 requests/s at concurrency 16, p50 <= 1.2 ms at concurrency 1, ``.npy``
batch-256 >= 60% of the in-process images/s.

    python -m bench.rest_server [--models-dir models] [--duration 4] [--no-batching-sweep]

Needs ``wrk`` (Debian package ``wrk``). Writes ``<output-dir>/rest_server.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.inprocess import DEFAULT_CALLS, measure_torch, mnist_test_images, model_only_ceiling, throughput
from bench.wrk import whole_seconds
from mnist_client import contract
from mnist_client.cpus import usable_cpus
from serving.model_repository import latest_version, model_base_path
from stack.processes import free_port, stop_process

log = logging.getLogger("bench.rest_server")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "rest_server"
WRK_SCRIPT = Path(__file__).with_name("rest_wrk.lua")
GUNICORN_CONF = REPO_ROOT / "serving" / "torch_server" / "gunicorn_conf.py"
PREDICT_PATH = f"/v1/models/{contract.MODEL_NAME}:predict"
SINGLE_BODIES = 500  # distinct single-image requests, cycled by wrk
BATCH = 256
BATCH_BODIES = 8
CONCURRENCIES = (1, 4, 16)
ACCESS_PID = re.compile(r"pid=<(\d+)>")
TARGETS = {"rps_c16_min": 2500.0, "p50_c1_max_ms": 1.2, "npy_batch_ratio_min": 0.6}


# -- request bodies ---------------------------------------------------------------------------------


def json_body(images: np.ndarray) -> bytes:
    # As mnist_client.rest sends JSON: row form, float32 values as Python floats, compact separators.
    return json.dumps({"instances": images.tolist()}, separators=(",", ":")).encode()


def npy_body(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    return buffer.getvalue()


def write_bodies(folder: Path, name: str, bodies: list[bytes]) -> Path:
    prefix = folder / name
    for index, body in enumerate(bodies):
        Path(f"{prefix}.{index}").write_bytes(body)
    return prefix


# -- the server ------------------------------------------------------------------------------------


class Server:
    """A running gunicorn: its URL, and the CPU seconds its processes (master and workers) have used."""

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.pid = pid

    def cpu_seconds(self) -> float:
        master = psutil.Process(self.pid)
        total = 0.0
        for process in (master, *master.children(recursive=True)):
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


@contextmanager
def gunicorn(base_path: Path, log_path: Path, **env: str) -> Iterator[Server]:
    """The server with gunicorn_conf.py and ``env`` on a free port; yields it once ready."""
    port = free_port()
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MNIST_REST_HOST": "127.0.0.1",
        "MNIST_REST_PORT": str(port),
        "MNIST_REST_MODEL_BASE_PATH": str(base_path),
        "MNIST_REST_ACCESS_LOG": str(log_path.with_suffix(".access.log")),
        **env,
    }
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.torch_server.app:create_app()"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(url, process, log_path)
            yield Server(url, process.pid)
        finally:
            stop_process(process, grace_s=60)


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}; log: {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn not ready within {timeout:.0f} s; log: {log_path}")


def check_predictions(url: str, images: np.ndarray, expected_classes: np.ndarray) -> None:
    """Refuse to benchmark a server that does not answer like the in-process model."""
    request = urllib.request.Request(
        f"{url}{PREDICT_PATH}", data=json_body(images), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        got = [p[contract.CLASSES_NAME] for p in json.loads(response.read())["predictions"]]
    if got != expected_classes.tolist():
        raise RuntimeError("the server's classes differ from the in-process model's; not benchmarking it")


# -- wrk --------------------------------------------------------------------------------------------


def run_wrk(
    server: Server,
    prefix: Path | None,
    count: int,
    content_type: str,
    concurrency: int,
    duration_s: int,
    path: str = PREDICT_PATH,
) -> dict:
    """One wrk run (one thread: it leaves the cores to the server): requests/s, latency in ms, and the
    CPU time per request of the server and of wrk (robust to other load on a shared machine).

    ``content_type="GET"`` (with ``prefix=None``, ``count=0``) sends bodiless GETs to ``path``."""
    command = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--timeout", "10s", "-s", str(WRK_SCRIPT),
        f"{server.url}{path}", "--", str(prefix or "-"), str(count), content_type,
    ]  # fmt: skip
    server_cpu = server.cpu_seconds()
    wrk_cpu = _children_cpu_seconds()
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    server_cpu = server.cpu_seconds() - server_cpu
    wrk_cpu = _children_cpu_seconds() - wrk_cpu
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (status {result.returncode}): {result.stdout}\n{result.stderr}")
    raw = json.loads(line[len("WRK_JSON ") :])
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout"))
    latency = raw["latency_us"]
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "errors": errors,
        "requests_per_second": round(raw["requests"] / seconds, 1),
        "p50_ms": latency["p50"] / 1000,
        "p90_ms": latency["p90"] / 1000,
        "p99_ms": latency["p99"] / 1000,
        "max_ms": latency["max"] / 1000,
        "server_cpu_us_per_request": round(server_cpu / max(raw["requests"], 1) * 1e6, 1),
        "wrk_cpu_us_per_request": round(wrk_cpu / max(raw["requests"], 1) * 1e6, 1),
    }


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the benchmark ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rest_server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root (latest version)")
    parser.add_argument("--duration", type=whole_seconds, default=4, help="whole seconds per wrk run (default 4)")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: the config's, CPUs)")
    parser.add_argument(
        "--no-batching-sweep", dest="batching_sweep", action="store_false", help="skip the worker-class/batching sweep"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install -y wrk)")
    base = model_base_path(args.models_dir, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    version = latest_version(base)
    if version is None:
        raise FileNotFoundError(f"no TorchScript export under {base}; run `make train-torch` first")

    images, labels = mnist_test_images()
    pixels = (images * contract.PIXEL_SCALE).round().astype(np.uint8)  # the original uint8 test images
    log.info("measuring the in-process floor on %s/%d", base, version)
    floor = measure_torch(base, images, labels)
    floor_b1_ms = floor["latency"]["1"]["median_ms"]
    floor_images_per_s = floor["throughput"]["images_per_second"]
    # The server runs batches of 4+ images on an inference-optimised copy of the export; its own
    # in-process figure shows how much of the batch throughput is model and how much is serving.
    server_model = server_model_throughput(base / str(version), images)
    result_floor_server = {"batch_size": BATCH, **server_model}

    server_env = {} if args.workers is None else {"MNIST_REST_WORKERS": str(args.workers)}
    cpus = usable_cpus()
    workers = args.workers or cpus  # gunicorn_conf.py's default
    result: dict[str, Any] = {
        "model": {"base_path": str(base), "version": version},
        # Other work on a shared machine inflates every figure; the load average says how much there was.
        "machine": {"cpus": cpus, "wrk_threads": 1, "load_average_start": os.getloadavg()},
        "duration_s": args.duration,
        "workers": workers,
        "floor": floor,
        "floor_server_model": result_floor_server,
    }
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        folder = Path(tmp)
        single = write_bodies(folder, "single", [json_body(images[i : i + 1]) for i in range(SINGLE_BODIES)])
        batches = range(0, BATCH * BATCH_BODIES, BATCH)
        batch_json = write_bodies(folder, "batch_json", [json_body(images[i : i + BATCH]) for i in batches])
        batch_npy = write_bodies(folder, "batch_npy", [npy_body(pixels[i : i + BATCH]) for i in batches])
        result["body_bytes"] = {
            "single_json": Path(f"{single}.0").stat().st_size,
            "batch_256_json": Path(f"{batch_json}.0").stat().st_size,
            "batch_256_npy": Path(f"{batch_npy}.0").stat().st_size,
        }

        with gunicorn(base, folder / "default.log", **server_env) as server:
            _, expected = floor_classes(base, images[:64])
            check_predictions(server.url, images[:64], expected)
            run_wrk(server, single, SINGLE_BODIES, "application/json", 4, 1)  # warm-up
            single_runs = {}
            for concurrency in CONCURRENCIES:
                run = run_wrk(server, single, SINGLE_BODIES, "application/json", concurrency, args.duration)
                run["p50_vs_floor"] = round(run["p50_ms"] / floor_b1_ms, 2)
                run["rps_vs_floor"] = round(run["requests_per_second"] / (workers * 1000 / floor_b1_ms), 3)
                single_runs[str(concurrency)] = run
                log.info("single JSON c=%d: %s", concurrency, run)
            result["single_image_json"] = single_runs
            # The HTTP round trip without the model: the server's cheapest endpoint at concurrency 1.
            # With the forward pass it bounds the predict p50 from below.
            healthz = run_wrk(server, None, 0, "GET", 1, args.duration, path="/healthz")
            healthz["p50_plus_model_ms"] = round(healthz["p50_ms"] + floor_b1_ms, 3)
            result["healthz_c1"] = healthz
            log.info("GET /healthz c=1: %s", healthz)

            batch_runs: dict[str, Any] = {}
            for label, prefix, content_type in (
                ("json", batch_json, "application/json"),
                ("npy", batch_npy, "application/x-npy"),
            ):
                for concurrency in (1, workers):
                    run = run_wrk(server, prefix, BATCH_BODIES, content_type, concurrency, args.duration)
                    run["images_per_second"] = round(run["requests_per_second"] * BATCH, 1)
                    run["vs_floor"] = round(run["images_per_second"] / floor_images_per_s, 3)
                    run["vs_server_model"] = round(run["images_per_second"] / server_model["images_per_second"], 3)
                    batch_runs[f"{label}_c{concurrency}"] = run
                    log.info("batch-256 %s c=%d: %s", label, concurrency, run)
            result["batch_256"] = batch_runs

        if args.batching_sweep:
            result["worker_class_sweep"] = batching_sweep(base, folder, single, server_env, args.duration)

    c1, c16 = result["single_image_json"]["1"], result["single_image_json"]["16"]
    for run in result["single_image_json"].values():
        run["server_cpu_beyond_model_us"] = round(run["server_cpu_us_per_request"] - floor_b1_ms * 1000, 1)
    result["targets"] = {
        **TARGETS,
        "rps_c16_model_ceiling": model_only_ceiling(
            result["machine"]["cpus"], floor_b1_ms, c16["wrk_cpu_us_per_request"]
        ),
        "p50_c1_floor_ms": result["healthz_c1"]["p50_plus_model_ms"],
        "rps_c16": c16["requests_per_second"],
        "p50_c1_ms": c1["p50_ms"],
        "npy_batch_ratio": result["batch_256"]["npy_c1"]["vs_floor"],
        "met": {
            "rps_c16": c16["requests_per_second"] >= TARGETS["rps_c16_min"],
            "p50_c1": c1["p50_ms"] <= TARGETS["p50_c1_max_ms"],
            "npy_batch": result["batch_256"]["npy_c1"]["vs_floor"] >= TARGETS["npy_batch_ratio_min"],
        },
    }
    result["machine"]["load_average_end"] = os.getloadavg()
    print(format_table(result))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


OPTIMISED_COPY_BATCHES = (1, 2, 4, 8, 64, 256)


def server_model_throughput(version_dir: Path, images: np.ndarray) -> dict[str, Any]:
    """The server's own model code in this process, one torch thread: batch-256 images/s of
    ``LoadedModel.predict``, and per-image time of the exported module against the inference-optimised
    copy by batch size (the measurement behind ``OPTIMIZED_MIN_BATCH``)."""
    import torch

    from serving.torch_server.model_store import load_version, run_module

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_version(version_dir, int(version_dir.name), torch.device("cpu"))
        result = throughput(model.predict, images, BATCH, DEFAULT_CALLS[BATCH])
        per_image: dict[str, dict[str, float]] = {}
        if model.optimized is not None:
            for batch in OPTIMISED_COPY_BATCHES:
                calls = max(3, 512 // batch)
                timing = {}
                for name, module in (("exported", model.module), ("optimised", model.optimized)):
                    run = throughput(lambda x, m=module: run_module(m, x, model.device), images, batch, calls)
                    timing[f"{name}_us_per_image"] = round(1e6 / run["images_per_second"], 1)
                timing["ratio"] = round(timing["optimised_us_per_image"] / timing["exported_us_per_image"], 2)
                per_image[str(batch)] = timing
        return {**result, "optimised_vs_exported": per_image}
    finally:
        torch.set_num_threads(previous)


def floor_classes(base: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from bench.inprocess import load_torchscript

    predict, _ = load_torchscript(base)
    return predict(np.ascontiguousarray(images))


def batching_sweep(base: Path, folder: Path, single: Path, server_env: dict[str, str], duration: int) -> dict:
    """Single-image JSON at concurrency 1 and 16 on sync workers (the default), gthread workers with one
    and with eight threads (keep-alive connections), and gthread with micro-batching. Each run also
    records how many requests each worker answered (from the access log): gthread workers keep the
    connections they accept, so the split can be uneven."""
    batching = {
        "MNIST_REST_BATCHING": "on",
        "MNIST_REST_BATCH_MAX_SIZE": "16",
        "MNIST_REST_BATCH_TIMEOUT_MICROS": "500",
    }
    variants: dict[str, dict[str, str]] = {
        "sync": {},
        "gthread_1_thread": {"MNIST_REST_WORKER_CLASS": "gthread", "MNIST_REST_THREADS": "1"},
        "gthread_8_threads": {"MNIST_REST_THREADS": "8"},
        "gthread_8_threads_batching": {"MNIST_REST_THREADS": "8", **batching},
    }
    runs: dict[str, Any] = {}
    for name, env in variants.items():
        log_path = folder / f"{name}.log"
        access_log = log_path.with_suffix(".access.log")
        with gunicorn(base, log_path, **server_env, **env) as server:
            run_wrk(server, single, SINGLE_BODIES, "application/json", 16, 1)  # warm-up
            runs[name] = {"env": env}
            for concurrency in (1, 16):
                already = len(access_log.read_text().splitlines())
                run = run_wrk(server, single, SINGLE_BODIES, "application/json", concurrency, duration)
                pids = Counter(ACCESS_PID.findall("\n".join(access_log.read_text().splitlines()[already:])))
                runs[name][f"c{concurrency}"] = {**run, "requests_per_worker": sorted(pids.values(), reverse=True)}
            log.info("worker-class / micro-batching sweep %s: %s", name, runs[name])
    return runs


def format_table(result: dict[str, Any]) -> str:
    floor = result["floor"]
    b1 = floor["latency"]["1"]["median_ms"]
    load = result["machine"]["load_average_start"][0], result["machine"]["load_average_end"][0]
    lines = [
        f"load average (1 min) at start {load[0]:.1f}, at end {load[1]:.1f}, on {result['machine']['cpus']} CPUs",
        f"in-process floor (1 thread): batch-1 median {b1:.3f} ms, "
        f"batch-256 {floor['throughput']['images_per_second']:,.0f} images/s",
        "",
        f"{'single-image JSON':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p50/floor':>11}{'errors':>8}"
        f"{'server CPU us/req':>19}",
    ]
    for concurrency, run in result["single_image_json"].items():
        lines.append(
            f"{'concurrency ' + concurrency:<22}{run['requests_per_second']:>10,.0f}{run['p50_ms']:>9.3f}"
            f"{run['p99_ms']:>9.3f}{run['p50_vs_floor']:>11.2f}{run['errors']:>8}"
            f"{run['server_cpu_us_per_request']:>19,.0f}"
        )
    server_floor = result["floor_server_model"]["images_per_second"]
    per_image = result["floor_server_model"]["optimised_vs_exported"]
    if per_image:
        lines += ["", "per-image time, optimised copy / exported module: " + ", ".join(
            f"batch {batch} {timing['ratio']:.2f}" for batch, timing in per_image.items()
        )]  # fmt: skip
    lines += [
        "",
        f"batch-256 floor of the server's model code (optimised copy, 1 thread): {server_floor:,.0f} images/s",
        f"{'batch-256':<22}{'images/s':>10}{'p50 ms':>9}{'vs floor':>11}{'vs server model':>17}{'errors':>8}",
    ]
    for name, run in result["batch_256"].items():
        lines.append(
            f"{name:<22}{run['images_per_second']:>10,.0f}{run['p50_ms']:>9.1f}{run['vs_floor']:>11.2f}"
            f"{run['vs_server_model']:>17.2f}{run['errors']:>8}"
        )
    if "worker_class_sweep" in result:
        header = f"{'single-image JSON':<30}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'server CPU us/req':>19}  per worker"
        lines += ["", header]
        for name, variant in result["worker_class_sweep"].items():
            for key in ("c1", "c16"):
                run = variant[key]
                lines.append(
                    f"{name + ' ' + key:<30}{run['requests_per_second']:>8,.0f}{run['p50_ms']:>9.3f}"
                    f"{run['p99_ms']:>9.3f}{run['server_cpu_us_per_request']:>19,.0f}  {run['requests_per_worker']}"
                )
    t = result["targets"]
    single = result["single_image_json"]
    c16 = single["16"]
    healthz = result["healthz_c1"]
    lines += [
        "",
        f"GET /healthz c1 (no model): p50 {healthz['p50_ms']:.3f} ms, {healthz['requests_per_second']:,.0f} req/s, "
        f"server CPU {healthz['server_cpu_us_per_request']:,.0f} us/req; p50 + model batch-1 = "
        f"{healthz['p50_plus_model_ms']:.3f} ms (the least a predict p50 at c1 can be here)",
        f"model-only ceiling at c16: {t['rps_c16_model_ceiling']:,.0f} req/s ({result['machine']['cpus']} CPUs / "
        f"(model batch-1 {b1:.3f} ms + wrk {c16['wrk_cpu_us_per_request'] / 1000:.3f} ms per request)); "
        "server CPU beyond the model per request: "
        + ", ".join(f"c{c} {run['server_cpu_beyond_model_us']:,.0f} us" for c, run in single.items()),
        f"targets: c16 {t['rps_c16']:,.0f} req/s (>= {t['rps_c16_min']:,.0f}: {_ok(t['met']['rps_c16'])}), "
        f"c1 p50 {t['p50_c1_ms']:.3f} ms (<= {t['p50_c1_max_ms']}: {_ok(t['met']['p50_c1'])}), "
        f".npy batch-256 {t['npy_batch_ratio']:.2f} of floor (>= {t['npy_batch_ratio_min']}: "
        f"{_ok(t['met']['npy_batch'])})",
    ]
    return "\n".join(lines)


def _ok(met: bool) -> str:
    return "met" if met else "MISSED"


if __name__ == "__main__":
    main()
