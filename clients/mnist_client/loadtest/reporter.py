"""The one place that counts: result records in, measurements and per-image predictions out.

Workers only emit records (:class:`~mnist_client.loadtest.records.RecordBatch`); the reporter, in the
parent process, adds each batch to the current (target, sweep point) :class:`Measurement` — latency
histogram, error kinds, served accuracy against the real MNIST labels — and remembers every image's
predicted class per target, from which the report derives how often two servers agree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from mnist_client.loadtest.records import RecordBatch
from mnist_client.loadtest.report import UNSEEN, Report, empty_predictions
from mnist_client.loadtest.stats import Measurement


class Reporter:
    """Accumulates one run's records. Not thread-safe: the runner feeds it from one thread."""

    def __init__(self, labels: np.ndarray) -> None:
        self._labels = [int(label) for label in labels]  # plain ints: fast to compare in the loop below
        self.measurements: list[Measurement] = []
        self.predictions: dict[str, np.ndarray] = {}
        self._inconsistent: Counter[str] = Counter()
        self._current: Measurement | None = None
        self._image_indices: tuple[tuple[int, ...], ...] = ()

    def begin(self, measurement: Measurement, image_indices: tuple[tuple[int, ...], ...]) -> Measurement:
        """Start counting one round into ``measurement``; ``image_indices[p]`` are the test images of payload ``p``.

        A round of a (target, point) already measured is counted on its own and folded into that point's
        measurement by :meth:`end`, so that every round keeps its own figures beside the total.
        """
        self.predictions.setdefault(measurement.target, empty_predictions())
        self._current = measurement
        self._image_indices = image_indices
        return measurement

    def end(self, cpu: dict[str, Any] | None = None) -> Measurement:
        """Close the current round (``cpu``: who used the CPU meanwhile); returns its point's measurement."""
        round_ = self.current
        self._current = None
        summary = round_.round_summary(cpu)
        for point in self.measurements:
            if point.key == round_.key:
                point.add(round_)
                point.rounds.append(summary)
                return point
        round_.rounds.append(summary)
        self.measurements.append(round_)
        return round_

    @property
    def current(self) -> Measurement:
        if self._current is None:
            raise RuntimeError("Reporter.begin() must be called before records are added")
        return self._current

    def add(self, batch: RecordBatch) -> None:
        m = self.current
        m.latency.record_many(batch.ok_latencies_us)
        if batch.lags_us:
            m.send_lag.record_many(batch.lags_us)
        for kind, code, message in batch.errors:
            m.record_error(kind, code, message)
        m.ok += len(batch.ok_payloads)
        if not batch.ok_payloads:
            return
        labels = self._labels
        predicted = self.predictions[m.target]
        indices = self._image_indices
        images = correct = inconsistent = 0
        for payload, classes in zip(batch.ok_payloads, batch.ok_classes):
            for image, cls in zip(indices[payload], classes):
                images += 1
                if cls == labels[image]:
                    correct += 1
                previous = predicted[image]
                if previous != cls:
                    if previous != UNSEEN:
                        inconsistent += 1  # the same server answered this image differently before
                    predicted[image] = cls
        m.images += images
        m.correct += correct
        if inconsistent:
            self._inconsistent[m.target] += inconsistent

    def report(self, config: dict[str, Any]) -> Report:
        return Report(
            measurements=list(self.measurements),
            predictions={name: p.copy() for name, p in self.predictions.items()},
            config=config,
            inconsistent_predictions=dict(self._inconsistent),
        )
