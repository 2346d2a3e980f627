"""When each request may be sent, and from when its latency counts.

A worker asks its pacer for the next request whenever it has a free slot (a connection or a stream
without a request in flight). The pacer answers with the request's *intended* start time, or ``None``
when nothing is due yet (open loop) or the worker's share is done.

- :class:`ClosedLoop`: a request is due as soon as a slot is free; its latency counts from the moment
  it is actually started, because in a closed loop the sender, not a clock, sets the pace.
- :class:`OpenLoop`: requests are due on a fixed schedule (``rate`` per second across all workers,
  interleaved: worker ``w`` of ``W`` owns arrivals ``w, w + W, w + 2W``...). A request that could not
  go out on time (every slot busy behind a stalled server) keeps its scheduled time, so its latency
  includes the wait. This is the correction for coordinated omission: a closed-loop tester, or an
  open-loop one that measures from the actual send, stops sending while the server stalls and so
  records only one slow request where users would have seen a whole queue of them.

Times are ``time.monotonic_ns()`` values, which all processes of one machine share.
"""

from __future__ import annotations

import math
from typing import Protocol

NS_PER_S = 1_000_000_000


class Pacer(Protocol):
    """What a worker loop asks before each request."""

    def take(self, now_ns: int) -> int | None:
        """The intended start (ns) of a request that may go now, or ``None`` if none is due."""

    def next_due_ns(self, now_ns: int) -> int | None:
        """When the next request becomes due, or ``None`` once this worker's share is done."""


def arrivals_in(rate: float, duration_s: float) -> int:
    """How many arrivals at ``rate`` per second are due in ``[start, start + duration)``.

    Counted on the nanosecond schedule :meth:`OpenLoop.intended_ns` uses, not as ``ceil(rate * duration)``:
    that float product overshoots (50/s for 1.1 s is 55.00000000000001, so 56 arrivals, the last one at
    exactly start + duration, outside the interval).
    """
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate {rate!r}: expected > 0")
    if not duration_s >= 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration {duration_s!r} s: expected a finite number >= 0")
    interval_ns = NS_PER_S / rate
    duration_ns = round(duration_s * NS_PER_S)
    count = math.ceil(rate * duration_s)
    while count > 0 and int((count - 1) * interval_ns) >= duration_ns:
        count -= 1
    while int(count * interval_ns) < duration_ns:
        count += 1
    return count


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``total`` requests split as evenly as possible across ``workers``."""
    return total // workers + (1 if index < total % workers else 0)


class ClosedLoop:
    """Send whenever a slot is free, until ``requests`` were started or ``end_ns`` has passed."""

    __slots__ = ("_remaining", "_end_ns")

    def __init__(self, *, requests: int | None = None, end_ns: int | None = None) -> None:
        if (requests is None) == (end_ns is None):
            raise ValueError("ClosedLoop needs exactly one of requests and end_ns")
        self._remaining = requests if requests is not None else -1  # -1: unlimited count
        self._end_ns = end_ns

    def take(self, now_ns: int) -> int | None:
        """The intended start of a request that may go now (``now_ns``), or ``None`` when done."""
        if self._remaining == 0 or (self._end_ns is not None and now_ns >= self._end_ns):
            self._remaining = 0
            return None
        if self._remaining > 0:
            self._remaining -= 1
        return now_ns

    def next_due_ns(self, now_ns: int) -> int | None:
        """When the next request becomes due: now, or ``None`` when the share is done."""
        if self._remaining == 0 or (self._end_ns is not None and now_ns >= self._end_ns):
            return None
        return now_ns

    @property
    def done(self) -> bool:
        return self._remaining == 0


class OpenLoop:
    """A constant arrival rate: this worker's share of ``total`` arrivals at ``rate`` per second from ``start_ns``."""

    __slots__ = ("_start_ns", "_interval_ns", "_next", "_stride", "_total")

    def __init__(self, *, rate: float, start_ns: int, total: int, worker: int = 0, workers: int = 1) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate {rate!r}: expected > 0")
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} of {workers}: expected 0 <= worker < workers")
        self._start_ns = start_ns
        self._interval_ns = NS_PER_S / rate  # float: exact schedule over long runs, no drift from rounding
        self._next = worker  # global arrival index of this worker's next request
        self._stride = workers
        self._total = total

    @classmethod
    def for_duration(cls, *, rate: float, start_ns: int, duration_s: float, worker: int = 0, workers: int = 1) -> OpenLoop:
        """Every arrival scheduled in ``[start, start + duration)``."""
        return cls(rate=rate, start_ns=start_ns, total=arrivals_in(rate, duration_s), worker=worker, workers=workers)

    def intended_ns(self, index: int) -> int:
        return self._start_ns + int(index * self._interval_ns)

    def take(self, now_ns: int) -> int | None:
        """The intended start of the next request if it is due by ``now_ns`` (it may be overdue), else ``None``."""
        if self._next >= self._total:
            return None
        intended = self.intended_ns(self._next)
        if intended > now_ns:
            return None
        self._next += self._stride
        return intended

    def next_due_ns(self, now_ns: int) -> int | None:
        """When this worker's next request is due, or ``None`` when its share is done."""
        return self.intended_ns(self._next) if self._next < self._total else None

    @property
    def done(self) -> bool:
        return self._next >= self._total

    @property
    def scheduled(self) -> int:
        """How many arrivals this worker owns in total."""
        first = self._next % self._stride if self._stride else 0
        return max(0, -(-(self._total - first) // self._stride))
