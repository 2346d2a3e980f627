"""Counting: a bounded HDR latency histogram and the counters of one (target, sweep point).

Latencies are recorded in integer microseconds into an HdrHistogram covering 1 us to 1 hour at 3
significant digits (every reported percentile is within 0.1% of the exact sample value), whose size
does not grow with the number of requests. Histograms and counters add exactly, which is what lets
``merge`` combine result files from many machines without the error of averaging percentiles.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from mnist_client.loadtest.cpu_usage import contention
from mnist_client.loadtest.errors import ResultFileError

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: anything slower is clamped (and counted in ``clamped``)
SIGNIFICANT_FIGURES = 3
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)
MAX_ERROR_EXAMPLES = 3  # distinct messages kept per error kind
GENERATOR_BUSY_WARNING = 0.9  # share of a CPU a worker may use before the report calls it a bottleneck
# Rounds of one (target, sweep point) whose figures spread wider than this ((max - min) / median) are flagged.
SPREAD_WARNING = 0.20
# The per-round figures whose median and spread the report gives.
ROUND_FIGURES: tuple[str, ...] = ("p50_ms", "p99_ms", "throughput_rps")


def percentile_label(p: float) -> str:
    """``50.0`` -> ``"p50"``, ``99.9`` -> ``"p99.9"``."""
    return f"p{p:g}"


class LatencyHistogram:
    """A bounded HDR histogram of latencies in microseconds."""

    __slots__ = ("_hist", "clamped")

    def __init__(self, hist: HdrHistogram | None = None, clamped: int = 0) -> None:
        self._hist = hist if hist is not None else HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
        self.clamped = clamped

    def record(self, value_us: int) -> None:
        if value_us > HIGHEST_US:
            self.clamped += 1
            value_us = HIGHEST_US
        self._hist.record_value(max(0, int(value_us)))

    def record_many(self, values_us: list[int]) -> None:
        record = self._hist.record_value
        for value in values_us:
            if value > HIGHEST_US:
                self.clamped += 1
                value = HIGHEST_US
            record(value if value > 0 else 0)

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def value_at(self, percentile: float) -> int:
        """Latency (us) at ``percentile`` (0-100); 0 for an empty histogram."""
        return int(self._hist.get_value_at_percentile(percentile)) if self.count else 0

    def values_at(self, percentiles: tuple[float, ...] = PERCENTILES) -> dict[float, int]:
        if not self.count:
            return {p: 0 for p in percentiles}
        found = self._hist.get_percentile_to_value_dict(list(percentiles))
        return {p: int(found[p]) for p in percentiles}

    @property
    def max(self) -> int:
        return int(self._hist.get_max_value()) if self.count else 0

    @property
    def min(self) -> int:
        # hdrh's own min is wrong after add() into an empty histogram; the 0th percentile is exact.
        return int(self._hist.get_value_at_percentile(0)) if self.count else 0

    @property
    def mean(self) -> float:
        return float(self._hist.get_mean_value()) if self.count else 0.0

    def distribution(self, ticks_per_half_distance: int = 5) -> list[tuple[float, int]]:
        """(percentile, latency us) points of the whole distribution, for percentile plots."""
        if not self.count:
            return []
        points = []
        for item in self._hist.get_percentile_iterator(ticks_per_half_distance):
            points.append((float(item.percentile_level_iterated_to), int(item.value_iterated_to)))
            if item.percentile_level_iterated_to >= 100.0:
                break
        return points

    def add(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram (exact)."""
        if other.count:
            self._hist.add(other._hist)
        self.clamped += other.clamped

    def copy(self) -> LatencyHistogram:
        clone = LatencyHistogram()
        clone.add(self)
        return clone

    def counts(self) -> dict[int, int]:
        """Non-empty buckets: {bucket's lowest equivalent value (us): count}; for equality checks."""
        return {
            int(item.value_iterated_to): int(item.count_at_value_iterated_to)
            for item in self._hist.get_recorded_iterator()
        }

    def encode(self) -> str:
        """HdrHistogram's standard compressed base64 form (readable by every HdrHistogram library)."""
        return self._hist.encode().decode("ascii")

    @classmethod
    def decode(cls, encoded: str, clamped: int = 0) -> LatencyHistogram:
        try:
            decoded = HdrHistogram.decode(encoded.encode("ascii") if isinstance(encoded, str) else encoded)
        except Exception as exc:  # the codec raises several types (TypeError, zlib.error, its own)
            raise ResultFileError(f"not an encoded HDR histogram ({type(exc).__name__}: {exc})") from exc
        # Re-home into the standard range so that any two decoded histograms add bucket by bucket.
        histogram = cls(clamped=clamped)
        histogram._hist.add(decoded)
        return histogram

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyHistogram) and self.counts() == other.counts() and self.clamped == other.clamped

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, p50={self.value_at(50)}us, max={self.max}us)"


@dataclass
class Measurement:
    """Raw, additive counts for one target at one sweep point (everything else is derived from them).

    ``windows``: wall-clock ``(start, end)`` epoch seconds of the measured period on each machine; the
    elapsed time is the length of their union, so that results from pods that ran at the same time
    merge into one aggregate rate, and runs made one after the other add their durations.
    """

    target: str
    protocol: str
    address: str
    mode: str
    point: float  # concurrency (closed loop) or intended rate in requests/s (open loop)
    images_per_request: int
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # successful requests only
    send_lag: LatencyHistogram = field(default_factory=LatencyHistogram)  # open loop: sent late by
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count
    error_codes: Counter[str] = field(default_factory=Counter)  # "kind/CODE" -> count
    error_examples: dict[str, list[str]] = field(default_factory=dict)
    images: int = 0  # images in successful answers
    correct: int = 0  # of which classified as their label
    scheduled: int = 0  # requests the pacer scheduled (sent or not)
    windows: list[tuple[float, float]] = field(default_factory=list)
    warmup_requests: int = 0
    warmup_errors: int = 0
    generator_cpu_s: float = 0.0  # CPU time of the load tester's processes while measuring
    generator_busy: float = 0.0  # the busiest worker's CPU time / elapsed time (near 1: tester-bound)
    # One entry per measured round (repetition) of this (target, point): its figures and who used the CPU.
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.target, self.mode, float(self.point))

    @property
    def requests(self) -> int:
        """Completed requests, successful or failed."""
        return self.ok + sum(self.errors.values())

    @property
    def elapsed_s(self) -> float:
        return union_length(self.windows)

    @property
    def throughput_rps(self) -> float:
        elapsed = self.elapsed_s
        return self.requests / elapsed if elapsed > 0 else 0.0

    @property
    def ok_rps(self) -> float:
        elapsed = self.elapsed_s
        return self.ok / elapsed if elapsed > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        elapsed = self.elapsed_s
        return self.images / elapsed if elapsed > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return sum(self.errors.values()) / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.images if self.images else None

    def latency_ms(self) -> dict[str, float]:
        values = self.latency.values_at(PERCENTILES)
        summary = {percentile_label(p): values[p] / 1000.0 for p in PERCENTILES}
        summary["max"] = self.latency.max / 1000.0
        summary["min"] = self.latency.min / 1000.0
        summary["mean"] = self.latency.mean / 1000.0
        return summary

    def record_error(self, kind: str, code: str, message: str) -> None:
        self.errors[kind] += 1
        self.error_codes[f"{kind}/{code}"] += 1
        examples = self.error_examples.setdefault(kind, [])
        if len(examples) < MAX_ERROR_EXAMPLES and message not in examples:
            examples.append(message)

    def add(self, other: Measurement) -> None:
        """Add another machine's counts for the same key (exact)."""
        if other.key != self.key:
            raise ResultFileError(f"cannot add measurement {other.key} to {self.key}")
        if other.images_per_request != self.images_per_request:
            raise ResultFileError(
                f"{self.target} at {self.mode} {self.point:g}: one file sent {self.images_per_request} images per "
                f"request, another {other.images_per_request}; results of different payloads cannot be merged"
            )
        self.latency.add(other.latency)
        self.send_lag.add(other.send_lag)
        self.ok += other.ok
        self.errors.update(other.errors)
        self.error_codes.update(other.error_codes)
        for kind, messages in other.error_examples.items():
            for message in messages:
                examples = self.error_examples.setdefault(kind, [])
                if len(examples) < MAX_ERROR_EXAMPLES and message not in examples:
                    examples.append(message)
        self.images += other.images
        self.correct += other.correct
        self.scheduled += other.scheduled
        self.windows.extend(other.windows)
        self.warmup_requests += other.warmup_requests
        self.warmup_errors += other.warmup_errors
        self.generator_cpu_s += other.generator_cpu_s
        self.generator_busy = max(self.generator_busy, other.generator_busy)
        self.rounds.extend(other.rounds)

    def round_summary(self, cpu: dict[str, Any] | None = None) -> dict[str, Any]:
        """This measurement's figures as one round of a repeated point (``cpu``: see ``cpu_usage.usage``)."""
        latency = self.latency_ms()
        return {
            "requests": self.requests,
            "errors": sum(self.errors.values()),
            "elapsed_s": round(self.elapsed_s, 4),
            "throughput_rps": round(self.throughput_rps, 2),
            "p50_ms": round(latency["p50"], 4),
            "p99_ms": round(latency["p99"], 4),
            "cpu": cpu or {},
        }

    def round_stats(self) -> dict[str, dict[str, float]]:
        """Per figure of ``ROUND_FIGURES``: median, min, max and spread ((max - min) / median) over the rounds."""
        out = {}
        for name in ROUND_FIGURES:
            values = [r[name] for r in self.rounds if r.get("requests")]
            if not values:
                continue
            median = statistics.median(values)
            spread = (max(values) - min(values)) / median if median > 0 else 0.0
            out[name] = {"median": median, "min": min(values), "max": max(values), "spread": round(spread, 4)}
        return out

    def flags(self) -> list[str]:
        """Why this point's figures may not describe the server alone: a wide spread, or CPU taken from it."""
        notes = []
        for name, stats in self.round_stats().items():
            if len(self.rounds) > 1 and stats["spread"] > SPREAD_WARNING:
                notes.append(f"{name} spread {100 * stats['spread']:.0f}% over {len(self.rounds)} rounds "
                             f"(above {100 * SPREAD_WARNING:.0f}%)")
        for number, entry in enumerate(self.rounds, start=1):
            problem = contention(entry.get("cpu") or {})
            if problem:
                notes.append(f"round {number}: {problem}")
        return notes

    def summary(self) -> dict[str, Any]:
        """Derived figures (what tables, CSV and thresholds use)."""
        data: dict[str, Any] = {
            "target": self.target,
            "protocol": self.protocol,
            "mode": self.mode,
            "concurrency" if self.mode == "closed" else "rate": self.point,
            "images_per_request": self.images_per_request,
            "requests": self.requests,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "error_rate": self.error_rate,
            "elapsed_s": self.elapsed_s,
            "throughput_rps": self.throughput_rps,
            "images_per_s": self.images_per_s,
            "accuracy": self.accuracy,
            "latency_ms": self.latency_ms(),
            "generator": {
                "cpu_s": self.generator_cpu_s,
                "cpu_us_per_request": self.generator_cpu_s / self.requests * 1e6 if self.requests else None,
                "busiest_worker_cpu_share": self.generator_busy,
            },
            "round_stats": self.round_stats(),
            "flags": self.flags(),
        }
        if self.mode == "open":
            data["intended_rps"] = self.point
            data["achieved_rps"] = self.throughput_rps
            data["send_lag_ms"] = {
                "p99": self.send_lag.value_at(99.0) / 1000.0,
                "max": self.send_lag.max / 1000.0,
            }
        return data

    def to_dict(self) -> dict[str, Any]:
        """Raw counts plus derived figures; :meth:`from_dict` reads back only the raw counts."""
        return {
            **self.summary(),
            "address": self.address,
            "point": self.point,
            "errors_by_kind": dict(self.errors),
            "errors_by_code": dict(self.error_codes),
            "error_examples": self.error_examples,
            "images": self.images,
            "correct": self.correct,
            "scheduled": self.scheduled,
            "windows": [list(w) for w in self.windows],
            "warmup": {"requests": self.warmup_requests, "errors": self.warmup_errors},
            "rounds": self.rounds,
            "histogram": {"encoding": "hdrhistogram-v2-base64", "unit": "us", "data": self.latency.encode(),
                          "clamped": self.latency.clamped},
            "send_lag_histogram": {"encoding": "hdrhistogram-v2-base64", "unit": "us", "data": self.send_lag.encode(),
                                   "clamped": self.send_lag.clamped},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        try:
            return cls(
                target=str(data["target"]),
                protocol=str(data["protocol"]),
                address=str(data["address"]),
                mode=str(data["mode"]),
                point=float(data["point"]),
                images_per_request=int(data["images_per_request"]),
                latency=LatencyHistogram.decode(data["histogram"]["data"], int(data["histogram"].get("clamped", 0))),
                send_lag=LatencyHistogram.decode(
                    data["send_lag_histogram"]["data"], int(data["send_lag_histogram"].get("clamped", 0))
                ),
                ok=int(data["ok"]),
                errors=Counter({str(k): int(v) for k, v in data["errors_by_kind"].items()}),
                error_codes=Counter({str(k): int(v) for k, v in data["errors_by_code"].items()}),
                error_examples={str(k): [str(m) for m in v] for k, v in data.get("error_examples", {}).items()},
                images=int(data["images"]),
                correct=int(data["correct"]),
                scheduled=int(data.get("scheduled", 0)),
                windows=[(float(a), float(b)) for a, b in data["windows"]],
                warmup_requests=int(data.get("warmup", {}).get("requests", 0)),
                warmup_errors=int(data.get("warmup", {}).get("errors", 0)),
                generator_cpu_s=float(data.get("generator", {}).get("cpu_s", 0.0)),
                generator_busy=float(data.get("generator", {}).get("busiest_worker_cpu_share", 0.0)),
                rounds=[dict(r) for r in data.get("rounds", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResultFileError(f"a result entry lacks or mangles {exc!s}; expected the fields a run writes") from exc


def union_length(windows: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping (start, end) intervals."""
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(windows):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start  # type: ignore[operator]
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start  # type: ignore[operator]
    return total
