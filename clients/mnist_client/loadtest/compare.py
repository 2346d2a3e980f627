"""Compare a candidate run against a baseline run, entry by entry (target, mode, sweep point).

Changes are reported as ratios candidate/baseline. Limits turn a comparison into a gate: a p50 or p99
that grew by more than a percentage, or a throughput that fell by more than one, fails it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mnist_client.loadtest.errors import ConfigError
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import Measurement


@dataclass(frozen=True)
class CompareLimits:
    """Largest tolerated changes, in percent of the baseline (``None``: not checked)."""

    max_p50_increase_pct: float | None = None
    max_p99_increase_pct: float | None = None
    max_throughput_decrease_pct: float | None = None
    max_error_rate_increase: float | None = None  # absolute, e.g. 0.01 = one percentage point

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{name} {value!r}: expected a number >= 0")


@dataclass(frozen=True)
class Change:
    target: str
    mode: str
    point: float
    baseline: dict[str, float | None]
    candidate: dict[str, float | None]

    def ratio(self, metric: str) -> float | None:
        base, candidate = self.baseline[metric], self.candidate[metric]
        return candidate / base if base and candidate is not None else None

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "mode": self.mode,
            "point": self.point,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "ratio": {metric: self.ratio(metric) for metric in self.baseline},
        }


@dataclass(frozen=True)
class Comparison:
    changes: list[Change]
    only_in_baseline: list[tuple[str, str, float]]
    only_in_candidate: list[tuple[str, str, float]]
    failures: list[str]

    def to_dict(self) -> dict:
        return {
            "changes": [c.to_dict() for c in self.changes],
            "only_in_baseline": [list(k) for k in self.only_in_baseline],
            "only_in_candidate": [list(k) for k in self.only_in_candidate],
            "failures": self.failures,
            "passed": not self.failures,
        }


def _metrics(m: Measurement) -> dict[str, float | None]:
    latency = m.latency_ms()
    return {
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "p99.9_ms": latency["p99.9"],
        "max_ms": latency["max"],
        "throughput_rps": m.throughput_rps,
        "error_rate": m.error_rate,
        "accuracy": m.accuracy,
    }


def compare_reports(baseline: Report, candidate: Report, limits: CompareLimits | None = None) -> Comparison:
    limits = limits or CompareLimits()
    base = {m.key: m for m in baseline.measurements}
    cand = {m.key: m for m in candidate.measurements}
    changes = []
    failures = []
    for key, m in base.items():
        if key not in cand:
            continue
        change = Change(target=key[0], mode=key[1], point=key[2],
                        baseline=_metrics(m), candidate=_metrics(cand[key]))
        changes.append(change)
        where = f"{key[0]} at {'concurrency' if key[1] == 'closed' else 'rate'} {key[2]:g}"
        for metric, limit in (("p50_ms", limits.max_p50_increase_pct), ("p99_ms", limits.max_p99_increase_pct)):
            ratio = change.ratio(metric)
            if limit is not None and ratio is not None and ratio > 1 + limit / 100:
                failures.append(f"{where}: {metric} {change.baseline[metric]:.3f} -> {change.candidate[metric]:.3f} "
                                f"(+{(ratio - 1) * 100:.1f}% > {limit:g}%)")
        ratio = change.ratio("throughput_rps")
        limit = limits.max_throughput_decrease_pct
        if limit is not None and ratio is not None and ratio < 1 - limit / 100:
            failures.append(f"{where}: throughput {change.baseline['throughput_rps']:.1f} -> "
                            f"{change.candidate['throughput_rps']:.1f} req/s (-{(1 - ratio) * 100:.1f}% > {limit:g}%)")
        limit = limits.max_error_rate_increase
        increase = change.candidate["error_rate"] - change.baseline["error_rate"]
        if limit is not None and increase > limit:
            failures.append(f"{where}: error rate {change.baseline['error_rate']:.4f} -> "
                            f"{change.candidate['error_rate']:.4f} (+{increase:.4f} > {limit:g})")
    return Comparison(
        changes=changes,
        only_in_baseline=[k for k in base if k not in cand],
        only_in_candidate=[k for k in cand if k not in base],
        failures=failures,
    )


def format_comparison(comparison: Comparison) -> str:
    """A plain-text table of baseline -> candidate per entry, then any failures."""
    lines = []
    header = f"{'target':<10} {'point':>8}  {'p50 ms':>20}  {'p99 ms':>20}  {'req/s':>22}  {'errors':>15}"
    lines.append(header)
    lines.append("-" * len(header))

    def cell(change: Change, metric: str, fmt: str) -> str:
        ratio = change.ratio(metric)
        shown = f"{format(change.baseline[metric], fmt)}->{format(change.candidate[metric], fmt)}"
        return shown + (f" x{ratio:.2f}" if ratio is not None else "")

    for c in comparison.changes:
        lines.append(
            f"{c.target:<10} {c.point:>8g}  {cell(c, 'p50_ms', '.3f'):>20}  {cell(c, 'p99_ms', '.3f'):>20}  "
            f"{cell(c, 'throughput_rps', '.0f'):>22}  "
            f"{c.baseline['error_rate']:.3f}->{c.candidate['error_rate']:.3f}"
        )
    for key in comparison.only_in_baseline:
        lines.append(f"only in baseline:  {key[0]} at {key[1]} {key[2]:g}")
    for key in comparison.only_in_candidate:
        lines.append(f"only in candidate: {key[0]} at {key[1]} {key[2]:g}")
    if comparison.failures:
        lines.append("")
        lines.extend(f"FAIL {failure}" for failure in comparison.failures)
    return "\n".join(lines) + "\n"
