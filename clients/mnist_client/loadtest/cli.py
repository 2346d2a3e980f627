"""``mnist-loadtest``: the command line, a thin layer over :func:`mnist_client.loadtest.run`.

Subcommands: ``run`` (load one or more targets), ``merge`` (add result files exactly), ``compare``
(a candidate result against a baseline). Exit status: 0 passed, 1 a threshold or comparison limit
failed, 2 bad arguments or settings, 3 the run or the files could not be used (unreachable target,
missing data, unreadable result file), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from mnist_client.loadtest.compare import CompareLimits, compare_reports, format_comparison
from mnist_client.loadtest.config import LoadTestConfig, Thresholds, parse_list, parse_target
from mnist_client.loadtest.errors import ConfigError, LoadTestError
from mnist_client.loadtest.merge import merge_files
from mnist_client.loadtest.printers import format_table, write_csv, write_html
from mnist_client.loadtest.report import Report, load_report
from mnist_client.loadtest.runner import Progress, run
from mnist_client.loadtest.security import TOKEN_ENV, Security, resolve_token

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

RUN_EPILOG = f"""\
examples:
  # both servers side by side, closed loop at 1 and 8 requests in flight, 10 s each
  mnist-loadtest run --rest http://127.0.0.1:8080 --grpc 127.0.0.1:8500 --concurrency 1,8
  # open loop at 100 and 200 requests/s for 30 s each; keep the result file for merge/compare
  mnist-loadtest run --rest http://127.0.0.1:8080 --rate 100,200 --duration 30 --json result.json
  # a gate for CI: exit status 1 if p99 exceeds 50 ms or served accuracy falls below 0.98
  mnist-loadtest run --rest torch=http://127.0.0.1:8080 --requests 2000 --max-p99-ms 50 --min-accuracy 0.98
  # MNIST from a local copy instead of the download cache
  mnist-loadtest run --grpc 127.0.0.1:8500 --data-dir /data/mnist

MNIST test images: --data-dir, else $MNIST_DATA_DIR, else downloaded once (MD5-checked) into
$MNIST_CACHE_DIR/mnist (default ~/.cache/mnist-serving/mnist) from the public mirrors or $MNIST_MIRRORS.

exit status:
  {EXIT_OK}    the run finished and every threshold given passed
  {EXIT_FAILED}    a threshold failed (the table and the output files are still written)
  {EXIT_USAGE}    bad arguments or settings
  {EXIT_ERROR}    the run could not be made: a target did not answer the pre-flight call, the MNIST files
       are missing, corrupt or could not be downloaded, a worker process failed
  {EXIT_INTERRUPTED}  interrupted: the first Ctrl-C ends the current measurement and reports what was measured
       (status {EXIT_FAILED} instead if a threshold failed); a second one aborts at once
"""
MERGE_EPILOG = f"""\
example:
  mnist-loadtest merge results/ --json merged.json --html merged.html --max-p99-ms 50

exit status: {EXIT_OK} merged (and every threshold given passed), {EXIT_FAILED} a threshold failed, {EXIT_USAGE} bad
arguments, {EXIT_ERROR} a result file cannot be used (unreadable, not a result, incompatible with the others).
"""
COMPARE_EPILOG = f"""\
example:
  mnist-loadtest compare baseline.json candidate.json --max-p99-increase 10 --max-throughput-decrease 5

exit status: {EXIT_OK} within every limit given, {EXIT_FAILED} a limit was passed, {EXIT_USAGE} bad arguments,
{EXIT_ERROR} a result file cannot be used.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends an option's default where it says something; for a flag, an empty list or None the help
    text says itself what happens when the option is not given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or default == []):
            return text
        return f"{text} (default: %(default)s)"


def _add_thresholds(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("thresholds (exit status 1 when any is passed)")
    group.add_argument("--max-p50-ms", type=float, metavar="MS",
                       help="fail if any p50 latency exceeds this (default: no limit)")
    group.add_argument("--max-p99-ms", type=float, metavar="MS",
                       help="fail if any p99 latency exceeds this (default: no limit)")
    group.add_argument("--max-error-rate", type=float, metavar="FRACTION",
                       help="fail if any target's failed/completed requests exceeds this, 0..1 (default: no limit)")
    group.add_argument("--min-accuracy", type=float, metavar="FRACTION",
                       help="fail if a target's served accuracy on the MNIST labels is below this, 0..1 "
                            "(default: no limit)")
    group.add_argument("--min-agreement", type=float, metavar="FRACTION",
                       help="fail if two targets classify the same images alike less often than this, 0..1 "
                            "(default: no limit)")
    group.add_argument("--min-throughput", type=float, metavar="RPS",
                       help="fail if any throughput is below this (default: no limit)")


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outputs (the table always goes to stdout)")
    group.add_argument("--json", type=Path, metavar="FILE",
                       help="write the result file, input of merge/compare (default: not written)")
    group.add_argument("--csv", type=Path, metavar="FILE",
                       help="write one CSV row per target and sweep point (default: not written)")
    group.add_argument("--html", type=Path, metavar="FILE",
                       help="write a self-contained HTML report with charts (default: not written)")


def _add_security(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "TLS and token (TLS per target: https://HOST:PORT for REST, grpcs://HOST:PORT for gRPC)")
    group.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="CA bundle that verifies the servers' certificates (default: the system store)")
    group.add_argument("--insecure", action="store_true",
                       help="https without verifying the server (warns; testing only; not for gRPC)")
    group.add_argument("--client-cert", type=Path, metavar="PEM",
                       help="client certificate for mutual TLS (default: none)")
    group.add_argument("--client-key", type=Path, metavar="PEM", help="its private key (default: none)")
    group.add_argument("--token", metavar="TOKEN",
                       help=f"bearer token for every request (visible in the process list: prefer --token-file "
                            f"or ${TOKEN_ENV}; default: --token-file, else ${TOKEN_ENV}, else none)")
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help="read the bearer token from this file's first line (default: none)")


INSECURE_WARNING = (
    "WARNING: --insecure: the servers' certificates are NOT verified; anyone on the path can read and "
    "change the traffic, the bearer token included. Use --ca-file outside of tests."
)


def security_from_args(args: argparse.Namespace) -> Security:
    """TLS files and the token of ``run``'s arguments (the token: option, file, then $MNIST_LOADTEST_TOKEN)."""
    token = resolve_token(args.token, args.token_file)
    security = Security(ca_file=args.ca_file, insecure=args.insecure, client_cert=args.client_cert,
                        client_key=args.client_key, token=token)
    if security.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    return security


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-loadtest",
        description="Load-test the MNIST REST and gRPC servers side by side.",
        epilog="'mnist-loadtest COMMAND --help' lists a command's options, examples and exit status.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    # -v also after the subcommand; SUPPRESS keeps a -v given before it when none comes after.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,merge,compare}")

    p = commands.add_parser("run", help="load one or more targets", parents=[verbose], epilog=RUN_EPILOG,
                            formatter_class=HelpFormatter)
    p.add_argument("--rest", action="append", default=[], metavar="[NAME=]URL",
                   help="REST target, e.g. http://127.0.0.1:8080 (repeatable; default name 'rest')")
    p.add_argument("--grpc", action="append", default=[], metavar="[NAME=]HOST:PORT",
                   help="gRPC target, e.g. 127.0.0.1:8500 or dns:///svc:8500 (repeatable; default name 'grpc')")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1", metavar="N[,N...]",
                      help="closed loop: requests in flight; a list sweeps")
    load.add_argument("--rate", metavar="R[,R...]",
                      help="open loop: arrivals per second; a list sweeps (default: closed loop, --concurrency)")
    p.add_argument("--max-in-flight", type=int, default=256, metavar="N", help="open loop: most outstanding requests")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=float, metavar="SECONDS",
                        help="measure each target and sweep point this long (default 10 unless --requests)")
    amount.add_argument("--requests", type=int, metavar="N",
                        help="measure each target and sweep point N requests (default: by --duration)")
    p.add_argument("--warmup", type=int, default=20, metavar="N", help="unmeasured calls before each measurement")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="measured rounds per target and sweep point, alternating between targets; the report "
                        "gives each point's median and spread over its rounds and flags a spread above 20%%")
    p.add_argument("--server-pid", action="append", default=[], metavar="NAME=PID",
                   help="process id of the server behind target NAME (repeatable, also for one NAME: a proxy and "
                        "its server): each round then tells the server's CPU (its processes and their children) "
                        "from the load tester's and other processes', and flags CPU taken from it (default: none)")
    p.add_argument("--images-per-request", type=int, default=1, metavar="K",
                   help="MNIST images in each request, the batch the server sees, 1..10000")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request not answered in this time counts as a deadline_exceeded error")
    p.add_argument("--processes", type=int, metavar="N", help="worker processes (default: from load and CPUs)")
    p.add_argument("--rest-format", choices=("json", "npy"), default="json",
                   help="REST body: JSON instances, or .npy (PyTorch server only)")
    p.add_argument("--model-version", type=int, metavar="N", help="pin a model version (default: latest)")
    p.add_argument("--distinct-images", type=int, default=1000, metavar="N",
                   help="MNIST test images the payload cycles through (1..10000)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="directory with the gzipped MNIST test files (default: $MNIST_DATA_DIR, else a shared "
                        "copy, else the download cache: see below)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="tag copied into the report, repeatable (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / status lines on stderr")
    _add_security(p)
    _add_outputs(p)
    _add_thresholds(p)

    m = commands.add_parser("merge", help="merge result files exactly (HDR histograms, not percentiles)",
                            parents=[verbose], epilog=MERGE_EPILOG, formatter_class=HelpFormatter)
    m.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="result files, or directories of *.json")
    _add_outputs(m)
    _add_thresholds(m)

    c = commands.add_parser("compare", help="compare a candidate result against a baseline",
                            parents=[verbose], epilog=COMPARE_EPILOG, formatter_class=HelpFormatter)
    c.add_argument("baseline", type=Path, help="result file of the reference run (mnist-loadtest run --json)")
    c.add_argument("candidate", type=Path, help="result file of the run to judge against it")
    c.add_argument("--max-p50-increase", type=float, metavar="PCT",
                   help="fail if a p50 grew by more than PCT%% (default: no limit)")
    c.add_argument("--max-p99-increase", type=float, metavar="PCT",
                   help="fail if a p99 grew by more than PCT%% (default: no limit)")
    c.add_argument("--max-throughput-decrease", type=float, metavar="PCT",
                   help="fail if a throughput fell by more than PCT%% (default: no limit)")
    c.add_argument("--max-error-rate-increase", type=float, metavar="FRACTION",
                   help="fail if an error rate grew by more than this, absolute, 0..1 (default: no limit)")
    c.add_argument("--json", type=Path, metavar="FILE", help="write the comparison as JSON (default: not written)")
    return parser


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    """The validated config for ``run``'s arguments (raises :class:`ConfigError`)."""
    targets = [parse_target(spec, "rest") for spec in args.rest] + [parse_target(spec, "grpc") for spec in args.grpc]
    if not targets:
        raise ConfigError("no target given; expected --rest URL and/or --grpc HOST:PORT")
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    open_loop = args.rate is not None
    return LoadTestConfig(
        targets=tuple(targets),
        mode="open" if open_loop else "closed",
        concurrency=() if open_loop else parse_list(args.concurrency, int, "--concurrency"),
        rates=parse_list(args.rate, float, "--rate") if open_loop else (),
        max_in_flight=args.max_in_flight,
        duration_s=args.duration,
        requests=args.requests,
        warmup_requests=args.warmup,
        repeats=args.repeats,
        images_per_request=args.images_per_request,
        timeout_s=args.timeout,
        processes=args.processes,
        rest_format=args.rest_format,
        model_version=args.model_version,
        distinct_images=args.distinct_images,
        data_dir=args.data_dir,
        labels=labels,
        security=security_from_args(args),
    )


def thresholds_from_args(args: argparse.Namespace) -> Thresholds:
    return Thresholds(
        max_p50_ms=args.max_p50_ms,
        max_p99_ms=args.max_p99_ms,
        max_error_rate=args.max_error_rate,
        min_accuracy=args.min_accuracy,
        min_agreement=args.min_agreement,
        min_throughput_rps=args.min_throughput,
    )


class ProgressDisplay:
    """A tqdm bar per phase on a terminal; a status line every few seconds otherwise (CI logs)."""

    def __init__(self, stream: TextIO = sys.stderr, interval_s: float = 5.0) -> None:
        self._stream = stream
        self._interval_s = interval_s
        self._bar: Any = None
        self._phase = 0
        self._last_line = 0.0
        self._tqdm = None
        if stream.isatty():
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                self._tqdm = None

    def __call__(self, p: Progress) -> None:
        label = f"[{p.phase}/{p.phases}] {p.target} {'c=' if p.mode == 'closed' else 'rate='}{p.point:g}"
        by_count = p.total_requests is not None
        done = p.completed if by_count else min(p.elapsed_s, p.duration_s or 0.0)
        rps = p.completed / p.elapsed_s if p.elapsed_s > 0 else 0.0
        if self._tqdm is not None:
            if p.phase != self._phase:
                self.close()
                self._phase = p.phase
                self._bar = self._tqdm(total=p.total_requests if by_count else p.duration_s, desc=label,
                                       unit="req" if by_count else "s", file=self._stream, leave=True,
                                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}{postfix}]")
            self._bar.n = done
            self._bar.set_postfix_str(f"{p.completed} req, {p.errors} err, {rps:.0f} req/s", refresh=True)
            if p.finished:
                self.close()
            return
        now = time.monotonic()
        if p.phase != self._phase:  # the first line of a phase comes after one interval, not at once
            self._phase = p.phase
            self._last_line = now
        if p.finished or now - self._last_line >= self._interval_s:
            self._last_line = now
            state = "done" if p.finished else f"{p.elapsed_s:.1f}s"
            print(f"{label}: {state}, {p.completed} requests, {p.errors} errors, {rps:.0f} req/s",
                  file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _write_outputs(report: Report, args: argparse.Namespace, failures: list[str] | None) -> None:
    if args.json:
        report.save(args.json)
    if args.csv:
        write_csv(report, args.csv)
    if args.html:
        write_html(report, args.html, failures=failures)


def _finish(report: Report, args: argparse.Namespace, out: TextIO) -> int:
    thresholds = thresholds_from_args(args)
    failures = report.check(thresholds) if thresholds.any() else []
    out.write(format_table(report))
    _write_outputs(report, args, failures if thresholds.any() else None)
    if failures:
        for failure in failures:
            out.write(f"FAIL {failure}\n")
        return EXIT_FAILED
    if thresholds.any():
        out.write("all thresholds passed\n")
    return EXIT_OK


def server_pids_from_args(args: argparse.Namespace, config: LoadTestConfig) -> dict[str, list[int]]:
    """``--server-pid NAME=PID`` items -> {target name: [pid, ...]}, each naming a target of the run
    (a target may name several processes, e.g. a proxy and the server behind it)."""
    names = {t.name for t in config.targets}
    pids: dict[str, list[int]] = {}
    for item in args.server_pid:
        name, sep, pid = item.partition("=")
        if not sep or name not in names or not pid.isdigit() or int(pid) < 1:
            raise ConfigError(f"--server-pid {item!r}: expected NAME=PID with NAME one of {sorted(names)} and PID "
                              "a process id")
        pids.setdefault(name, []).append(int(pid))
    return pids


def _command_run(args: argparse.Namespace, out: TextIO) -> int:
    config = config_from_args(args)
    thresholds_from_args(args)  # validate before spending minutes on the run
    stop = threading.Event()
    display = None if args.no_progress else ProgressDisplay()

    def on_interrupt(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\ninterrupted: finishing the current measurement (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        report = run(config, progress=display, stop=stop, server_pids=server_pids_from_args(args, config))
    finally:
        if display is not None:
            display.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    code = _finish(report, args, out)
    return EXIT_INTERRUPTED if stop.is_set() and code == EXIT_OK else code


def _command_merge(args: argparse.Namespace, out: TextIO) -> int:
    thresholds_from_args(args)
    return _finish(merge_files(args.inputs, exclude=args.json), args, out)


def _command_compare(args: argparse.Namespace, out: TextIO) -> int:
    limits = CompareLimits(
        max_p50_increase_pct=args.max_p50_increase,
        max_p99_increase_pct=args.max_p99_increase,
        max_throughput_decrease_pct=args.max_throughput_decrease,
        max_error_rate_increase=args.max_error_rate_increase,
    )
    comparison = compare_reports(load_report(args.baseline), load_report(args.candidate), limits)
    out.write(format_comparison(comparison))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
    return EXIT_FAILED if comparison.failures else EXIT_OK


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to ``sys.exit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    commands = {"run": _command_run, "merge": _command_merge, "compare": _command_compare}
    try:
        return commands[args.command](args, out)
    except ConfigError as exc:
        print(f"mnist-loadtest {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LoadTestError as exc:
        print(f"mnist-loadtest {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mnist-loadtest: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
