"""First come, first served model runs (--standin_model_run_slots=N): at most N session runs at once,
the others wait in arrival order.

Without batching, every gRPC or REST handler thread runs its own ``Session`` call. With more calls
in flight than cores (16 handler threads on 2 cores), TensorFlow interleaves the concurrent runs on
its shared pools, and a run that falls behind keeps losing to runs started after it: that spread of
the model run is the stand-in's tail at concurrency 16 (docs/tf-serving.md, "The gRPC tail").
Letting only N runs into TensorFlow and the others in the order they came turns that lottery into a
queue. It is off by default: each hand-over wakes a thread that must then win the GIL, so with N at
the core count the stand-in answered fewer calls per second than with no limit."""

from __future__ import annotations

import threading
import time
from collections import deque


class RunSlots:
    """A semaphore that grants its slots strictly in arrival order (no barging) and honours deadlines.

    ``acquire`` returns False if ``deadline`` (``time.monotonic()``) passes before a slot is granted;
    every True must be paired with one ``release``.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"RunSlots needs at least one slot, got {slots}")
        self.slots = slots
        self._free = slots
        self._lock = threading.Lock()
        # One locked lock per waiter, oldest first; release() hands its slot over by unlocking it.
        self._waiters: deque[threading.Lock] = deque()

    def waiting(self) -> int:
        """Callers queued for a slot (an observable state for tests and logs)."""
        with self._lock:
            return len(self._waiters)

    def acquire(self, deadline: float | None = None) -> bool:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if turn.acquire(timeout=timeout):
            return True
        with self._lock:
            try:
                self._waiters.remove(turn)
            except ValueError:
                # release() handed this waiter the slot just as its deadline passed: give it back.
                self._hand_over()
        return False

    def release(self) -> None:
        with self._lock:
            self._hand_over()

    def _hand_over(self) -> None:
        """Under the lock: the slot goes to the oldest waiter, else back to the free ones."""
        if self._waiters:
            self._waiters.popleft().release()
        else:
            self._free += 1
