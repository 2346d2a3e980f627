"""Side-by-side load tester for the MNIST REST and gRPC servers.

Library use::

    from mnist_client.loadtest import LoadTestConfig, parse_target, run

    config = LoadTestConfig(
        targets=(parse_target("http://127.0.0.1:8080", "rest"), parse_target("127.0.0.1:8500", "grpc")),
        concurrency=(1, 16),
        duration_s=10,
    )
    report = run(config)
    print(report.measurement("rest", 16).latency_ms()["p99"])

The command line (``mnist-loadtest run|merge|compare``) is a thin layer over the same functions; see
``docs/loadtest.md``. Modules, in the order a request meets them: :mod:`.config` (validated settings),
:mod:`.payload` (real MNIST test images, encoded once), :mod:`.pacer` (closed or open loop),
:mod:`.workers` with :mod:`.rest_worker` / :mod:`.grpc_worker` (make calls, emit records),
:mod:`.reporter` / :mod:`.stats` (counting, HDR histograms), :mod:`.report` (the result file),
:mod:`.printers` (table, JSON, CSV, HTML), :mod:`.merge`, :mod:`.compare`, :mod:`.cli`.
"""

from mnist_client.loadtest.compare import CompareLimits, Comparison, compare_reports
from mnist_client.loadtest.config import LoadTestConfig, Target, Thresholds, parse_target
from mnist_client.loadtest.errors import (
    ConfigError,
    DataError,
    LoadTestError,
    ResultFileError,
    TargetUnreachableError,
)
from mnist_client.loadtest.merge import merge_files, merge_reports
from mnist_client.loadtest.report import Report, load_report
from mnist_client.loadtest.runner import Progress, run

__all__ = [
    "CompareLimits",
    "Comparison",
    "ConfigError",
    "DataError",
    "LoadTestConfig",
    "LoadTestError",
    "Progress",
    "Report",
    "ResultFileError",
    "Target",
    "TargetUnreachableError",
    "Thresholds",
    "compare_reports",
    "load_report",
    "merge_files",
    "merge_reports",
    "parse_target",
    "run",
]
