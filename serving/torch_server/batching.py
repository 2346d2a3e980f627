"""Micro-batching without a timer: requests that wait for a worker's model share its next forward pass.

A worker runs one forward pass at a time. A request that finds the model free runs at once, in its
own thread, alone: nothing waits for company. A request that arrives while a pass is running joins
the queue; when the pass ends, the thread that ran it hands the model to the first queued request,
which runs everything queued behind it (up to ``max_batch_size`` images) as one pass. So batches
form only from requests that would have waited anyway, and their size follows the load: one image
at low concurrency, about as many as arrive during one pass at high concurrency.

Requests pinned to different model versions never share a pass, and a request of ``max_batch_size``
images or more is a pass of its own. It pays where a worker takes several requests at once: gunicorn's
gevent workers (the CPU default; gevent_worker.py sets ``gather`` and ``run_pass``) or gthread workers with
request threads (``MNIST_REST_THREADS`` > 1). docs/rest-server.md has the figures.

Under gevent a small pass runs on the event loop's own thread: a pass that never returns stops the
whole worker, its heartbeat included, so gunicorn's master replaces it after ``MNIST_REST_TIMEOUT``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from serving.torch_server.errors import ServiceUnavailable

log = logging.getLogger(__name__)

# A queued request waits at most this long for its pass before it is answered 503.
_RESULT_TIMEOUT_S = 30.0

Prediction = tuple[np.ndarray, np.ndarray]


class Predicts(Protocol):
    def predict(self, images: np.ndarray) -> Prediction: ...


class _Request:
    __slots__ = ("model", "images", "done", "result", "error", "lead")

    def __init__(self, model: Predicts, images: np.ndarray) -> None:
        self.model = model
        self.images = images
        self.done = threading.Event()
        self.result: Prediction | None = None
        self.error: BaseException | None = None
        self.lead = False  # set when this request is handed the model to run the next pass


def run_directly(model: Predicts, images: np.ndarray) -> Prediction:
    """One pass in the calling thread: the default pass runner of MicroBatcher and Predictor."""
    return model.predict(images)


class MicroBatcher:
    """One forward pass at a time per worker; requests queued behind a pass share the next one."""

    def __init__(self, max_batch_size: int, on_forward: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected an integer >= 1")
        self.max_batch_size = max_batch_size
        self._on_forward = on_forward
        self._lock = threading.Lock()
        self._queue: deque[_Request] = deque()
        self._busy = False  # a thread holds the model
        self._pass_started = 0.0  # when the running pass began (time.monotonic)
        # Called (once) when a pass has held the model past the wait limit: under gunicorn, it
        # tells the worker to exit so that the master replaces it (gunicorn_conf.post_worker_init).
        self.on_stuck: Callable[[], None] | None = None
        self._stuck_reported = False
        # Called by the thread handed the model, before it takes the queue. Under gevent (gevent_worker.adapt
        # sets gevent.idle here) requests are greenlets of one thread that queue only while the lead
        # yields: gevent.idle returns once the event loop has nothing else ready, so every request
        # already received (read, decoded, queued) joins this pass. That is one loop turn, no timer:
        # a lone request runs at once.
        self.gather: Callable[[], None] | None = None
        # Runs one pass, ``model.predict(images)`` by default; a gevent worker sends large passes to a
        # native thread (gevent_worker.run_pass).
        self.run_pass: Callable[[Predicts, np.ndarray], Prediction] = run_directly

    def queued(self) -> int:
        """Requests waiting for the model now (not counting the pass that runs)."""
        return len(self._queue)

    def predict(self, model: Predicts, images: np.ndarray) -> Prediction:
        """``model.predict(images)``, possibly as rows of a larger pass shared with other requests."""
        request = _Request(model, images)
        with self._lock:
            if self._busy:
                self._queue.append(request)
            else:
                self._busy = True
                request.lead = True
        if not request.lead:
            if not request.done.wait(_RESULT_TIMEOUT_S):
                self._withdraw(request)  # raises 503, unless a pass took the request just now:
                request.done.wait()  # then that pass's end (or the hand-over) is near
            if not request.lead:
                return self._outcome(request)
        self._run_from(request)
        return self._outcome(request)

    def _withdraw(self, request: _Request) -> None:
        with self._lock:
            try:
                self._queue.remove(request)
            except ValueError:
                return  # taken into a pass (or handed the model) just now: its answer is coming
            stuck = (self._busy and time.monotonic() - self._pass_started > _RESULT_TIMEOUT_S
                     and not self._stuck_reported)  # fmt: skip
            self._stuck_reported = self._stuck_reported or stuck
        if stuck:
            log.critical("a forward pass has held the model for over %.0f s; this worker cannot serve", _RESULT_TIMEOUT_S)
            if self.on_stuck is not None:
                self.on_stuck()
        raise ServiceUnavailable(f"the model did not become free within {_RESULT_TIMEOUT_S:.0f} s; retry")

    def _run_from(self, first: _Request) -> None:
        """Run ``first`` and whatever is queued behind it, then hand the model on (or free it)."""
        try:
            if self.gather is not None:
                self.gather()
            self._pass_started = time.monotonic()
            batch = self._take(first)
            self._execute(batch)
        finally:
            with self._lock:
                successor = self._queue.popleft() if self._queue else None
                if successor is None:
                    self._busy = False
                else:
                    successor.lead = True
            if successor is not None:
                successor.done.set()

    def _take(self, first: _Request) -> list[_Request]:
        batch, size = [first], len(first.images)
        with self._lock:
            while self._queue and size + len(self._queue[0].images) <= self.max_batch_size:
                request = self._queue.popleft()
                batch.append(request)
                size += len(request.images)
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        groups: dict[int, list[_Request]] = {}
        for request in batch:  # one forward pass per model version in the batch
            groups.setdefault(id(request.model), []).append(request)
        for members in groups.values():
            try:
                images = members[0].images if len(members) == 1 else np.concatenate([m.images for m in members])
                if self._on_forward is not None:
                    self._on_forward(len(images))
                probabilities, classes = self.run_pass(members[0].model, images)
            except BaseException as exc:  # every request of the pass gets the error, none waits forever
                if len(batch) > 1:
                    log.error("forward pass of %d requests failed: %s", len(members), exc)
                for member in members:
                    member.error = exc
                    member.done.set()
                continue
            start = 0
            for member in members:
                stop = start + len(member.images)
                member.result = (probabilities[start:stop], classes[start:stop])
                start = stop
                member.done.set()

    @staticmethod
    def _outcome(request: _Request) -> Prediction:
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result
