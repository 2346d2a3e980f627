"""The TF Serving stand-in over gRPC, next to the in-process SavedModel floor in one run.

1. The floor: ``bench.inprocess.measure_tf`` on the newest SavedModel (TensorFlow's default
   thread pools): batch-1 latency and batch-256 images/s, in this process, before any server runs.
2. The stand-in (``python -m serving.tfs_standin``) in its own process on 127.0.0.1, driven by a
   bare grpcio loop on the official ``tensorflow-serving-api`` stubs with real MNIST test images
   (requests built once, so the loop measures the server, not request building):
   - single-image Predict at concurrency 1, 4 and 16 (closed loop): p50, p99, calls/s;
   - batch-256 Predict one call at a time (the floor's parallelism): images/s;
   in three configurations: one intra- and inter-op thread with server-side batching off, the same
   with batching on (``serving/tfserving/batching_parameters_cpu.txt``), and TensorFlow's default
   thread pools (no thread flags, as ``tensorflow_model_server`` starts), which a large batch wants.
   Concurrency is spread over client processes (``--client-processes``), each running threads,
   so the client's GIL does not cap the figures.

Ratios to the floor come from this same run, and so does a model-only ceiling for concurrency 16:
the calls/s the cores would give if each call cost only the stand-in's own one-thread batch-1 model
run (its Session callable, measured in a fresh process) and the client's measured CPU per call; a
target above it cannot be reached here.
Targets on the 2-core machine (client and server share the cores): p50 <= 1.0 ms at
concurrency 1, >= 2,000 calls/s at concurrency 16, batch-256 >= 70% of the in-process images/s.
The JSON records the load average around each measurement: the cores are shared, and a busy
machine moves every figure.

    python -m bench.grpc_standin [--models-dir models] [--duration 4] [--no-batching-sweep]

Writes ``<output-dir>/grpc_standin.json``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.inprocess import model_only_ceiling
from bench.results import write_result
from mnist_client import contract
from mnist_client.cpus import usable_cpus
from serving.model_repository import latest_version, model_base_path
from stack.processes import free_port, stop_process

log = logging.getLogger("bench.grpc_standin")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "grpc_standin"
CONCURRENCIES = (1, 4, 16)
BATCH = 256
DISTINCT_REQUESTS = 256  # distinct single-image requests (real test images), cycled
WARMUP_SECONDS = 1.0
CPU_BATCHING_FILE = REPO_ROOT / "serving" / "tfserving" / "batching_parameters_cpu.txt"
# TF thread pools of the measured stand-in: one intra-op thread per session run halves batch-1
# latency on 2 cores (concurrent calls still use both cores); see docs/tf-serving.md.
STANDIN_FLAGS = ("--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=1")
TARGETS = {"p50_ms_at_concurrency_1": 1.0, "calls_per_second_at_concurrency_16": 2000.0,
           "batch_256_fraction_of_in_process": 0.70}


# --- the client: runs in worker processes ------------------------------------------------------------


def _requests(batch: int, count: int) -> list[Any]:
    """``count`` PredictRequests of ``batch`` consecutive real MNIST test images each."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    from mnist_client import mnist_data

    images = mnist_data.load_split("test").scaled()
    requests = []
    for i in range(count):
        start = (i * batch) % (len(images) - batch)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = contract.MODEL_NAME
        tensor = request.inputs[contract.INPUT_NAME]
        tensor.dtype = types_pb2.DT_FLOAT
        for size in (batch, contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH):
            tensor.tensor_shape.dim.add().size = size
        tensor.tensor_content = np.ascontiguousarray(images[start : start + batch]).tobytes()
        requests.append(request)
    return requests


_CLIENT_CACHE: dict[tuple[str, int], tuple[Any, list[Any]]] = {}


def _client(target: str, batch: int) -> tuple[Any, list[Any]]:
    """One channel and the prebuilt requests per worker process, reused across measurements."""
    key = (target, batch)
    if key not in _CLIENT_CACHE:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        channel = grpc.insecure_channel(target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        count = DISTINCT_REQUESTS if batch == 1 else max(4, 2048 // batch)
        _CLIENT_CACHE[key] = (stub, _requests(batch, count))
    return _CLIENT_CACHE[key]


def drive(target: str, batch: int, threads: int, start_at: float, seconds: float) -> dict[str, Any]:
    """Closed loop: ``threads`` threads call Predict back to back from ``start_at`` for ``seconds``.

    Calls before ``start_at`` are warm-up and not counted. Returns latencies in ns and errors.
    """
    import grpc

    stub, requests = _client(target, batch)
    end_at = start_at + seconds
    latencies: list[list[int]] = [[] for _ in range(threads)]
    sent = [0] * threads  # every call, warm-up included, for the client's CPU per call
    errors: list[str] = []

    def loop(index: int) -> None:
        predict, mine, i = stub.Predict, latencies[index], index * 7
        while True:
            request = requests[i % len(requests)]
            i += 1
            started = time.perf_counter_ns()
            now = time.time()
            if now >= end_at:
                return
            sent[index] += 1
            try:
                predict(request, timeout=30)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            if now >= start_at:
                mine.append(time.perf_counter_ns() - started)

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    cpu_started = time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"latencies_ns": [x for part in latencies for x in part], "errors": errors[:20],
            "error_count": len(errors), "client_cpu_seconds": time.process_time() - cpu_started,
            "client_calls": sum(sent)}


def floor_one_thread(base_path: str, calls: int = 1000) -> float:
    """Batch-1 median (ms) of the stand-in's own model path, one intra- and inter-op thread, in this process.

    The stand-in runs each Predict as one ``Session`` callable (serving.tfs_standin.servable), which
    costs less than the eager signature call of the default-pool floor; this is that path alone, with
    the thread pools of the measured stand-in. Run in a spawned worker (the parent has TensorFlow's
    default pools).
    """
    from bench.inprocess import mnist_test_images
    from serving.tfs_standin.servable import Servable, SessionOptions

    base = Path(base_path)
    version = latest_version(base)
    servable = Servable(contract.MODEL_NAME, version, base / str(version), SessionOptions(1, 1))
    signature = servable.signature(contract.SIGNATURE_NAME)
    fetch = tuple(sorted(signature.outputs))
    images, _ = mnist_test_images()
    singles = [np.ascontiguousarray(images[i : i + 1]) for i in range(DISTINCT_REQUESTS)]
    for image in singles[:100]:  # warm-up
        servable.run(signature, [image], fetch)
    times = []
    for i in range(calls):
        started = time.perf_counter_ns()
        servable.run(signature, [singles[i % len(singles)]], fetch)
        times.append(time.perf_counter_ns() - started)
    return round(float(np.median(times)) / 1e6, 4)


def _warm(target: str, batch: int) -> bool:
    _client(target, batch)
    return True


# --- the server ----------------------------------------------------------------------------------------


def _wait_ready(target: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = contract.MODEL_NAME
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the stand-in exited with status {process.returncode}")
            try:
                statuses = stub.GetModelStatus(request, timeout=2).model_version_status
                if any(s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for s in statuses):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the stand-in at {target} did not load the model within {timeout:.0f} s")


@contextmanager
def standin(base_path: Path, extra_flags: list[str]) -> Iterator[tuple[str, list[str], int]]:
    port = free_port()
    command = [
        sys.executable, "-m", "serving.tfs_standin", f"--port={port}", "--standin_host=127.0.0.1",
        f"--model_name={contract.MODEL_NAME}", f"--model_base_path={base_path}", *extra_flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryFile("w+") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"127.0.0.1:{port}", process)
            yield f"127.0.0.1:{port}", command[2:], process.pid
        except BaseException:
            log_file.seek(0)
            log.error("stand-in log:\n%s", log_file.read()[-4000:])
            raise
        finally:
            stop_process(process)


# --- measuring -------------------------------------------------------------------------------------------


def _split(concurrency: int, processes: int) -> list[int]:
    processes = min(processes, concurrency)
    return [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def measure(pool: ProcessPoolExecutor, target: str, server_pid: int, batch: int, concurrency: int,
            processes: int, seconds: float) -> dict[str, Any]:
    shares = _split(concurrency, processes)
    list(pool.map(_warm, [target] * len(shares), [batch] * len(shares)))
    load_before = os.getloadavg()[0]
    start_at = time.time() + WARMUP_SECONDS
    futures = [pool.submit(drive, target, batch, threads, start_at, seconds) for threads in shares]
    time.sleep(max(0.0, start_at - time.time()))
    server_cpu = _cpu_seconds(server_pid)
    time.sleep(seconds)
    server_cpu = _cpu_seconds(server_pid) - server_cpu
    parts = [f.result(timeout=seconds + 120) for f in futures]
    latencies = np.array([x for p in parts for x in p["latencies_ns"]], dtype=np.float64) / 1e6
    errors = sum(p["error_count"] for p in parts)
    client_calls = sum(p["client_calls"] for p in parts)
    client_cpu = sum(p["client_cpu_seconds"] for p in parts)
    if errors:
        log.warning("%d failed calls, e.g. %s", errors, [e for p in parts for e in p["errors"]][:3])
    calls = len(latencies)
    return {
        "batch": batch,
        "concurrency": concurrency,
        "client_processes": len(shares),
        "seconds": seconds,
        "calls": calls,
        "errors": errors,
        "calls_per_second": round(calls / seconds, 1),
        "images_per_second": round(calls * batch / seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3) if calls else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 3) if calls else None,
        # Server CPU (user + system, all threads) per call: less sensitive to a busy machine than wall time.
        "server_cpu_us_per_call": round(server_cpu / calls * 1e6, 1) if calls else None,
        "client_cpu_us_per_call": round(client_cpu / client_calls * 1e6, 1) if client_calls else None,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def run_config(pool: ProcessPoolExecutor, base_path: Path, label: str, flags: list[str], args: argparse.Namespace,
               processes_for: dict[int, int]) -> dict[str, Any]:
    log.info("stand-in %s: %s", label, " ".join(flags))
    with standin(base_path, flags) as (target, command, pid):
        single = {str(c): measure(pool, target, pid, 1, c, processes_for[c], args.duration)
                  for c in args.concurrency}
        batched = measure(pool, target, pid, BATCH, 1, 1, args.duration)
    return {"command": command, "single_image": single, f"batch_{BATCH}": batched}


def evaluate(config: dict[str, Any], floor_images_per_second: float, floor_one_thread_ms: float,
             cpus: int) -> dict[str, Any]:
    single = config["single_image"]
    fraction = config[f"batch_{BATCH}"]["images_per_second"] / floor_images_per_second
    figures = {
        "p50_ms_at_concurrency_1": single["1"]["p50_ms"] if "1" in single else None,
        "calls_per_second_at_concurrency_16": single["16"]["calls_per_second"] if "16" in single else None,
        "batch_256_fraction_of_in_process": round(fraction, 3),
    }
    met = {
        "p50_ms_at_concurrency_1": figures["p50_ms_at_concurrency_1"] is not None
        and figures["p50_ms_at_concurrency_1"] <= TARGETS["p50_ms_at_concurrency_1"],
        "calls_per_second_at_concurrency_16": figures["calls_per_second_at_concurrency_16"] is not None
        and figures["calls_per_second_at_concurrency_16"] >= TARGETS["calls_per_second_at_concurrency_16"],
        "batch_256_fraction_of_in_process": fraction >= TARGETS["batch_256_fraction_of_in_process"],
    }
    ceiling = None
    if "16" in single and single["16"]["client_cpu_us_per_call"]:
        ceiling = model_only_ceiling(cpus, floor_one_thread_ms, single["16"]["client_cpu_us_per_call"])
    return {"figures": figures, "met": met, "calls_per_second_at_concurrency_16_model_ceiling": ceiling}


def format_table(result: dict[str, Any]) -> str:
    floor = result["in_process"]
    lines = [
        f"in-process floor: batch-1 median {floor['batch_1_median_ms']:.3f} ms (default pools), "
        f"{floor['batch_1_one_thread_median_ms']:.3f} ms (the stand-in's Session callable, one thread), "
        f"batch-{BATCH} {floor['batch_256_images_per_second']:,.0f} images/s (default pools)",
        f"{'configuration':<14}{'measure':<18}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}{'images/s':>11}"
        f"{'vs floor':>9}{'srv cpu us':>11}{'load 1m':>14}",
    ]
    for label, config in result["configurations"].items():
        rows = [(f"c={c} batch 1", m) for c, m in config["single_image"].items()]
        rows.append((f"c=1 batch {BATCH}", config[f"batch_{BATCH}"]))
        for name, m in rows:
            ratio = ""
            if m["batch"] == BATCH:
                ratio = f"{m['images_per_second'] / floor['batch_256_images_per_second']:.2f}"
            elif m["concurrency"] == 1:
                ratio = f"{m['p50_ms'] / floor['batch_1_median_ms']:.2f}"
            lines.append(f"{label:<14}{name:<18}{m['p50_ms']:>9.3f}{m['p99_ms']:>9.3f}{m['calls_per_second']:>10,.0f}"
                         f"{m['images_per_second']:>11,.0f}{ratio:>9}{m['server_cpu_us_per_call']:>11,.0f}"
                         f"{str(m['load_average_1m']):>14}")
        verdict = result["targets"][label]
        lines.append(f"{'':<14}vs floor: batch-1 p50 over the in-process median; batch-{BATCH} images/s over the "
                     "in-process images/s")
        lines.append(f"{'':<14}targets: " + ", ".join(
            f"{k}={v} ({'met' if verdict['met'][k] else 'NOT met'})" for k, v in verdict["figures"].items()))
        ceiling = verdict["calls_per_second_at_concurrency_16_model_ceiling"]
        if ceiling is not None:
            client_us = config["single_image"]["16"]["client_cpu_us_per_call"]
            lines.append(f"{'':<14}model-only ceiling at c=16: {ceiling:,.0f} calls/s ({result['cpus']} CPUs / (model "
                         f"run on one thread {floor['batch_1_one_thread_median_ms']:.3f} ms + client "
                         f"{client_us / 1000:.3f} ms per call))")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_standin", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--client-processes", type=int, default=2,
                        help="client processes for concurrency above 1 (each runs threads)")
    parser.add_argument("--no-batching-sweep", action="store_true", help="skip the batching-on configuration")
    parser.add_argument("--no-default-pools", action="store_true",
                        help="skip the configuration with TensorFlow's default thread pools (no thread flags)")
    parser.add_argument("--standin-flags", default=" ".join(STANDIN_FLAGS),
                        help="tensorflow_model_server flags of the batching-off and batching-on configurations")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base_path = model_base_path(args.models_dir, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    version = latest_version(base_path)
    if version is None:
        parser.error(f"no exported SavedModel under {base_path}; run `make train-tf` first (or pass --models-dir)")
    if any(c < 1 for c in args.concurrency) or args.duration <= 0 or args.client_processes < 1:
        parser.error("--concurrency, --duration and --client-processes must be positive")

    from bench.inprocess import measure_tf, mnist_test_images

    images, labels = mnist_test_images()
    log.info("in-process floor: SavedModel version %d", version)
    floor_raw = measure_tf(base_path, images, labels, calls={1: 1000, 64: 50, BATCH: 30})
    floor = {
        "batch_1_median_ms": floor_raw["latency"]["1"]["median_ms"],
        "batch_1_p99_ms": floor_raw["latency"]["1"]["p99_ms"],
        "batch_256_images_per_second": floor_raw["throughput"]["images_per_second"],
        "threads": floor_raw["threads"],
    }

    flags = shlex.split(args.standin_flags)
    configurations = {"batching_off": flags}
    if not args.no_batching_sweep:
        configurations["batching_on"] = [*flags, "--enable_batching=true",
                                         f"--batching_parameters_file={CPU_BATCHING_FILE}"]
    if not args.no_default_pools:
        # TensorFlow's own pools (every core for one run), as tensorflow_model_server starts without
        # thread flags: what a single large batch wants.
        configurations["default_pools"] = []
    processes_for = {c: 1 if c == 1 else args.client_processes for c in args.concurrency}
    context = multiprocessing.get_context("spawn")  # the parent runs TensorFlow: never fork it
    with ProcessPoolExecutor(max_workers=max(processes_for.values()), mp_context=context) as pool:
        floor["batch_1_one_thread_median_ms"] = pool.submit(floor_one_thread, str(base_path)).result()
        measured = {label: run_config(pool, base_path, label, flags, args, processes_for)
                    for label, flags in configurations.items()}

    cpus = usable_cpus()
    result = {
        "benchmark": NAME,
        "model": {"base_path": str(base_path), "version": version},
        "images": "MNIST test set (real), float32 pixel/255 as tensor_content",
        "client": "bare grpcio loop, official tensorflow-serving-api stubs, closed loop, threads in spawned "
                  "processes",
        "cpus": cpus,
        "in_process": floor,
        "configurations": measured,
        "targets": {label: evaluate(config, floor["batch_256_images_per_second"],
                                    floor["batch_1_one_thread_median_ms"], cpus)
                    for label, config in measured.items()},
        "target_values": TARGETS,
    }
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
