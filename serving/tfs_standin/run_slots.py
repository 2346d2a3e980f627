"""First come, first served model runs: at most N session runs at once, the rest wait in arrival order.

Without batching, every gRPC or REST handler thread runs its own ``Session`` call. With more calls
in flight than cores (16 handler threads on 2 cores), TensorFlow interleaves the concurrent runs on
its shared inter-op pool, whose per-thread queues serve the newest work first: a run that falls
behind keeps losing to runs started after it. That spread of the model run was the whole tail of
the stand-in's calls at concurrency 16 (docs/tf-serving.md, "The gRPC tail"). Letting only as many
runs into TensorFlow as there are cores, and the others in the order they came, turns that lottery
into a queue: each call waits for the calls ahead of it, no longer.
"""

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
