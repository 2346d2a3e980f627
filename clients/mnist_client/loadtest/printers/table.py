"""The terminal summary: one row per (target, sweep point), then accuracy, agreement and errors."""

from __future__ import annotations

from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import GENERATOR_BUSY_WARNING, PERCENTILES, Measurement, percentile_label


def _fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _render(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _spread(m: Measurement, figure: str) -> str:
    stats = m.round_stats().get(figure)
    return "-" if stats is None or len(m.rounds) < 2 else f"{100 * stats['spread']:.0f}%"


def format_table(report: Report) -> str:
    """A plain-text table (no colours, fixed width) that reads the same in a terminal and a CI log."""
    open_loop = any(m.mode == "open" for m in report.measurements)
    repeated = any(len(m.rounds) > 1 for m in report.measurements)
    headers = ["target", "rate/s" if open_loop else "conc", "requests", "errors", "req/s"]
    if repeated:
        headers += ["rounds", "req/s med", "spread", "p50 med", "spread"]
    if open_loop:
        headers.append("lag p99")
    headers += [percentile_label(p) for p in PERCENTILES] + ["max", "accuracy"]
    rows = []
    for m in report.measurements:
        latency = m.latency_ms()
        row = [m.target, f"{m.point:g}", str(m.requests), str(sum(m.errors.values())), f"{m.throughput_rps:.1f}"]
        if repeated:
            stats = m.round_stats()
            rps, p50 = stats.get("throughput_rps"), stats.get("p50_ms")
            row += [str(len(m.rounds)), "-" if rps is None else f"{rps['median']:.1f}", _spread(m, "throughput_rps"),
                    "-" if p50 is None else _fmt_ms(p50["median"]), _spread(m, "p50_ms")]
        if open_loop:
            row.append(_fmt_ms(m.send_lag.value_at(99.0) / 1000.0))
        row += [_fmt_ms(latency[percentile_label(p)]) for p in PERCENTILES] + [_fmt_ms(latency["max"])]
        row.append("-" if m.accuracy is None else f"{m.accuracy:.4f}")
        rows.append(row)
    lines = [f"latencies in ms (HDR histogram, successful requests); {report.sources} result file(s), "
             f"hosts: {', '.join(report.hosts) or '-'}"]
    if repeated:
        lines.append("med: median over the rounds of a point; spread: (max - min) / median over those rounds; "
                     "the other columns pool every round")
    lines += _render(headers, rows, right=set(range(1, len(headers))))
    lines.append("")
    for target in report.targets:
        accuracy = report.accuracy(target)
        images = sum(m.images for m in report.measurements if m.target == target)
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        lines.append(f"served accuracy  {target}: {shown} over {images} answered images")
    for pair in report.agreements():
        shown = "-" if pair.rate is None else f"{pair.rate:.4f}"
        lines.append(f"agreement        {pair.a} vs {pair.b}: {shown} ({pair.agree} of {pair.images} common images)")
    for target, count in report.inconsistent_predictions.items():
        lines.append(f"note             {target} answered {count} image(s) differently on different calls")
    for m in report.measurements:
        if m.errors:
            kinds = ", ".join(f"{code}: {n}" for code, n in sorted(m.error_codes.items()))
            lines.append(f"errors           {m.target} at {m.point:g}: {kinds}")
            for kind, messages in m.error_examples.items():
                for message in messages[:1]:
                    lines.append(f"                   e.g. [{kind}] {message}")
    for m in report.measurements:
        if m.generator_busy > GENERATOR_BUSY_WARNING:
            lines.append(
                f"warning          {m.target} at {m.point:g}: a load-tester process used {100 * m.generator_busy:.0f}% "
                "of a CPU; the tester may have set the pace (raise --processes)"
            )
    for m in report.measurements:
        for flag in m.flags():
            lines.append(f"flag             {m.target} at {m.point:g}: {flag}")
    if any(m.mode == "open" for m in report.measurements):
        for m in report.measurements:
            lines.append(
                f"rate             {m.target}: intended {m.point:g}/s, achieved {m.throughput_rps:.1f}/s, "
                f"send lag p99 {m.send_lag.value_at(99.0) / 1000.0:.3f} ms"
            )
    return "\n".join(lines) + "\n"
