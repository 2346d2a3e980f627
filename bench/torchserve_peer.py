"""The project's REST server beside TorchServe, the peer a user would pick instead, in one run.

Both serve the same TorchScript file (the newest version under ``--models-dir``) and are driven by wrk
(one thread, ``bench/rest_wrk.lua``) with the same single-image JSON bodies (real MNIST test images, as
``mnist_client`` sends them). Three targets:

- ``project_rest``: the project's REST server as ``make serve`` starts it (``stack.servers.running_server``:
  gunicorn with ``serving/torch_server/gunicorn_conf.py``, its defaults), on a free port;
- ``torchserve_default``: TorchServe as a user starts it (``torchserve --models mnist=mnist.mar``): its
  default workers (one per core), batch size 1;
- ``torchserve_best``: TorchServe at its best batching settings: workers = usable cores, batch size and
  maximum batch delay chosen by a short sweep (the highest requests/s at concurrency 16).

TorchServe runs ``bench/torchserve/mnist_handler.py`` (one torch thread per worker, one forward pass per
batch it is handed, the project's own codec and model loader). The targets are measured in interleaved
rounds (A B C, A B C, ...): concurrency 1 (p50, p99) and concurrency 16 (requests/s, p99) each round; the
table gives medians, their spread ((max - min) / median) and the ratios project / TorchServe.

    python -m bench.torchserve_peer [--models-dir models] [--duration 5] [--rounds 3] [--short]

Needs Java (Debian ``openjdk-17-jre-headless``), TorchServe (``make setup``) and wrk (Debian ``wrk``);
where one is missing it says what to install and skips. Writes ``<output-dir>/torchserve_peer.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.inprocess import mnist_test_images
from bench.results import SPREAD_FLAG_PCT, summarise_rounds, write_result
from bench.targets import format_targets
from bench.targets import target as issue_target
from bench.rest_server import PREDICT_PATH, SINGLE_BODIES, Server, floor_classes, json_body, run_wrk, write_bodies
from bench.torchserve.server import (
    TorchServe,
    archive_model,
    java_executable,
    missing_requirements,
    running_torchserve,
    torchserve_version,
)
from bench.wrk import whole_seconds
from mnist_client import contract
from mnist_client.cpus import usable_cpus
from serving.model_repository import latest_version, model_base_path
from stack.config import StackConfig
from stack.processes import free_port
from stack.servers import running_server
from training.cli import non_negative_int, positive_int

log = logging.getLogger("bench.torchserve_peer")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "torchserve_peer"
TARGETS = ("project_rest", "torchserve_default", "torchserve_best")
LOW, HIGH = 1, 16  # the two concurrencies of every round
CHECK_IMAGES = 64  # images each target must answer like the in-process model before it is measured
PROBABILITY_ATOL = 1e-5  # what the project's server allows between its optimised copy and the export
MIN_ROUNDS = 3
DEFAULT_BATCH_SIZES = (4, 8, 16)
DEFAULT_DELAYS_MS = (1, 2, 5)
SHORT_BATCH_SIZES = (4, 8)
SHORT_DELAYS_MS = (2,)
# (key in the round's run, statistic) -> the figures each target's summary holds.
FIGURES = {
    "c1_p50_ms": (f"c{LOW}", "p50_ms"),
    "c1_p99_ms": (f"c{LOW}", "p99_ms"),
    "c16_requests_per_second": (f"c{HIGH}", "requests_per_second"),
    "c16_p99_ms": (f"c{HIGH}", "p99_ms"),
    "c16_server_cpu_us_per_request": (f"c{HIGH}", "server_cpu_us_per_request"),
}


@dataclass(frozen=True)
class Target:
    """What wrk drives: a server (URL and pid, for its CPU time) and the predict path on it."""

    label: str
    server: Server
    path: str


# -- the project's REST server -------------------------------------------------------------------------


@contextmanager
def project_rest_server(models_dir: Path, log_dir: Path) -> Iterator[Server]:
    """The REST server as ``make serve`` runs it (``stack.servers.running_server``), on 127.0.0.1 and a free port."""
    config = replace(
        StackConfig.from_env(),
        host="127.0.0.1",
        rest_port=free_port(),
        models_dir=models_dir.resolve(),
        log_dir=log_dir,
        report_dir=log_dir,
        ready_timeout_s=180.0,
    )
    with running_server(config, "torch") as server:
        yield Server(config.rest_url, server.pid or 0)


# -- answers ---------------------------------------------------------------------------------------------


def predict_json(url: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """POST ``images`` one request per image (as wrk sends them); (probabilities, classes) of the answers."""
    probabilities, classes = [], []
    for image in images:
        request = urllib.request.Request(
            url, data=json_body(image[np.newaxis]), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            (prediction,) = json.loads(response.read())["predictions"]
        probabilities.append(prediction[contract.PROBABILITIES_NAME])
        classes.append(prediction[contract.CLASSES_NAME])
    return np.asarray(probabilities, dtype=np.float32), np.asarray(classes, dtype=np.int64)


def check_answers(target: Target, images: np.ndarray, expected: tuple[np.ndarray, np.ndarray]) -> None:
    """Refuse to measure a target whose answers differ from the in-process model's."""
    probabilities, classes = predict_json(f"{target.server.url}{target.path}", images)
    if not np.array_equal(classes, expected[1]) or not np.allclose(probabilities, expected[0], atol=PROBABILITY_ATOL):
        raise RuntimeError(f"{target.label} answers differently from the in-process model; not measuring it")


# -- measuring ---------------------------------------------------------------------------------------------


Measure = Callable[[Target, int, int], dict[str, Any]]


def wrk_measure(bodies: Path) -> Measure:
    """wrk with the single-image bodies: ``measure(target, concurrency, seconds)``."""

    def measure(target: Target, concurrency: int, seconds: int) -> dict[str, Any]:
        run = run_wrk(target.server, bodies, SINGLE_BODIES, "application/json", concurrency, seconds, target.path)
        if run["errors"]:
            raise RuntimeError(f"{target.label}: {run['errors']} wrk errors at concurrency {concurrency}: {run}")
        return run

    return measure


def sweep_batching(
    torchserve: TorchServe,
    archive: str,
    measure: Measure,
    workers: int,
    batch_sizes: tuple[int, ...],
    delays_ms: tuple[int, ...],
    seconds: int,
) -> dict[str, Any]:
    """Register each (batch size, delay) with ``workers`` workers and measure it at concurrency 16; keep the
    one with the most requests/s registered (returned under ``chosen``), unregister the others."""
    points: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for batch_size in batch_sizes:
        for delay_ms in delays_ms:
            name = f"{contract.MODEL_NAME}_b{batch_size}_d{delay_ms}"
            described = torchserve.register(name, archive, workers, batch_size, delay_ms)
            target = Target(name, Server(torchserve.inference_url, torchserve.pid), f"/predictions/{name}")
            measure(target, HIGH, 1)  # warm-up: the JVM's JIT and the workers' first batches
            run = measure(target, HIGH, seconds)
            point = {
                "model_name": name,
                "workers": len(described.get("workers", [])),
                "batch_size": described["batchSize"],
                "max_batch_delay_ms": described["maxBatchDelay"],
                f"c{HIGH}": run,
            }
            points.append(point)
            log.info("sweep: batch %d, delay %d ms: %.0f req/s at c%d", batch_size, delay_ms,
                     run["requests_per_second"], HIGH)  # fmt: skip
            if best is None or run["requests_per_second"] > best[f"c{HIGH}"]["requests_per_second"]:
                if best is not None:
                    torchserve.unregister(best["model_name"])
                best = point
            else:
                torchserve.unregister(name)
    assert best is not None  # argparse refuses empty lists
    return {
        "seconds_per_point": seconds,
        "points": points,
        "chosen": best,
        "why": (
            f"the highest requests/s at concurrency {HIGH} of the {len(points)} settings swept "
            f"({best[f'c{HIGH}']['requests_per_second']:,.0f} req/s at batch {best['batch_size']}, "
            f"{best['max_batch_delay_ms']} ms delay, {best['workers']} workers)"
        ),
    }


def interleaved_rounds(targets: list[Target], measure: Measure, rounds: int, seconds: int) -> list[dict[str, Any]]:
    """``rounds`` rounds; in each, every target in turn at concurrency 1 then 16."""
    results = []
    for number in range(1, rounds + 1):
        this_round: dict[str, Any] = {}
        for target in targets:
            this_round[target.label] = {f"c{c}": measure(target, c, seconds) for c in (LOW, HIGH)}
            low, high = this_round[target.label][f"c{LOW}"], this_round[target.label][f"c{HIGH}"]
            log.info("round %d %s: c%d p50 %.3f ms, c%d %.0f req/s", number, target.label, LOW, low["p50_ms"], HIGH,
                     high["requests_per_second"])  # fmt: skip
        results.append(this_round)
    return results


def ratios(summary: dict[str, dict[str, Any]], peer: str) -> dict[str, float]:
    """project / ``peer`` for every figure's median (below 1 is better for latency and CPU, above 1 for req/s)."""
    mine = summary["project_rest"]
    return {figure: round(mine[figure]["median"] / summary[peer][figure]["median"], 3) for figure in FIGURES}


def issue_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets against TorchServe at its best batching, from this run's medians."""
    mine, peer = summary["project_rest"], summary["torchserve_best"]
    rps, peer_rps = mine["c16_requests_per_second"]["median"], peer["c16_requests_per_second"]["median"]
    p50, peer_p50 = mine["c1_p50_ms"]["median"], peer["c1_p50_ms"]["median"]
    return [
        issue_target("REST c16 requests/s, project / TorchServe best batching", rps / peer_rps, 1.5, better="higher",
               detail=f"{rps:,.0f} vs {peer_rps:,.0f} req/s"),
        issue_target("REST c1 p50, project / TorchServe best batching", p50 / peer_p50, 0.5, better="lower",
               detail=f"{p50:.3f} vs {peer_p50:.3f} ms"),
    ]  # fmt: skip


# -- the benchmark ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.torchserve_peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root (latest version)")
    parser.add_argument("--duration", type=whole_seconds, default=5, help="whole seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=3, help=f"interleaved rounds, >= {MIN_ROUNDS} (3)")
    parser.add_argument("--sweep-duration", type=whole_seconds, default=3, help="seconds per sweep point (3)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                        help="TorchServe batch sizes swept (default 4 8 16)")  # fmt: skip
    parser.add_argument("--delays-ms", type=non_negative_int, nargs="+", default=list(DEFAULT_DELAYS_MS),
                        help="TorchServe max batch delays swept, ms (default 1 2 5)")  # fmt: skip
    parser.add_argument(
        "--short", action="store_true",
        help=f"a smoke run: 1-s runs, 3 rounds, sweep batch {SHORT_BATCH_SIZES} at {SHORT_DELAYS_MS} ms only",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds {args.rounds}: expected at least {MIN_ROUNDS} (medians and spreads need them)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.short:
        args.duration, args.sweep_duration, args.rounds = 1, 1, 3
        args.batch_sizes, args.delays_ms = list(SHORT_BATCH_SIZES), list(SHORT_DELAYS_MS)
    missing = missing_requirements(need_wrk=True)
    if missing:
        result = {"skipped": missing}
        table = "TorchServe peer comparison skipped; install first:\n" + "\n".join(f"  - {m}" for m in missing)
        write_result(args.output_dir, NAME, result, table)
        return result

    base = model_base_path(args.models_dir, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    version = latest_version(base)
    if version is None:
        raise FileNotFoundError(f"no TorchScript export under {base}; run `make train-torch` first")
    images, _ = mnist_test_images()
    expected = floor_classes(base, np.ascontiguousarray(images[:CHECK_IMAGES]))
    cpus = usable_cpus()
    result: dict[str, Any] = {
        "model": {"base_path": str(base), "version": version},
        "machine": {"cpus": cpus, "wrk_threads": 1, "load_average_start": os.getloadavg()},
        "duration_s": args.duration,
        "rounds_run": args.rounds,
        "torchserve": {
            "version": torchserve_version(),
            "java": _java_version(),
            "handler": "bench/torchserve/mnist_handler.py (one torch thread per worker, one forward pass per batch)",
            "decode_input_request": False,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-torchserve-") as tmp:
        folder = Path(tmp)
        bodies = write_bodies(folder, "single", [json_body(images[i : i + 1]) for i in range(SINGLE_BODIES)])
        result["body_bytes"] = Path(f"{bodies}.0").stat().st_size
        measure = wrk_measure(bodies)
        archive = archive_model(base / str(version), folder / "store")
        with (
            project_rest_server(args.models_dir, folder / "project-logs") as project,
            running_torchserve(folder / "torchserve", folder / "store", {contract.MODEL_NAME: archive.name}) as ts,
        ):
            targets = [
                Target("project_rest", project, PREDICT_PATH),
                Target("torchserve_default", Server(ts.inference_url, ts.pid), f"/predictions/{contract.MODEL_NAME}"),
            ]
            defaults = ts.describe(contract.MODEL_NAME)
            for target in targets:
                check_answers(target, images[:CHECK_IMAGES], expected)
                measure(target, HIGH, 2)  # warm-up (TorchServe: the JVM's JIT)
            sweep = sweep_batching(
                ts, archive.name, measure, cpus, tuple(args.batch_sizes), tuple(args.delays_ms), args.sweep_duration
            )
            best = sweep["chosen"]
            targets.append(
                Target("torchserve_best", Server(ts.inference_url, ts.pid), f"/predictions/{best['model_name']}")
            )
            check_answers(targets[-1], images[:CHECK_IMAGES], expected)
            result["servers"] = {
                "project_rest": {
                    "what": "the project's REST server as `make serve` starts it (gunicorn, gunicorn_conf.py defaults)",
                    "workers": int(os.environ.get("MNIST_REST_WORKERS") or cpus),  # gunicorn_conf.py's rule
                },
                "torchserve_default": {
                    "what": "TorchServe started with the archive at its defaults",
                    "workers": len(defaults.get("workers", [])),
                    "batch_size": defaults["batchSize"],
                    "max_batch_delay_ms": defaults["maxBatchDelay"],
                },
                "torchserve_best": {
                    "what": "TorchServe at the sweep's best batching settings",
                    "workers": best["workers"],
                    "batch_size": best["batch_size"],
                    "max_batch_delay_ms": best["max_batch_delay_ms"],
                },
            }
            result["sweep"] = sweep
            result["rounds"] = interleaved_rounds(targets, measure, args.rounds, args.duration)
    summary = summarise_rounds(result["rounds"], FIGURES)
    result["summary"] = summary
    result["ratios_project_over"] = {peer: ratios(summary, peer) for peer in TARGETS[1:]}
    result["targets"] = issue_targets(summary)
    result["machine"]["load_average_end"] = os.getloadavg()
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


def _java_version() -> str:
    java = java_executable()
    done = subprocess.run([java or "java", "-version"], capture_output=True, text=True, timeout=60)
    return (done.stderr or done.stdout).splitlines()[0] if (done.stderr or done.stdout) else "unknown"


def format_table(result: dict[str, Any]) -> str:
    machine = result["machine"]
    ts = result["torchserve"]
    lines = [
        f"TorchServe {ts['version']} ({ts['java']}) beside the project's REST server: model version "
        f"{result['model']['version']}, single-image JSON ({result['body_bytes']:,} bytes), wrk 1 thread, "
        f"{result['rounds_run']} interleaved rounds of {result['duration_s']} s per run",
        f"load average (1 min) at start {machine['load_average_start'][0]:.1f}, at end "
        f"{machine['load_average_end'][0]:.1f}, on {machine['cpus']} CPUs",
        "",
        "servers measured:",
    ]
    for label, server in result["servers"].items():
        settings = f"{server['workers']} workers"
        if "batch_size" in server:
            settings += f", batch size {server['batch_size']}, max batch delay {server['max_batch_delay_ms']} ms"
        lines.append(f"  {label:<20}{server['what']}: {settings}")
    sweep = result["sweep"]
    lines += ["", f"TorchServe batching sweep ({sweep['seconds_per_point']} s per point at c{HIGH}):"]
    for point in sweep["points"]:
        run = point[f"c{HIGH}"]
        lines.append(
            f"  batch {point['batch_size']:>3}, delay {point['max_batch_delay_ms']:>2} ms, {point['workers']} workers: "
            f"{run['requests_per_second']:>8,.0f} req/s, p99 {run['p99_ms']:.2f} ms"
        )
    lines += [f"  chosen: {sweep['why']}", ""]
    header = (
        f"{'median (spread)':<20}{'c1 p50 ms':>16}{'c1 p99 ms':>16}{'c16 req/s':>18}{'c16 p99 ms':>16}"
        f"{'c16 CPU us/req':>18}"
    )
    lines.append(header)
    for label, figures in result["summary"].items():
        cells = "".join(
            f"{_cell(figures[name], decimals):>{width}}"
            for name, decimals, width in (
                ("c1_p50_ms", 3, 16), ("c1_p99_ms", 2, 16), ("c16_requests_per_second", 0, 18),
                ("c16_p99_ms", 2, 16), ("c16_server_cpu_us_per_request", 0, 18),
            )
        )  # fmt: skip
        lines.append(f"{label:<20}{cells}")
    lines.append("")
    for peer, ratio in result["ratios_project_over"].items():
        lines.append(
            f"project / {peer}: c1 p50 {ratio['c1_p50_ms']:.2f}, c1 p99 {ratio['c1_p99_ms']:.2f} (below 1: project "
            f"faster); c16 req/s {ratio['c16_requests_per_second']:.2f} (above 1: project more); c16 p99 "
            f"{ratio['c16_p99_ms']:.2f}; server CPU per request at c16 {ratio['c16_server_cpu_us_per_request']:.2f}"
        )
    flagged = [
        f"{label} {name}" for label, figures in result["summary"].items() for name, s in figures.items() if s["flagged"]
    ]
    if flagged:
        lines.append(f"! spread above {SPREAD_FLAG_PCT:.0f}% (other load on the machine?): " + ", ".join(flagged))
    lines += ["", format_targets(result["targets"], "issue 14 targets (against TorchServe)")]
    return "\n".join(lines)


def _cell(summary: dict[str, Any], decimals: int) -> str:
    flag = "!" if summary["flagged"] else ""
    return f"{summary['median']:,.{decimals}f} ({summary['spread_pct']:.0f}%{flag})"


if __name__ == "__main__":
    main()
