"""The demo's three serving targets measured with each server alone on the machine.

``make demo`` loads three targets while the whole local stack runs (both servers and the web page).
This benchmark starts one server at a time through the same launcher (``stack.servers.running_server``),
loads its targets with the same load-test settings as the demo (closed loop, the same sweep and
duration), and stops it before the next one starts: the figures of each server with nothing else of
the stack beside it. The rounds alternate between the servers (PyTorch, TensorFlow, PyTorch, ...,
each started afresh for its round), so a drift of the machine falls on both alike. Given a demo report (``--demo-report reports/demo.json``), it prints
the demo's medians over these, point by point, so a reader sees whether the demo measured the
servers or something besides them::

    python -m bench.serving_alone --demo-report reports/demo.json
"""

from __future__ import annotations

import argparse
import logging
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.results import write_result
from mnist_client.cpus import usable_cpus
from mnist_client.loadtest import LoadTestConfig, load_report, merge_reports, run
from mnist_client.loadtest.report import Report
from stack.comparison import serving_targets
from stack.config import REPO_ROOT, StackConfig
from stack.processes import free_port
from stack.servers import running_server
from training.cli import positive_int

log = logging.getLogger("bench.serving_alone")

NAME = "serving_alone"
TF_SERVER = "tf-standin"
# A demo median this far from the same server's median alone did not measure the server alone.
AGREEMENT_LIMIT = 0.25


def _figures(report: Report) -> dict[str, dict[str, dict[str, float]]]:
    """target -> point -> {"p50_ms": median, "throughput_rps": median, "spread_*": spread} over the rounds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in report.measurements:
        stats = m.round_stats()
        out.setdefault(m.target, {})[f"{m.point:g}"] = {
            "p50_ms": stats["p50_ms"]["median"],
            "throughput_rps": stats["throughput_rps"]["median"],
            "spread_p50": stats["p50_ms"]["spread"],
            "spread_rps": stats["throughput_rps"]["spread"],
            "rounds": len(m.rounds),
            "flags": m.flags(),
        }
    return out


def against_demo(alone: dict[str, Any], demo: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target and point that both measured: the demo's median over the one measured alone."""
    rows = []
    for target, points in alone.items():
        for point, figures in points.items():
            other = demo.get(target, {}).get(point)
            if other is None:
                continue
            p50 = other["p50_ms"] / figures["p50_ms"]
            rps = other["throughput_rps"] / figures["throughput_rps"]
            rows.append({"target": target, "point": point, "demo_over_alone_p50": round(p50, 3),
                         "demo_over_alone_rps": round(rps, 3),
                         "within_limit": abs(p50 - 1) <= AGREEMENT_LIMIT and abs(rps - 1) <= AGREEMENT_LIMIT})
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'target':<18}{'conc':>6}{'p50 ms':>10}{'spread':>8}{'req/s':>10}{'spread':>8}  flags"]
    for target, points in result["alone"].items():
        for point, f in points.items():
            lines.append(f"{target:<18}{point:>6}{f['p50_ms']:>10.3f}{100 * f['spread_p50']:>7.0f}%"
                         f"{f['throughput_rps']:>10.1f}{100 * f['spread_rps']:>7.0f}%  {'; '.join(f['flags']) or '-'}")
    if result.get("against_demo"):
        lines += ["", f"demo over alone (medians; within {100 * AGREEMENT_LIMIT:.0f}% counts as the same):"]
        for row in result["against_demo"]:
            mark = "ok" if row["within_limit"] else "OFF"
            lines.append(f"{row['target']:<18}{row['point']:>6}  p50 {row['demo_over_alone_p50']:.2f}x  "
                         f"req/s {row['demo_over_alone_rps']:.2f}x  {mark}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_alone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root (latest versions)")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 16],
                        help="closed-loop sweep (the demo's by default)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per round (the demo's by default)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds per target and point")
    parser.add_argument("--warmup", type=positive_int, default=200,
                        help="unmeasured calls before each point (every round starts its server afresh)")
    parser.add_argument("--demo-report", type=Path, default=None,
                        help="a make demo result file (reports/demo.json) to set these figures beside")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = replace(StackConfig.from_env(), models_dir=args.models_dir.resolve(),
                   log_dir=args.output_dir / "serving_alone_logs")
    # Each round starts its server and the load tester's workers afresh (the demo's run once, and only
    # its first round is that cold), so each point gets a longer unmeasured warm-up than the demo's 20.
    settings = dict(concurrency=tuple(args.concurrency), duration_s=args.duration, warmup_requests=args.warmup,
                    labels={"source": "bench.serving_alone"})
    rounds: list[Report] = []
    for _ in range(args.repeats):
        # Fresh ports each round: a port just closed may linger in TIME_WAIT.
        config = replace(base, rest_port=free_port(), grpc_port=free_port(), tfs_rest_port=free_port())
        torch_rest, tf_rest, tf_grpc = serving_targets(config.rest_url, config.tfs_rest_url, config.grpc_target,
                                                       TF_SERVER)
        for which, targets in (("torch", (torch_rest,)), ("tf", (tf_rest, tf_grpc))):
            with running_server(config, which) as server:  # type: ignore[arg-type]
                rounds.append(run(LoadTestConfig(targets=targets, **settings),
                                  server_pids={t.name: server.pids for t in targets}))
    alone = _figures(merge_reports(rounds))
    result: dict[str, Any] = {
        "benchmark": NAME,
        "settings": {**settings, "concurrency": list(args.concurrency), "repeats": args.repeats, "mode": "closed"},
        "cpus": usable_cpus(),
        "platform": platform.platform(),
        "alone": alone,
    }
    if args.demo_report is not None:
        demo = _figures(load_report(args.demo_report))
        result["demo_report"] = str(args.demo_report)
        result["against_demo"] = against_demo(alone, demo)
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
