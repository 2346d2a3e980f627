"""CSV: one row per (target, sweep point) with the derived figures, for spreadsheets and plotting."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import PERCENTILES, percentile_label

COLUMNS = [
    "target", "protocol", "address", "mode", "concurrency", "rate", "images_per_request",
    "requests", "ok", "errors", "error_rate", "elapsed_s", "throughput_rps", "images_per_s",
    *(f"{percentile_label(p)}_ms" for p in PERCENTILES), "max_ms", "min_ms", "mean_ms",
    "send_lag_p99_ms", "accuracy", "errors_by_code",
    "rounds", "throughput_rps_median", "throughput_rps_spread", "p50_ms_median", "p50_ms_spread", "flags",
]


def csv_rows(report: Report) -> list[dict[str, object]]:
    rows = []
    for m in report.measurements:
        latency = m.latency_ms()
        row: dict[str, object] = {
            "target": m.target,
            "protocol": m.protocol,
            "address": m.address,
            "mode": m.mode,
            "concurrency": int(m.point) if m.mode == "closed" else "",
            "rate": m.point if m.mode == "open" else "",
            "images_per_request": m.images_per_request,
            "requests": m.requests,
            "ok": m.ok,
            "errors": sum(m.errors.values()),
            "error_rate": f"{m.error_rate:.6f}",
            "elapsed_s": f"{m.elapsed_s:.3f}",
            "throughput_rps": f"{m.throughput_rps:.2f}",
            "images_per_s": f"{m.images_per_s:.2f}",
            "max_ms": f"{latency['max']:.3f}",
            "min_ms": f"{latency['min']:.3f}",
            "mean_ms": f"{latency['mean']:.3f}",
            "send_lag_p99_ms": f"{m.send_lag.value_at(99.0) / 1000.0:.3f}" if m.mode == "open" else "",
            "accuracy": "" if m.accuracy is None else f"{m.accuracy:.6f}",
            "errors_by_code": ";".join(f"{code}={n}" for code, n in sorted(m.error_codes.items())),
        }
        for p in PERCENTILES:
            row[f"{percentile_label(p)}_ms"] = f"{latency[percentile_label(p)]:.3f}"
        stats = m.round_stats()
        row["rounds"] = len(m.rounds)
        for figure in ("throughput_rps", "p50_ms"):
            entry = stats.get(figure)
            row[f"{figure}_median"] = "" if entry is None else f"{entry['median']:.3f}"
            row[f"{figure}_spread"] = "" if entry is None else f"{entry['spread']:.4f}"
        row["flags"] = " | ".join(m.flags())
        rows.append(row)
    return rows


def format_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return buffer.getvalue()


def write_csv(report: Report, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_csv(report))
    return path
