"""The latest load-test report in the reports folder, as the page's second view shows it.

Reads the result files that ``make demo`` and ``mnist-loadtest --json`` write (the load tester's own
reader, so a file it cannot read is skipped, not guessed at) and draws the same charts as the HTML
report with the same code. The full HTML report beside a result file (same stem) is linked.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mnist_client.loadtest.errors import ResultFileError
from mnist_client.loadtest.printers.html import report_charts
from mnist_client.loadtest.report import Report, load_report
from mnist_client.loadtest.stats import PERCENTILES, percentile_label

log = logging.getLogger(__name__)


class NoReport(LookupError):
    """No readable load-test result file in the reports folder; the message says how to make one."""


def _newest_report(reports_dir: Path) -> tuple[Path, Report]:
    candidates = sorted(reports_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            return path, load_report(path)
        except ResultFileError as exc:  # another JSON file (a bench result...): not a load-test report
            log.debug("skipping %s: %s", path, exc)
    raise NoReport(
        f"no load-test result file in {reports_dir}; run `make demo` (it writes demo.json there) or "
        "`mnist-loadtest ... --json FILE` into that folder (MNIST_WEB_REPORTS_DIR)"
    )


def latest_report(reports_dir: Path) -> dict[str, Any]:
    """The newest readable result file in ``reports_dir``: its summary rows, SVG charts and HTML name."""
    if not reports_dir.is_dir():
        raise NoReport(f"the reports folder {reports_dir} does not exist yet; run `make demo` to create a report")
    path, report = _newest_report(reports_dir)
    html = path.with_suffix(".html")
    rows = []
    for m in report.measurements:
        latency = m.latency_ms()
        rows.append({
            "target": m.target,
            "protocol": m.protocol,
            "point": m.point,
            "mode": m.mode,
            "requests": m.requests,
            "errors": sum(m.errors.values()),
            "throughput_rps": round(m.throughput_rps, 1),
            "latency_ms": {label: round(latency[label], 3) for label in [*map(percentile_label, PERCENTILES), "max"]},
            "accuracy": m.accuracy,
        })  # fmt: skip
    modified = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat(timespec="seconds")
    return {
        "file": path.name,
        "created": report.created or modified,
        "hosts": report.hosts,
        "measurements": rows,
        "charts": report_charts(report),
        "html": html.name if html.is_file() else None,
    }
