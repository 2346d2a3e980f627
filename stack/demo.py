"""`make demo`: the whole stack on this machine, end to end, without Docker.

1. trains both models with the default settings if none is exported yet;
2. fits a power function's exponent in both frameworks (the example the comparison grew from);
3. measures both models in process, each on the path its server runs, at equal thread counts;
4. starts the PyTorch REST server (gunicorn), the TF Serving stand-in (gRPC and REST) and the web
   page (its URL is logged; it stops with the servers: `make serve` keeps it up);
5. load-tests three targets side by side (PyTorch REST, TensorFlow REST, TensorFlow gRPC; real MNIST
   test images, closed loop), each sweep point in rounds interleaved between the targets, recording
   who used the CPU in each round;
6. writes JSON, CSV and an HTML report, and prints a summary;
7. stops the servers and the page cleanly, also on Ctrl-C or SIGTERM.
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

from bench.inprocess import format_table as inprocess_table
from mnist_client.cpus import usable_cpus
from mnist_client.loadtest import LoadTestConfig, LoadTestError, run
from mnist_client.loadtest.cli import ProgressDisplay
from mnist_client.loadtest.printers.csv_out import write_csv
from mnist_client.loadtest.printers.html import format_html
from mnist_client.loadtest.printers.table import format_table
from serving.model_repository import latest_version
from stack import comparison, training_summary
from stack.comparison import serving_targets
from stack.config import REPO_ROOT, StackConfig
from stack.processes import StackError, stop_process
from stack.servers import running_stack
from training.cli import positive_int
from training.power_fit import PowerFitReport
from training.power_fit import format_table as format_power_fit
from training.power_fit import render_html as render_power_fit

log = logging.getLogger("stack.demo")

TF_SERVER = "tf-standin"  # what answers TensorFlow's targets here: the stand-in, never called TF Serving


def run_power_fit_example(config: StackConfig) -> PowerFitReport:
    """The power-function fit in both frameworks, in a subprocess (this process imports neither)."""
    out = config.report_dir / "power_fit.json"
    log.info("fitting a power function's exponent in both frameworks")
    subprocess.run([sys.executable, "-m", "training.power_fit", "--json", str(out)], check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL)
    return PowerFitReport.from_dict(json.loads(out.read_text()))


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
    parser.add_argument("--duration", type=_positive_float, default=4.0,
                        help="seconds per round of each target and sweep point")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="rounds per target and sweep point, interleaved between the targets")
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
        rows = training_summary.collect(config)
        power_fit = run_power_fit_example(config)
        inprocess = training_summary.run_inprocess_bench(config)
        targets = serving_targets(config.rest_url, config.tfs_rest_url, config.grpc_target, TF_SERVER)
        load_config = LoadTestConfig(
            targets=targets,
            concurrency=args.concurrency,
            duration_s=args.duration,
            repeats=args.repeats,
            labels={"source": "make demo"},
        )
        with running_stack(config) as stack:
            # Each target's server, so that every round tells its CPU from the load tester's and the rest's.
            pids = {targets[0].name: stack.rest.pids, targets[1].name: stack.grpc.pids,
                    targets[2].name: stack.grpc.pids}
            interrupts.in_load_test = True
            report = run(load_config, progress=ProgressDisplay(), stop=interrupts.stop, server_pids=pids)
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
    combined["inprocess"] = inprocess
    combined["power_fit"] = power_fit.to_dict()
    combined["framework_and_protocol"] = comparison.differences(report, TF_SERVER)
    json_path.write_text(json.dumps(combined, indent=2) + "\n")
    write_csv(report, config.report_dir / "demo.csv")
    page = format_html(
        report,
        title="MNIST: PyTorch vs TensorFlow, from training to serving",
        sections=[
            ("The first example: a power function's exponent by gradient descent", render_power_fit(power_fit)),
            ("Training", training_summary.format_html(rows)),
            ("In-process inference, each model on its server's path", training_summary.format_inprocess_html(inprocess)),
            ("Serving: what answered, framework and protocol", comparison.format_html(report, TF_SERVER)),
        ],
    )
    html_path = config.report_dir / "demo.html"
    html_path.write_text(page, encoding="utf-8")

    print("\nThe first example: a power function's exponent by gradient descent\n" + format_power_fit(power_fit))
    print("\nTraining\n" + training_summary.format_text(rows))
    print("\nIn-process inference, each model on its server's path\n" + inprocess_table(inprocess))
    print("\nServing (side by side)\n" + format_table(report))
    print("\n" + comparison.format_text(report, TF_SERVER))
    print(f"\nreports: {html_path}  {json_path}  {config.report_dir / 'demo.csv'}")
    print(f"see it in a browser: `make serve`, then open {config.web_url}/ (draw a digit) and "
          f"{config.web_url}/#report (this report)")
    if interrupts.stop.is_set():
        log.warning("interrupted during the load test; the report holds what was measured")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
