"""A self-contained HTML report: summary table, inline SVG charts, accuracy, agreement, errors, config.

Everything is inline (styles and SVG), so the file can be archived as a CI artifact or mailed and
still open anywhere without network access.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path

from mnist_client.loadtest.printers.charts import PERCENTILE_TICKS, line_chart, percentile_position
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import PERCENTILES, SPREAD_WARNING, Measurement, percentile_label

_STYLE = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}h1{font-size:22px}h2{font-size:17px;margin-top:28px}
pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:12px}.bad{color:#b00020}
"""


def _sweep_label(report: Report) -> tuple[str, str]:
    mode = report.measurements[0].mode if report.measurements else "closed"
    return ("intended rate (requests/s)", "rate") if mode == "open" else ("concurrency (requests in flight)", "conc")


def report_charts(report: Report) -> list[str]:
    """The report's SVG charts (latency by percentile; throughput and p99 by sweep point when swept).

    Public so that other views of a report (the web page's report view) draw the same charts.
    """
    charts = []
    many_points = len({m.point for m in report.measurements}) > 1
    series = []
    for m in report.measurements:
        distribution = [(p, v / 1000.0) for p, v in m.latency.distribution()]
        if distribution:
            name = f"{m.target} @ {m.point:g}" if many_points else m.target
            series.append((name, distribution))
    charts.append(
        line_chart(
            series,
            title="Latency by percentile",
            x_label="percentile",
            y_label="latency (ms)",
            x_ticks=PERCENTILE_TICKS,
            x_transform=percentile_position,
        )
    )
    if many_points:
        x_label, _ = _sweep_label(report)
        targets = report.targets
        throughput = [(t, [(m.point, m.throughput_rps) for m in report.measurements if m.target == t]) for t in targets]
        p99 = [(t, [(m.point, m.latency_ms()["p99"]) for m in report.measurements if m.target == t]) for t in targets]
        charts.append(line_chart(throughput, title="Throughput", x_label=x_label, y_label="requests/s"))
        charts.append(line_chart(p99, title="p99 latency", x_label=x_label, y_label="p99 (ms)"))
    return charts


def _round_cells(m: Measurement) -> list[str]:
    """Rounds, then the median and spread of req/s and p50 over them; a spread past the warning is marked."""
    stats = m.round_stats()
    cells = [f"<td>{len(m.rounds)}</td>"]
    for figure, fmt in (("throughput_rps", "{:.1f}"), ("p50_ms", "{:.3f}")):
        entry = stats.get(figure)
        if entry is None:
            cells.append("<td>-</td>")
            continue
        wide = len(m.rounds) > 1 and entry["spread"] > SPREAD_WARNING
        cells.append(f'<td class="{"bad" if wide else ""}">{fmt.format(entry["median"])} '
                     f'({100 * entry["spread"]:.0f}%)</td>')
    return cells


def format_html(
    report: Report,
    *,
    title: str = "MNIST serving load test",
    failures: list[str] | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> str:
    """The self-contained HTML report. ``sections`` are extra ``(heading, trusted HTML)`` blocks placed
    before the load-test summary (``make demo`` adds the training comparison this way)."""
    _, short = _sweep_label(report)
    open_loop = any(m.mode == "open" for m in report.measurements)
    repeated = any(len(m.rounds) > 1 for m in report.measurements)
    head = ["target", "protocol", short, "requests", "errors", "req/s", "images/s",
            *(["rounds", "req/s median (spread)", "p50 median (spread)"] if repeated else []),
            *(["lag p99"] if open_loop else []), *(percentile_label(p) for p in PERCENTILES), "max", "accuracy"]
    rows = []
    for m in report.measurements:
        latency = m.latency_ms()
        cells = [
            f'<td class="l">{escape(m.target)}</td>', f'<td class="l">{escape(m.protocol)}</td>',
            f"<td>{m.point:g}</td>", f"<td>{m.requests}</td>",
            f'<td class="{"bad" if m.errors else ""}">{sum(m.errors.values())}</td>',
            f"<td>{m.throughput_rps:.1f}</td>", f"<td>{m.images_per_s:.1f}</td>",
            *(_round_cells(m) if repeated else []),
            *([f"<td>{m.send_lag.value_at(99.0) / 1000.0:.3f}</td>"] if open_loop else []),
            *(f"<td>{latency[percentile_label(p)]:.3f}</td>" for p in PERCENTILES),
            f"<td>{latency['max']:.3f}</td>",
            f"<td>{'-' if m.accuracy is None else f'{m.accuracy:.4f}'}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>Created {escape(report.created)} on {escape(', '.join(report.hosts) or '-')}; "
        f"{report.sources} result file(s). Latencies in milliseconds, from HDR histograms of successful "
        "requests (open loop: measured from each request's intended send time; lag: how late requests "
        "went out after that time).</p>",
    ]
    if failures is not None:
        if failures:
            items = "".join(f"<li>{escape(f)}</li>" for f in failures)
            parts.append(f'<h2 class="bad">Thresholds failed</h2><ul class="bad">{items}</ul>')
        else:
            parts.append("<p>All thresholds passed.</p>")
    for heading, body in sections:
        parts.append(f"<h2>{escape(heading)}</h2>{body}")
    parts.append("<h2>Summary</h2><table><tr>" + "".join(
        f'<th class="{"l" if i < 2 else ""}">{escape(h)}</th>' for i, h in enumerate(head)) + "</tr>")
    parts.extend(rows)
    parts.append("</table>")
    parts.append("<h2>Served accuracy and agreement</h2><table><tr><th class='l'>what</th><th>value</th>"
                 "<th>images</th></tr>")
    for target in report.targets:
        accuracy = report.accuracy(target)
        images = sum(m.images for m in report.measurements if m.target == target)
        parts.append(f"<tr><td class='l'>accuracy of {escape(target)}</td>"
                     f"<td>{'-' if accuracy is None else f'{accuracy:.4f}'}</td><td>{images}</td></tr>")
    for pair in report.agreements():
        parts.append(f"<tr><td class='l'>agreement {escape(pair.a)} vs {escape(pair.b)}</td>"
                     f"<td>{'-' if pair.rate is None else f'{pair.rate:.4f}'}</td><td>{pair.images}</td></tr>")
    parts.append("</table>")
    flagged = [(m, flag) for m in report.measurements for flag in m.flags()]
    if flagged:
        items = "".join(f"<li>{escape(m.target)} at {m.point:g}: {escape(flag)}</li>" for m, flag in flagged)
        parts.append("<h2>Flags</h2><p>Points whose figures may describe more than the server: a spread over "
                     f"their rounds above {100 * SPREAD_WARNING:.0f}%, or CPU that something besides the server "
                     f"used while it needed it.</p><ul>{items}</ul>")
    parts.append("<h2>Charts</h2>")
    parts.extend(f"<div>{svg}</div>" for svg in report_charts(report))
    errors = [(m, code, n) for m in report.measurements for code, n in sorted(m.error_codes.items())]
    if errors:
        parts.append("<h2>Errors</h2><table><tr><th class='l'>target</th><th>point</th><th class='l'>kind/code</th>"
                     "<th>count</th><th class='l'>example</th></tr>")
        for m, code, n in errors:
            example = (m.error_examples.get(code.split("/", 1)[0]) or [""])[0]
            parts.append(f"<tr><td class='l'>{escape(m.target)}</td><td>{m.point:g}</td><td class='l'>{escape(code)}"
                         f"</td><td>{n}</td><td class='l'>{escape(example)}</td></tr>")
        parts.append("</table>")
    parts.append(f"<h2>Configuration</h2><pre>{escape(json.dumps(report.config, indent=2, default=str))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: Report, path: str | os.PathLike[str], *, failures: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_html(report, failures=failures), encoding="utf-8")
    return path
