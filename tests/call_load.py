"""Steady client load for the fault and version tests: threads calling back to back, every outcome kept."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    result: str  # what the call function returned: "ok", "version 2", an HTTP status, a gRPC code name, ...


class Load:
    """``threads`` threads calling ``call()`` back to back until the ``with`` block ends (or 120 s).

    An exception from ``call`` does not end its thread: it is kept as a ``"raised Type: message"`` outcome.
    """

    def __init__(self, call: Callable[[], str], threads: int = 4) -> None:
        self.outcomes: list[Outcome] = []
        self._call = call
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # a safety net: the tests end their blocks far sooner
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                result = self._call()
            except Exception as exc:  # noqa: BLE001 - kept as an outcome, so the test's assertions see it
                result = f"raised {type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), result))

    def count(self, result: str | None = "ok", after: float = 0.0) -> int:
        """Calls that returned ``result`` (None: anything) and started at or after ``after`` (``time.monotonic()``)."""
        with self._lock:
            return sum(1 for o in self.outcomes if result in (None, o.result) and o.started >= after)

    def results(self) -> Counter[str]:
        with self._lock:
            return Counter(o.result for o in self.outcomes)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
