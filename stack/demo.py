"""`make demo`: the whole stack on this machine, end to end, without Docker.

1. trains both models with the default settings if none is exported yet;
2. measures both models in-process (the latency floor);
3. starts the PyTorch REST server (gunicorn) and the TF Serving gRPC stand-in;
4. runs the side-by-side load test (real MNIST test images, closed loop);
5. writes JSON, CSV and an HTML report that also compares training, and prints a summary;
6. stops both servers cleanly, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
from types import FrameType

from mnist_client.loadtest import LoadTestConfig, LoadTestError, parse_target, run
from mnist_client.loadtest.cli import ProgressDisplay
from mnist_client.loadtest.printers.csv_out import write_csv
from mnist_client.loadtest.printers.html import format_html
from mnist_client.loadtest.printers.table import format_table
from serving.model_repository import latest_version
from stack import training_summary
from stack.config import REPO_ROOT, StackConfig
from stack.processes import StackError
from stack.servers import running_stack

log = logging.getLogger("stack.demo")


class _Interrupts:
    """Ctrl-C / SIGTERM: stop the load test gracefully when it runs, otherwise unwind at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.in_load_test = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        if not self.in_load_test:
            raise KeyboardInterrupt


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=_positive_ints, default=(1, 4, 16), help="closed-loop sweep")
    parser.add_argument("--duration", type=_positive_float, default=10.0, help="seconds per target and sweep point")
    parser.add_argument(
        "--train-args", default="", help="extra flags for both trainers when they run (e.g. '--epochs 1')"
    )
    return parser


def train_missing(config: StackConfig, extra: list[str]) -> None:
    """Run each framework's trainer (with its progress on this terminal) if it has no export yet."""
    for module, base in (("training.train_torch", config.torch_base_path), ("training.train_tf", config.tf_base_path)):
        if latest_version(base) is not None:
            log.info("using the exported model in %s (version %d)", base, latest_version(base))
            continue
        log.info("no model in %s: training it now (%s)", base, module)
        cmd = [
            sys.executable, "-m", module, "--output-dir", str(config.models_dir),
            "--log-dir", str(REPO_ROOT / "runs"), *extra,
        ]  # fmt: skip
        result = subprocess.run(cmd, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise StackError(f"{module} failed with exit status {result.returncode}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    interrupts = _Interrupts()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupts)
    try:
        config = StackConfig.from_env()
        train_missing(config, args.train_args.split())
        rows = training_summary.collect(config, training_summary.run_inprocess_bench(config))
        load_config = LoadTestConfig(
            targets=(
                parse_target(f"pytorch-rest={config.rest_url}", "rest"),
                parse_target(f"tfserving-grpc={config.grpc_target}", "grpc"),
            ),
            concurrency=args.concurrency,
            duration_s=args.duration,
            labels={"source": "make demo"},
        )
        with running_stack(config):
            interrupts.in_load_test = True
            report = run(load_config, progress=ProgressDisplay(), stop=interrupts.stop)
            interrupts.in_load_test = False
    except KeyboardInterrupt:
        log.warning("interrupted; servers stopped")
        return 130
    except (StackError, LoadTestError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    except subprocess.CalledProcessError as exc:
        log.error("%s failed with exit status %d", " ".join(map(str, exc.cmd)), exc.returncode)
        return 1

    config.report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report.save(config.report_dir / "demo.json")
    combined = json.loads(json_path.read_text())
    combined["training_comparison"] = rows
    json_path.write_text(json.dumps(combined, indent=2) + "\n")
    write_csv(report, config.report_dir / "demo.csv")
    page = format_html(
        report,
        title="MNIST: PyTorch vs TensorFlow, from training to serving",
        sections=[("Training and in-process inference", training_summary.format_html(rows))],
    )
    html_path = config.report_dir / "demo.html"
    html_path.write_text(page, encoding="utf-8")

    print("\nTraining and in-process inference\n" + training_summary.format_text(rows))
    print("\nServing (side by side)\n" + format_table(report))
    print(f"\nreports: {html_path}  {json_path}  {config.report_dir / 'demo.csv'}")
    if interrupts.stop.is_set():
        log.warning("interrupted during the load test; the report holds what was measured")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
