"""The TF Serving stand-in over gRPC: today's settings beside the new defaults, in one run, for its tail.

Both stand-ins are started by the project's launcher (``stack.servers.running_server``, gRPC only, on
free ports) and stay up for the whole run; the load tester (``mnist_client.loadtest``, the engine of
``mnist-loadtest``) then measures them in interleaved rounds, A B A B ..., each round one load-test
run per configuration at every concurrency (16, then 1 by default) with real MNIST test images:

- ``today``: the settings the stand-in had before the tail work, which stay selectable by flag
  (``--standin_tensorflow_thread_spinning=true``: TensorFlow's idle pool threads spin for work);
- ``new``: the stand-in's defaults (no extra flags);
- optionally ``run_slots_N`` (``--run-slots N``): the defaults plus ``--standin_model_run_slots=N``
  (model runs in arrival order, at most N at once).

Per configuration and concurrency it reports the median over the rounds and the spread
((max - min) / median) of p50, p99, p99.9 and requests/s, the server's and the load tester's CPU
(the load tester shares the cores), and the target with its measured ratios and PASS or MISS:

    gRPC stand-in at c=16: p99.9 at most 3 times its p50, and requests/s not below today's.

The p99.9/p50 ratio is the median of each round's own ratio; both checks are also returned under
``"targets"`` for ``make bench``'s table. These are the stand-in's figures (a Python server), never
TensorFlow Serving's.

    python -m bench.grpc_standin [--models-dir models] [--rounds 3] [--duration 10] [--run-slots 2]

Writes ``<output-dir>/grpc_standin.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import platform
import shlex
import statistics
from pathlib import Path
from typing import Any

from bench.results import write_result
from bench.targets import target
from mnist_client import contract
from mnist_client.cpus import usable_cpus
from mnist_client.loadtest import LoadTestConfig, parse_target, run
from serving.model_repository import latest_version, model_base_path
from stack.config import REPO_ROOT, free_port_config
from stack.servers import running_server

log = logging.getLogger("bench.grpc_standin")

NAME = "grpc_standin"
BASELINE = "today"
CANDIDATE = "new"
# Today's settings, before the tail work: TensorFlow's spinning pool threads, no limit on model runs.
BASELINE_FLAGS = ("--standin_tensorflow_thread_spinning=true",)
TARGET_CONCURRENCY = 16
MAX_TAIL_RATIO = 3.0  # p99.9 over p50 at TARGET_CONCURRENCY
MIN_THROUGHPUT_RATIO = 1.0  # requests/s over today's at TARGET_CONCURRENCY
FIGURES = ("p50_ms", "p99_ms", "p99.9_ms", "requests_per_second")


def target_name(label: str) -> str:
    """What answered, as the load tests name it: the stand-in, never TF Serving."""
    return f"tf-standin-grpc-{label}"


def round_figures(result: dict[str, Any]) -> dict[str, Any]:
    """One round of one (configuration, concurrency), from a load-test report's result entry."""
    latency = result["latency_ms"]
    cpu = result["rounds"][0].get("cpu", {}) if result.get("rounds") else {}
    return {
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "p99.9_ms": latency["p99.9"],
        "max_ms": latency["max"],
        "requests_per_second": round(result["throughput_rps"], 1),
        "requests": result["requests"],
        "errors": result["errors"],
        "tail_ratio": round(latency["p99.9"] / latency["p50"], 3) if latency["p50"] else None,
        "cpu_cores": cpu,  # capacity, server, generator (the load tester), other, stolen
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread ((max - min) / median) of each figure over the rounds."""
    summary: dict[str, Any] = {"rounds": len(rounds)}
    for figure in (*FIGURES, "max_ms", "tail_ratio"):
        values = [r[figure] for r in rounds if r[figure] is not None]
        if not values:
            continue
        median = statistics.median(values)
        summary[figure] = {
            "median": round(median, 3),
            "min": min(values),
            "max": max(values),
            "spread": round((max(values) - min(values)) / median, 3) if median else None,
        }
    summary["errors"] = sum(r["errors"] for r in rounds)
    return summary


def evaluate(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The target at TARGET_CONCURRENCY for the candidate, against the baseline of the same run."""
    key = str(TARGET_CONCURRENCY)
    new, today = summaries[CANDIDATE][key], summaries[BASELINE][key]
    tail = new["tail_ratio"]["median"]
    throughput = new["requests_per_second"]["median"] / today["requests_per_second"]["median"]
    name = f"gRPC stand-in at c={TARGET_CONCURRENCY}"
    checks = {
        "tail_ratio": target(
            f"{name}: p99.9 over p50", tail, MAX_TAIL_RATIO, better="lower",
            detail=f"p50 {new['p50_ms']['median']:.2f} ms, p99.9 {new['p99.9_ms']['median']:.2f} ms "
                   f"(medians of {new['rounds']} rounds); today's settings {today['tail_ratio']['median']:.2f}x"),
        "throughput_vs_today": target(
            f"{name}: requests/s over today's", throughput, MIN_THROUGHPUT_RATIO, better="higher",
            detail=f"{new['requests_per_second']['median']:,.0f} against {today['requests_per_second']['median']:,.0f} "
                   "requests/s (medians, same run)"),
    }  # fmt: skip
    return {
        "target": f"gRPC stand-in at c={TARGET_CONCURRENCY}: p99.9 at most {MAX_TAIL_RATIO:g} times its p50, "
                  "and requests/s not below today's",
        "checks": checks,
        "today_tail_ratio": today["tail_ratio"]["median"],
        "pass": all(c["pass"] for c in checks.values()),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"gRPC stand-in, {result['rounds']} interleaved rounds of {result['duration_s']:g} s per point "
        f"(median over rounds, spread = (max - min) / median); {result['cpus']} CPUs shared with the load tester",
        f"{'configuration':<16}{'conc':>5}{'p50 ms':>16}{'p99 ms':>16}{'p99.9 ms':>17}{'p99.9/p50':>10}"
        f"{'req/s':>17}{'server cpu':>11}{'tester cpu':>11}{'errors':>7}",
    ]
    for label, per_concurrency in result["summaries"].items():
        for concurrency, s in per_concurrency.items():
            def cell(figure: str, width: int) -> str:
                f = s[figure]
                return f"{f['median']:>{width - 6},.2f} ({f['spread']:>3.0%})" if f["spread"] is not None else ""

            rounds = result["rounds_measured"][label][concurrency]
            server = statistics.median(r["cpu_cores"].get("server", 0.0) for r in rounds)
            tester = statistics.median(r["cpu_cores"].get("generator", 0.0) for r in rounds)
            lines.append(f"{label:<16}{concurrency:>5}{cell('p50_ms', 16)}{cell('p99_ms', 16)}{cell('p99.9_ms', 17)}"
                         f"{s['tail_ratio']['median']:>10.2f}{cell('requests_per_second', 17)}"
                         f"{server:>11.2f}{tester:>11.2f}{s['errors']:>7}")
    for label, flags in result["configurations"].items():
        lines.append(f"  {label}: {' '.join(flags) or '(the stand-in defaults)'}")
    verdict = result["target"]
    tail, throughput = verdict["checks"]["tail_ratio"], verdict["checks"]["throughput_vs_today"]
    lines.append(
        f"target: {verdict['target']}: p99.9/p50 {tail['measured']:.2f} (limit {tail['limit']:g}; today "
        f"{verdict['today_tail_ratio']:.2f}) {'PASS' if tail['pass'] else 'MISS'}; requests/s {throughput['measured']:.2f}x "
        f"today's {'PASS' if throughput['pass'] else 'MISS'} -> {'PASS' if verdict['pass'] else 'MISS'}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_standin", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per round and concurrency")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls before each measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[TARGET_CONCURRENCY, 1],
                        help=f"closed-loop concurrencies (the target needs {TARGET_CONCURRENCY})")
    parser.add_argument("--baseline-flags", default=" ".join(BASELINE_FLAGS),
                        help="stand-in flags that give today's behaviour")
    parser.add_argument("--candidate-flags", default="", help="stand-in flags of the new configuration")
    parser.add_argument("--run-slots", type=int, default=0,
                        help="also measure the candidate with --standin_model_run_slots=N (0: not measured)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.run_slots < 0:
        parser.error("--rounds and --duration must be positive, --warmup and --run-slots at least 0")
    if any(c < 1 for c in args.concurrency) or TARGET_CONCURRENCY not in args.concurrency:
        parser.error(f"--concurrency: positive values, including {TARGET_CONCURRENCY} (the target's)")
    base_path = model_base_path(args.models_dir, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    if latest_version(base_path) is None:
        parser.error(f"no exported SavedModel under {base_path}; run `make train-tf` first (or pass --models-dir)")
    if args.rounds < 3:
        log.warning("%d round(s): fewer than 3 gives no meaningful median or spread (a smoke run)", args.rounds)

    configurations = {BASELINE: shlex.split(args.baseline_flags), CANDIDATE: shlex.split(args.candidate_flags)}
    if args.run_slots:
        configurations[f"run_slots_{args.run_slots}"] = [*configurations[CANDIDATE],
                                                         f"--standin_model_run_slots={args.run_slots}"]
    measured: dict[str, dict[str, list[dict[str, Any]]]] = {
        label: {str(c): [] for c in args.concurrency} for label in configurations
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for label, flags in configurations.items():
            # gRPC only (no REST API, no nginx): the target is the stand-in's gRPC side alone.
            config = dataclasses.replace(
                free_port_config(args.models_dir.resolve(), args.output_dir / f"{NAME}_logs" / label), tfs_rest_port=0
            )
            servers[label] = stack.enter_context(running_server(config, "tf", flags=flags, proxy=False))
            log.info("%s: stand-in at %s with %s", label, servers[label].grpc_target, flags or "its defaults")
        for round_index in range(args.rounds):
            for label, server in servers.items():  # A B (C) A B (C) ...: every round visits each configuration
                name = target_name(label)
                report = run(
                    LoadTestConfig(
                        targets=(parse_target(f"{name}={server.grpc_target}", "grpc"),),
                        concurrency=tuple(args.concurrency), duration_s=args.duration,
                        warmup_requests=args.warmup, labels={"source": NAME, "round": str(round_index + 1)},
                    ),
                    server_pids={name: server.pids},
                )
                for entry in report.to_dict()["results"]:
                    measured[label][str(int(entry["point"]))].append(round_figures(entry))
                log.info("round %d/%d: %s measured", round_index + 1, args.rounds, label)

    summaries = {label: {c: summarize(rounds) for c, rounds in per.items()} for label, per in measured.items()}
    result: dict[str, Any] = {
        "benchmark": NAME,
        "what": "the TF Serving stand-in's gRPC API (a Python server), not TensorFlow Serving",
        "client": "mnist_client.loadtest (the mnist-loadtest engine), closed loop, real MNIST test images",
        "model": {"base_path": str(base_path), "version": latest_version(base_path)},
        "cpus": usable_cpus(),
        "platform": platform.platform(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_requests": args.warmup,
        "configurations": configurations,
        "rounds_measured": measured,
        "summaries": summaries,
        "target": evaluate(summaries),
    }
    result["targets"] = list(result["target"]["checks"].values())  # for make bench's table (bench.run_all)
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
