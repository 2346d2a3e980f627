"""The result of a run (or of a merge): every measurement, per-image predictions, and what derives from them.

A :class:`Report` serialises to one JSON document (the *result file*) holding raw counts, encoded HDR
histograms and each target's per-image predictions, next to the derived figures for humans and tools.
Reading a file back uses only the raw parts, so merged and compared files are computed exactly.
"""

from __future__ import annotations

import base64
import datetime as _dt
import itertools
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client import __version__
from mnist_client.loadtest.config import MNIST_TEST_IMAGES, Thresholds
from mnist_client.loadtest.errors import ResultFileError
from mnist_client.loadtest.stats import Measurement

SCHEMA = "mnist-loadtest-result/1"
UNSEEN = -1  # per-image prediction slot never filled


def empty_predictions() -> np.ndarray:
    """One int8 slot per MNIST test image: the class a target predicted for it, or ``UNSEEN``."""
    return np.full(MNIST_TEST_IMAGES, UNSEEN, dtype=np.int8)


@dataclass(frozen=True)
class Agreement:
    """How often two targets gave the same class for the same test images."""

    a: str
    b: str
    images: int  # images both targets classified
    agree: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.images if self.images else None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "images": self.images, "agree": self.agree, "rate": self.rate}


@dataclass
class Report:
    """Measurements of one run (or several merged), in sweep order."""

    measurements: list[Measurement]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # target -> int8 [10000]
    config: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    hosts: list[str] = field(default_factory=lambda: [socket.gethostname()])
    sources: int = 1  # result files merged into this one
    runs: list[str] = field(default_factory=lambda: [uuid.uuid4().hex])  # ids of the runs counted here
    inconsistent_predictions: dict[str, int] = field(default_factory=dict)  # target -> images predicted differently

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys(m.target for m in self.measurements))

    def measurement(self, target: str, point: float) -> Measurement:
        for m in self.measurements:
            if m.target == target and m.point == float(point):
                return m
        raise KeyError(f"no measurement for target {target!r} at {point:g}; have {[m.key for m in self.measurements]}")

    def accuracy(self, target: str) -> float | None:
        """Served accuracy of ``target`` over every image it answered, all sweep points together."""
        images = sum(m.images for m in self.measurements if m.target == target)
        correct = sum(m.correct for m in self.measurements if m.target == target)
        return correct / images if images else None

    def agreements(self) -> list[Agreement]:
        """Agreement of every pair of targets on the images both classified."""
        pairs = []
        for a, b in itertools.combinations(self.targets, 2):
            pa, pb = self.predictions.get(a), self.predictions.get(b)
            if pa is None or pb is None:
                continue
            both = (pa != UNSEEN) & (pb != UNSEEN)
            pairs.append(Agreement(a=a, b=b, images=int(both.sum()), agree=int((pa[both] == pb[both]).sum())))
        return pairs

    def check(self, thresholds: Thresholds) -> list[str]:
        """Every threshold violation, as a sentence; empty when the run passes."""
        if not self.measurements:
            return ["the report holds no measurement"]
        failures = []
        for m in self.measurements:
            where = f"{m.target} at {'concurrency' if m.mode == 'closed' else 'rate'} {m.point:g}"
            latency = m.latency_ms()
            if m.requests == 0:
                failures.append(f"{where}: no request completed")
                continue
            for label, limit in (("p50", thresholds.max_p50_ms), ("p99", thresholds.max_p99_ms)):
                if limit is None:
                    continue
                if not m.ok:  # a latency limit cannot pass on requests that all failed
                    failures.append(f"{where}: no successful request, so no {label} to hold to {limit:g} ms")
                elif latency[label] > limit:
                    failures.append(f"{where}: {label} {latency[label]:.3f} ms > limit {limit:g} ms")
            if thresholds.max_error_rate is not None and m.error_rate > thresholds.max_error_rate:
                failures.append(
                    f"{where}: error rate {m.error_rate:.4f} > limit {thresholds.max_error_rate:g} "
                    f"({dict(m.errors)})"
                )
            if thresholds.min_throughput_rps is not None and m.throughput_rps < thresholds.min_throughput_rps:
                failures.append(
                    f"{where}: throughput {m.throughput_rps:.1f} req/s < limit {thresholds.min_throughput_rps:g}"
                )
        if thresholds.min_accuracy is not None:
            for target in self.targets:
                accuracy = self.accuracy(target)
                if accuracy is None or accuracy < thresholds.min_accuracy:
                    shown = "none (no successful answer)" if accuracy is None else f"{accuracy:.4f}"
                    failures.append(f"{target}: served accuracy {shown} < limit {thresholds.min_accuracy:g}")
        if thresholds.min_agreement is not None:
            for pair in self.agreements():
                if pair.rate is None or pair.rate < thresholds.min_agreement:
                    shown = "none (no common image)" if pair.rate is None else f"{pair.rate:.4f}"
                    failures.append(f"{pair.a} vs {pair.b}: agreement {shown} < limit {thresholds.min_agreement:g}")
        return failures

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "tool": {"name": "mnist-loadtest", "version": __version__},
            "created": self.created,
            "hosts": self.hosts,
            "sources": self.sources,
            "runs": self.runs,
            "config": self.config,
            "results": [m.to_dict() for m in self.measurements],
            "accuracy": {t: self.accuracy(t) for t in self.targets},
            "agreement": [a.to_dict() for a in self.agreements()],
            "inconsistent_predictions": self.inconsistent_predictions,
            "predictions": {
                name: {"encoding": "int8-base64", "unseen": UNSEEN, "data": base64.b64encode(p.tobytes()).decode()}
                for name, p in self.predictions.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "result") -> Report:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ResultFileError(f"{source}: schema {got!r}; expected a load-test result ({SCHEMA!r})")
        try:
            measurements = [Measurement.from_dict(entry) for entry in data["results"]]
            predictions = {}
            for name, entry in data.get("predictions", {}).items():
                array = np.frombuffer(base64.b64decode(entry["data"]), dtype=np.int8).copy()
                if array.shape != (MNIST_TEST_IMAGES,):
                    raise ResultFileError(
                        f"{source}: predictions of {name!r} hold {array.size} images; expected {MNIST_TEST_IMAGES}"
                    )
                predictions[str(name)] = array
            return cls(
                measurements=measurements,
                predictions=predictions,
                config=dict(data.get("config", {})),
                created=str(data.get("created", "")),
                hosts=[str(h) for h in data.get("hosts", [])],
                sources=int(data.get("sources", 1)),
                runs=[str(r) for r in data.get("runs", [])],
                inconsistent_predictions={str(k): int(v) for k, v in data.get("inconsistent_predictions", {}).items()},
            )
        except ResultFileError as exc:
            raise ResultFileError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResultFileError(f"{source}: malformed result ({type(exc).__name__}: {exc})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result file atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def load_report(path: str | os.PathLike[str]) -> Report:
    """Read a result file written by ``run``/``merge`` (``--json``), with a clear error if it is not one."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ResultFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ResultFileError(f"{path}: not JSON ({exc})") from None
    return Report.from_dict(data, source=str(path))
