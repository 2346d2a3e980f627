"""Result records: what a worker emits for each finished request, batched for the trip to the reporter.

Workers append to plain lists (cheap in a hot loop) and ship them every ``FLUSH_INTERVAL_NS`` as one
message; the reporter in the parent process turns them into histograms and counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

FLUSH_INTERVAL_NS = 100_000_000  # 0.1 s: progress stays live, messages stay few


@dataclass
class RecordBatch:
    """Requests finished since the last batch, from one worker.

    Successful requests: ``ok_payloads[i]`` (index into the target's payload), ``ok_latencies_us[i]``
    (from the intended start) and ``ok_classes[i]`` (the predicted class of each image, one byte each).
    Failed requests: ``errors[i] = (kind, code, message)``, kinds and codes as the client's
    :class:`~mnist_client.errors.MnistClientError`. ``lags_us``: open loop only, how late each request
    was sent after its intended time.
    """

    worker: int
    ok_payloads: list[int] = field(default_factory=list)
    ok_latencies_us: list[int] = field(default_factory=list)
    ok_classes: list[bytes] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    lags_us: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ok_payloads) + len(self.errors)


class RecordSink:
    """A worker's pending records; ``flush`` hands them to ``send`` and starts a new batch."""

    __slots__ = ("worker", "_send", "batch", "next_flush_ns")

    def __init__(self, worker: int, send: Callable[[RecordBatch], None]) -> None:
        self.worker = worker
        self._send = send
        self.batch = RecordBatch(worker)
        self.next_flush_ns = 0

    def ok(self, payload: int, latency_us: int, classes: bytes) -> None:
        batch = self.batch
        batch.ok_payloads.append(payload)
        batch.ok_latencies_us.append(latency_us)
        batch.ok_classes.append(classes)

    def error(self, kind: str, code: str, message: str) -> None:
        self.batch.errors.append((kind, code, message))

    def lag(self, lag_us: int) -> None:
        self.batch.lags_us.append(lag_us)

    def flush(self, now_ns: int) -> None:
        self.next_flush_ns = now_ns + FLUSH_INTERVAL_NS
        batch = self.batch
        if len(batch) or batch.lags_us:
            self.batch = RecordBatch(self.worker)
            self._send(batch)
