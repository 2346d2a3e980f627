"""What the compose test checks once the stack is up: the load-test report, and both servers from the host.

- :func:`loadtest_arguments` takes the ``loadtest`` service's own command (from ``docker compose
  config``) and changes only how long each sweep point runs and where the reports go, so the test runs
  the service's targets, sweep and thresholds.
- :func:`check_report` reads the result file the service wrote and lists every problem: a target that
  is missing or answered nothing, any failed request, a served accuracy below the limit.
- :func:`call_servers` calls both published ports from the host through the client package
  (``RestClient`` on the PyTorch server, ``GrpcClient`` on the TF Serving side) with real MNIST test
  images and checks what they answer.
- :func:`slow_clients` holds 72 slow or idle connections to each published port while timing ordinary
  calls from the host (bench/slow_clients.py): none may fail, and their p99 may rise at most 100 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_client.errors import MnistClientError
from mnist_client.grpc_client import GrpcClient
from mnist_client.loadtest.errors import ResultFileError
from mnist_client.loadtest.report import load_report
from mnist_client.rest import RestClient

MIN_ACCURACY = 0.98
REPORT_OPTIONS = {"--json": "json", "--html": "html", "--csv": "csv"}


class CheckFailed(Exception):
    """The stack answered, but not as it should; the message lists every problem found."""


def _option_value(command: Sequence[str], option: str) -> str:
    if option not in command or command.index(option) + 1 >= len(command):
        raise CheckFailed(f"the loadtest service's command has no {option} VALUE: {list(command)}")
    return command[command.index(option) + 1]


def loadtest_arguments(command: Sequence[str], duration_s: float, report_stem: str) -> list[str]:
    """The service's command with ``--duration`` set and the reports renamed to ``/reports/<stem>.<ext>``."""
    arguments = list(command)
    _option_value(arguments, "--duration")
    arguments[arguments.index("--duration") + 1] = f"{duration_s:g}"
    for option, extension in REPORT_OPTIONS.items():
        if option in arguments:
            folder = Path(_option_value(arguments, option)).parent
            arguments[arguments.index(option) + 1] = str(folder / f"{report_stem}.{extension}")
    return arguments


def report_path_in_container(arguments: Sequence[str]) -> str:
    """Where the load test writes its result file (``--json``) inside its container."""
    return _option_value(arguments, "--json")


def expected_targets(arguments: Sequence[str]) -> list[str]:
    """Target names of the load-test command (``--rest NAME=URL``, ``--grpc NAME=HOST:PORT``)."""
    names = []
    for index, argument in enumerate(arguments[:-1]):
        if argument in ("--rest", "--grpc"):
            value = arguments[index + 1]
            names.append(value.partition("=")[0] if "=" in value else argument.lstrip("-"))
    return names


def check_report(path: Path, targets: Sequence[str], min_accuracy: float = MIN_ACCURACY) -> list[str]:
    """Every problem of the load-test result file at ``path``; empty when both targets passed."""
    try:
        report = load_report(path)
    except ResultFileError as exc:
        return [str(exc)]
    problems = []
    for target in targets:
        measurements = [m for m in report.measurements if m.target == target]
        if not measurements:
            problems.append(f"{target}: not in the report (it holds {report.targets})")
            continue
        answered = sum(m.ok for m in measurements)
        failed = sum(m.requests - m.ok for m in measurements)
        if answered == 0:
            problems.append(f"{target}: no request answered")
        if failed:
            problems.append(f"{target}: {failed} of {answered + failed} requests failed")
        accuracy = report.accuracy(target)
        if accuracy is None or accuracy < min_accuracy:
            shown = "none" if accuracy is None else f"{accuracy:.4f}"
            problems.append(f"{target}: served accuracy {shown} < {min_accuracy:g}")
    return problems


def summarise_report(path: Path) -> list[dict[str, object]]:
    """One row per target and sweep point: requests, errors, p50/p99 ms, requests/s."""
    report = load_report(path)
    rows = []
    for m in report.measurements:
        latency = m.latency_ms() if m.ok else {}
        rows.append(
            {
                "target": m.target,
                "point": m.point,
                "requests": m.requests,
                "errors": m.requests - m.ok,
                "p50_ms": latency.get("p50"),
                "p99_ms": latency.get("p99"),
                "rps": m.throughput_rps,
                "accuracy": report.accuracy(m.target),
            }
        )
    return rows


@dataclass(frozen=True)
class ServerAnswer:
    """What one server answered from the host."""

    name: str
    address: str
    model_version: int | None
    accuracy: float
    classes: np.ndarray


def call_servers(
    rest_url: str,
    grpc_target: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    min_accuracy: float = MIN_ACCURACY,
    ready_timeout_s: float = 60.0,
) -> list[ServerAnswer]:
    """Predict ``images`` on both servers through the client package; CheckFailed lists what went wrong."""
    answers: list[ServerAnswer] = []
    problems: list[str] = []
    clients = (
        ("torch-rest", rest_url, RestClient(rest_url)),
        ("tf-standin-grpc", grpc_target, GrpcClient(grpc_target)),  # the local build runs the stand-in
    )
    for name, address, client in clients:
        with client:
            try:
                client.wait_until_ready(ready_timeout_s)
                prediction = client.predict(images)
                statuses = client.model_status()
            except MnistClientError as exc:
                problems.append(f"{name} ({address}): {type(exc).__name__}: {exc}")
                continue
        accuracy = float(np.mean(prediction.classes == labels))
        available = [s.version for s in statuses if s.available]
        version = prediction.model_version if prediction.model_version is not None else max(available, default=None)
        answers.append(ServerAnswer(name, address, version, accuracy, prediction.classes))
        if accuracy < min_accuracy:
            problems.append(
                f"{name} ({address}): accuracy {accuracy:.4f} on {len(labels)} test images < {min_accuracy:g}"
            )
        if not available:
            problems.append(f"{name} ({address}): no model version AVAILABLE ({statuses})")
    if problems:
        raise CheckFailed("; ".join(problems))
    return answers


def agreement(answers: Sequence[ServerAnswer]) -> float:
    """Share of images on which the servers gave the same class."""
    first, *rest = answers
    return float(np.mean([np.mean(first.classes == other.classes) for other in rest])) if rest else 1.0


SLOW_CLIENTS_PER_KIND = 24  # of each of the three kinds: 72 per server
SLOW_CLIENT_CALLS = 40  # ordinary calls of each kind per round


def slow_clients(rest_url: str, grpc_target: str) -> dict[str, list[str]]:
    """Both servers with and without slow clients (interleaved); CheckFailed lists the harm done."""
    from bench.slow_clients import check_server, grpc_round, rest_round, slow_grpc_clients, slow_rest_clients

    problems = {
        "torch-rest": check_server(lambda: rest_round(rest_url, SLOW_CLIENT_CALLS),
                                     lambda: slow_rest_clients(rest_url, SLOW_CLIENTS_PER_KIND)),
        "tf-standin-grpc": check_server(lambda: grpc_round(grpc_target, SLOW_CLIENT_CALLS),
                                       lambda: slow_grpc_clients(grpc_target, SLOW_CLIENTS_PER_KIND)),
    }
    found = [f"{server}: {problem}" for server, listed in problems.items() for problem in listed]
    if found:
        raise CheckFailed("slow clients delayed or failed ordinary calls: " + "; ".join(found))
    return problems
