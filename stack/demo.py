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

from mnist_client.cpus import usable_cpus
from mnist_client.loadtest import LoadTestConfig, LoadTestError, parse_target, run
from mnist_client.loadtest.cli import ProgressDisplay
from mnist_client.loadtest.printers.csv_out import write_csv
from mnist_client.loadtest.printers.html import format_html
from mnist_client.loadtest.printers.table import format_table
from serving.model_repository import latest_version
from stack import training_summary
from stack.config import REPO_ROOT, StackConfig
from stack.processes import StackError, stop_process
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


TRAINERS = (("pytorch", "training.train_torch"), ("tensorflow", "training.train_tf"))


def train_missing(config: StackConfig, extra: list[str]) -> None:
    """Train each framework that has no export yet, with its progress on this terminal.

    When both are missing they train at the same time, each pinned to half the cores: neither
    framework's batch-128 step gains more than 1.7x from a second thread, so on 2 cores this finishes
    both sooner than one after the other with both cores each (figures in the README's Training).
    Output lines are prefixed with the framework. A failure of one is reported after the other
    finishes (its export is kept and reused next time); Ctrl-C stops both.
    """
    bases = {"pytorch": config.torch_base_path, "tensorflow": config.tf_base_path}
    missing = []
    for framework, module in TRAINERS:
        version = latest_version(bases[framework])
        if version is not None:
            log.info("using the exported model in %s (version %d)", bases[framework], version)
        else:
            log.info("no model in %s: training it now (%s)", bases[framework], module)
            missing.append((framework, module))
    if not missing:
        return
    threads = None  # alone: the trainer's own default
    if len(missing) > 1:
        threads = max(1, usable_cpus() // len(missing))
        log.info("training both at once, %d CPU thread(s) each", threads)
    running: list[tuple[str, subprocess.Popen[bytes], threading.Thread]] = []
    try:
        for framework, module in missing:
            cmd = [
                sys.executable, "-m", module, "--output-dir", str(config.models_dir),
                "--log-dir", str(REPO_ROOT / "runs"),
                *(["--num-threads", str(threads)] if threads else []),
                *extra,  # last, so the caller's flags win
            ]  # fmt: skip
            process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            pump = threading.Thread(target=_relay, args=(process, f"[{framework}] "), daemon=True)
            pump.start()
            running.append((framework, process, pump))
        failed = []
        for framework, process, pump in running:
            status = process.wait()
            pump.join()
            if status != 0:
                failed.append(f"{framework} training exited with status {status}")
    finally:
        for _, process, _ in running:
            stop_process(process)
    if failed:
        raise StackError("; ".join(failed) + " (its output is above, prefixed with the framework)")


_OUTPUT_LOCK = threading.Lock()


def _relay(process: subprocess.Popen[bytes], prefix: str) -> None:
    """Copy a trainer's output to this terminal line by line, each line prefixed."""
    assert process.stdout is not None
    for raw in iter(process.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        with _OUTPUT_LOCK:
            sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()


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
    print(f"see it in a browser: `make serve`, then open {config.web_url}/ (draw a digit) and "
          f"{config.web_url}/#report (this report)")
    if interrupts.stop.is_set():
        log.warning("interrupted during the load test; the report holds what was measured")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
