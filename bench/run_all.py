"""`make bench`: run every benchmark in one go and write their JSON side by side.

Each benchmark is a module ``bench/<name>.py`` with ``main(argv) -> dict``; it
prints its own table and writes ``<output-dir>/<name>.json``. This runner adds
a ``summary.json`` naming what ran, what failed and how long each took.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
import traceback
from pathlib import Path

from bench.targets import format_targets
from mnist_client import contract
from serving.model_repository import latest_version, model_base_path

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Order matters only for reading the output: training first, then the
# in-process floor, then the servers measured against it, then the load tester.
BENCHMARKS = (
    "train_throughput",
    "inprocess",
    "rest_server",
    "torchserve_peer",  # skips, saying what to install, where Java, TorchServe or wrk is missing
    "grpc_standin",
    "serving_alone",  # the demo's three targets, each server alone on the machine
    "client_rest_formats",
    "client_cost",  # each client's single-image predict beside the load tester's engine (target: +0.3 ms at most)
    "loadtester_vs_wrk",
)
# Not here: bench.soak (minutes long; run it on its own) and bench.client_footprint (installs into a
# fresh virtual environment from the package index).


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run just these benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    for framework in (contract.TORCH_FRAMEWORK_DIR, contract.TF_FRAMEWORK_DIR):
        base = model_base_path(args.models_dir, framework, contract.MODEL_NAME)
        if latest_version(base) is None:
            parser.error(f"no exported model under {base}; run `make train` first (or pass --models-dir)")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"benchmarks": {}, "targets": []}
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        started = time.monotonic()
        try:
            result = module.main(["--output-dir", str(args.output_dir), "--models-dir", str(args.models_dir)])
            # A benchmark whose tools are missing says what to install and returns {"skipped": [...]}.
            status = "skipped" if isinstance(result, dict) and result.get("skipped") else "ok"
        except Exception:  # one broken benchmark must not hide the others' figures
            log.error("benchmark %s failed:\n%s", name, traceback.format_exc())
            status = "failed"
        summary["benchmarks"][name] = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        if status == "ok" and isinstance(result, dict) and isinstance(result.get("targets"), list):
            summary["targets"].extend({"benchmark": name, **t} for t in result["targets"])
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["targets"]:
        # Every target of every benchmark in one place, each measured as a ratio within its own run.
        print(format_targets(summary["targets"], f"targets, {len(summary['targets'])} in all"))
    failed = [n for n, s in summary["benchmarks"].items() if s["status"] == "failed"]
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)} (see the log above)")
    return summary


if __name__ == "__main__":
    main()
