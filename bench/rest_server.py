"""The PyTorch REST server as served, its defaults beside the issue's starting point, in one run.

1. The floor: the serving path in this process (``model_store.load_version`` as a worker loads it,
   ``LoadedModel.predict``, one torch thread as each worker runs): batch-1 latency and batch-256
   images/s, and the forms the version chose (which batches run the optimised copy, the chunks).
2. Two servers, both as ``make serve`` starts them (``stack.servers.running_server``: nginx in front of
   gunicorn with ``serving/torch_server/gunicorn_conf.py``), on free ports:
   - ``defaults``: today's defaults (gthread workers with request threads, micro-batching on, the
     optimised copy from the measured crossover, large batches in chunks);
   - ``before``: the defaults the issue measured from (``BEFORE_ENV``: gunicorn's access log, sync
     workers, no micro-batching, the optimised copy from batch 4), the baseline of every ratio;
   - any ``--variant NAME=VAR=VALUE,...`` (more MNIST_REST_* settings) measured the same way.
3. wrk (one thread, ``bench/rest_wrk.lua``, real MNIST test images as ``mnist_client`` sends them) drives
   them in interleaved rounds (before, defaults, variants; before, defaults, ...): single-image JSON at
   concurrency 1 and 16, and ``.npy`` batch-256 requests one at a time. Each figure is the median of the
   rounds, with its spread. Each run also records the server's CPU per request (nginx and gunicorn) and,
   from the server's metrics, the mean images per forward pass (the micro-batches formed).

    python -m bench.rest_server [--models-dir models] [--duration 4] [--rounds 3] [--variant NAME=VAR=VALUE,...]

Needs ``wrk`` (Debian package ``wrk``) and nginx. Writes ``<output-dir>/rest_server.json``; the targets
of issue 14 are printed with PASS or MISS (see ``TARGETS``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.inprocess import DEFAULT_CALLS, THROUGHPUT_BATCH, latency, mnist_test_images, throughput
from bench.results import summarise_rounds, write_result
from bench.targets import format_targets, target
from bench.wrk import whole_seconds
from mnist_client import contract
from mnist_client.cpus import usable_cpus
from serving.model_repository import latest_version, model_base_path
from stack.config import free_port_config
from stack.servers import running_server
from training.cli import positive_int

log = logging.getLogger("bench.rest_server")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "rest_server"
WRK_SCRIPT = Path(__file__).with_name("rest_wrk.lua")
PREDICT_PATH = f"/v1/models/{contract.MODEL_NAME}:predict"
SINGLE_BODIES = 500  # distinct single-image requests, cycled by wrk
BATCH = THROUGHPUT_BATCH
BATCH_BODIES = 8
LOW, HIGH = 1, 16
CHECK_IMAGES = 64
# The issue's starting point: gunicorn's access log, sync workers (one request at a time, a connection
# per request), no micro-batching, the optimised copy from batch 4 whatever the machine measures.
BEFORE_ENV = {
    "MNIST_REST_ACCESS_LOG": "-",  # gunicorn's access log, to its log file (nginx writes it now)
    "MNIST_REST_WORKER_CLASS": "sync",
    "MNIST_REST_THREADS": "1",
    "MNIST_REST_BATCHING": "off",
    "MNIST_REST_OPTIMIZED_MIN_BATCH": "4",
}
TARGETS = {
    "c16_rps_vs_before_min": 1.35,
    "c16_p99_vs_before_max": 1.0,
    "c1_p50_vs_before_max": 1.0,
    "c1_p50_over_floor_max_ms": 0.3,
    "npy_batch_vs_floor_min": 0.9,
}
_FORWARD_SUM = re.compile(r"^mnist_rest_forward_batch_size_sum (\S+)$", re.MULTILINE)
_FORWARD_COUNT = re.compile(r"^mnist_rest_forward_batch_size_count (\S+)$", re.MULTILINE)


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


# -- the servers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running server: its URL, and the processes whose CPU time is the server's (with their children)."""

    url: str
    pid: int
    extra_pids: tuple[int, ...] = ()

    def cpu_seconds(self) -> float:
        seen: set[int] = set()
        total = 0.0
        for pid in (self.pid, *self.extra_pids):
            try:
                root = psutil.Process(pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in processes:
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                try:
                    times = process.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += times.user + times.system
        return total


def forward_passes(url: str) -> tuple[float, float]:
    """(images, forward passes) so far, from the server's merged Prometheus metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    images, passes = _FORWARD_SUM.search(text), _FORWARD_COUNT.search(text)
    if images is None or passes is None:
        raise RuntimeError(f"{url}/metrics has no mnist_rest_forward_batch_size histogram")
    return float(images.group(1)), float(passes.group(1))


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
    latency_us = raw["latency_us"]
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "errors": errors,
        "requests_per_second": round(raw["requests"] / seconds, 1),
        "p50_ms": latency_us["p50"] / 1000,
        "p90_ms": latency_us["p90"] / 1000,
        "p99_ms": latency_us["p99"] / 1000,
        "max_ms": latency_us["max"] / 1000,
        "server_cpu_us_per_request": round(server_cpu / max(raw["requests"], 1) * 1e6, 1),
        "wrk_cpu_us_per_request": round(wrk_cpu / max(raw["requests"], 1) * 1e6, 1),
    }


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the in-process floor -----------------------------------------------------------------------------


def serving_path_floor(version_dir: Path, images: np.ndarray) -> dict[str, Any]:
    """The serving path in this process with one torch thread, as each worker runs it: batch-1 latency,
    batch-256 images/s, and what the version chose when it loaded (its plan)."""
    import torch

    from serving.torch_server.model_store import load_version

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_version(version_dir, int(version_dir.name), torch.device("cpu"))
        return {
            "batch_1": latency(model.predict, images, 1, DEFAULT_CALLS[1]),
            "batch_256": throughput(model.predict, images, BATCH, DEFAULT_CALLS[BATCH]),
            "optimized_min_batch": model.optimized_min_batch,
            "chunk": model.chunk,
            "crossover_timings_us": {str(k): v for k, v in model.plan.get("timings_us", {}).items()},
        }
    finally:
        torch.set_num_threads(previous)


def floor_classes(base: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from bench.inprocess import load_torchscript

    predict, _ = load_torchscript(base)
    return predict(np.ascontiguousarray(images))


# -- rounds and summaries -----------------------------------------------------------------------------


def measure_round(name: str, server: Server, bodies: dict[str, Path], duration: int) -> dict[str, Any]:
    """One round of one server: single-image JSON at LOW and HIGH, then .npy batch-256 one at a time."""
    runs: dict[str, Any] = {}
    for concurrency in (LOW, HIGH):
        images_before, passes_before = forward_passes(server.url)
        run = run_wrk(server, bodies["single"], SINGLE_BODIES, "application/json", concurrency, duration)
        images_after, passes_after = forward_passes(server.url)
        passes = passes_after - passes_before
        run["images_per_forward_pass"] = round((images_after - images_before) / passes, 2) if passes else None
        runs[f"c{concurrency}"] = run
    run = run_wrk(server, bodies["npy"], BATCH_BODIES, "application/x-npy", 1, duration)
    run["images_per_second"] = round(run["requests_per_second"] * BATCH, 1)
    runs["npy_batch_256"] = run
    for key, run in runs.items():
        if run["errors"]:
            raise RuntimeError(f"{name}: {run['errors']} wrk errors in {key}: {run}")
    log.info("%s: c%d p50 %.3f ms; c%d %.0f req/s (p99 %.2f ms, %s images/pass); .npy %.0f images/s", name, LOW,
             runs[f"c{LOW}"]["p50_ms"], HIGH, runs[f"c{HIGH}"]["requests_per_second"], runs[f"c{HIGH}"]["p99_ms"],
             runs[f"c{HIGH}"]["images_per_forward_pass"], runs["npy_batch_256"]["images_per_second"])  # fmt: skip
    return runs


FIGURES = {
    "c1_p50_ms": (f"c{LOW}", "p50_ms"),
    "c1_p99_ms": (f"c{LOW}", "p99_ms"),
    "c16_requests_per_second": (f"c{HIGH}", "requests_per_second"),
    "c16_p50_ms": (f"c{HIGH}", "p50_ms"),
    "c16_p99_ms": (f"c{HIGH}", "p99_ms"),
    "c16_server_cpu_us_per_request": (f"c{HIGH}", "server_cpu_us_per_request"),
    "c16_images_per_forward_pass": (f"c{HIGH}", "images_per_forward_pass"),
    "c1_server_cpu_us_per_request": (f"c{LOW}", "server_cpu_us_per_request"),
    "npy_batch_256_images_per_second": ("npy_batch_256", "images_per_second"),
}


def issue_targets(summary: dict[str, dict[str, Any]], floor: dict[str, Any]) -> list[dict[str, Any]]:
    new, before = summary["defaults"], summary["before"]

    def median(config: dict[str, Any], figure: str) -> float:
        return float(config[figure]["median"])

    floor_b1 = floor["batch_1"]["median_ms"]
    floor_batch = floor["batch_256"]["images_per_second"]
    rps, rps_before = median(new, "c16_requests_per_second"), median(before, "c16_requests_per_second")
    p99, p99_before = median(new, "c16_p99_ms"), median(before, "c16_p99_ms")
    p50, p50_before = median(new, "c1_p50_ms"), median(before, "c1_p50_ms")
    npy = median(new, "npy_batch_256_images_per_second")
    return [
        target("REST c16 requests/s, defaults / before", rps / rps_before, TARGETS["c16_rps_vs_before_min"],
               better="higher", detail=f"{rps:,.0f} vs {rps_before:,.0f} req/s"),
        target("REST c16 p99, defaults / before", p99 / p99_before, TARGETS["c16_p99_vs_before_max"],
               better="lower", detail=f"{p99:.2f} vs {p99_before:.2f} ms"),
        target("REST c1 p50, defaults / before", p50 / p50_before, TARGETS["c1_p50_vs_before_max"],
               better="lower", detail=f"{p50:.3f} vs {p50_before:.3f} ms"),
        target("REST c1 p50 above the serving path's in-process batch 1", p50 - floor_b1,
               TARGETS["c1_p50_over_floor_max_ms"], better="lower", unit=" ms",
               detail=f"{p50:.3f} ms served vs {floor_b1:.3f} ms in process"),
        target("REST .npy batch 256, served / in-process images/s", npy / floor_batch,
               TARGETS["npy_batch_vs_floor_min"], better="higher",
               detail=f"{npy:,.0f} vs {floor_batch:,.0f} images/s"),
    ]  # fmt: skip


# -- the benchmark ----------------------------------------------------------------------------------


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, settings = text.partition("=")
    env: dict[str, str] = {}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("MNIST_REST_"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected MNIST_REST_<SETTING>=<value>")
        env[key] = value
    if not sep or not name or not env or name in ("before", "defaults"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=MNIST_REST_X=value[,MNIST_REST_Y=value...]")
    return name, env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rest_server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root (latest version)")
    parser.add_argument("--duration", type=whole_seconds, default=4, help="whole seconds per wrk run (default 4)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=VAR=VALUE,...",
                        help="another configuration measured in the same rounds, e.g. "
                             "threads8=MNIST_REST_THREADS=8 (repeatable)")  # fmt: skip
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

    images, _ = mnist_test_images()
    pixels = (images * contract.PIXEL_SCALE).round().astype(np.uint8)  # the original uint8 test images
    log.info("measuring the serving path in process on %s/%d", base, version)
    floor = serving_path_floor(base / str(version), images)
    configs = {"before": BEFORE_ENV, "defaults": {}, **dict(args.variant)}
    result: dict[str, Any] = {
        "model": {"base_path": str(base), "version": version},
        "machine": {"cpus": usable_cpus(), "wrk_threads": 1, "load_average_start": os.getloadavg()},
        "duration_s": args.duration,
        "rounds_run": args.rounds,
        "configs": configs,
        "floor": floor,
    }
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        batches = range(0, BATCH * BATCH_BODIES, BATCH)
        bodies = {
            "single": write_bodies(folder, "single", [json_body(images[i : i + 1]) for i in range(SINGLE_BODIES)]),
            "npy": write_bodies(folder, "npy", [npy_body(pixels[i : i + BATCH]) for i in batches]),
        }
        result["body_bytes"] = {key: Path(f"{prefix}.0").stat().st_size for key, prefix in bodies.items()}
        _, expected = floor_classes(base, images[:CHECK_IMAGES])
        servers: dict[str, Server] = {}
        for name, env in configs.items():
            config = free_port_config(args.models_dir.resolve(), folder / name)
            running = stack.enter_context(running_server(config, "torch", env=env))
            servers[name] = Server(config.rest_url, running.pid or 0, tuple(running.pids))
            check_predictions(config.rest_url, images[:CHECK_IMAGES], expected)
            run_wrk(servers[name], bodies["single"], SINGLE_BODIES, "application/json", HIGH, 1)  # warm-up
        rounds = []
        for number in range(1, args.rounds + 1):
            log.info("round %d of %d", number, args.rounds)
            rounds.append({name: measure_round(name, server, bodies, args.duration) for name, server in servers.items()})
    result["rounds"] = rounds
    result["summary"] = summarise_rounds(rounds, FIGURES)
    result["targets"] = issue_targets(result["summary"], floor)
    result["machine"]["load_average_end"] = os.getloadavg()
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    floor = result["floor"]
    load = result["machine"]["load_average_start"][0], result["machine"]["load_average_end"][0]
    threshold = floor["optimized_min_batch"]
    forms = "the optimised copy never" if threshold >= 2**31 else f"the optimised copy from batch {threshold}"
    lines = [
        f"load average (1 min) at start {load[0]:.1f}, at end {load[1]:.1f}, on {result['machine']['cpus']} CPUs; "
        f"{result['rounds_run']} interleaved rounds of {result['duration_s']} s per run",
        f"serving path in process (1 thread): batch-1 median {floor['batch_1']['median_ms']:.3f} ms, batch-256 "
        f"{floor['batch_256']['images_per_second']:,.0f} images/s ({forms}, chunks of {floor['chunk']})",
        "",
        f"{'median (spread %)':<34}" + "".join(f"{name:>22}" for name in result["summary"]),
    ]
    for figure in FIGURES:
        cells = []
        for summary in result["summary"].values():
            s = summary[figure]
            cells.append(f"{s['median']:>14,.3f} ({s['spread_pct']:>4.0f}%)" + ("!" if s["flagged"] else " "))
        lines.append(f"{figure:<34}" + "".join(f"{c:>22}" for c in cells))
    lines += ["", "configurations: " + "; ".join(f"{n}: {e or 'gunicorn_conf.py defaults'}" for n, e in
                                                 result["configs"].items())]  # fmt: skip
    lines += ["", format_targets(result["targets"], "issue 14 targets (REST server)")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
