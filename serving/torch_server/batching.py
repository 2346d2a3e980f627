"""Optional micro-batching: concurrent small requests of one worker share a forward pass.

Request threads hand their images to :meth:`MicroBatcher.predict` and wait; one
batching thread takes the first waiting request, collects more until
``max_batch_size`` images are gathered or ``timeout_micros`` have passed since
the first, runs one forward pass per model version in the group and hands each
request its rows back. Requests that are already ``max_batch_size`` images or
more skip the queue.

The batching thread only waits for requests that exist: every request holds
:meth:`MicroBatcher.scope` from its start (before its body is read and
decoded), and a batch closes at once when every request in the scope is in it.
A request that is alone in the scope runs in its own thread with no hand-over
and no delay; concurrent ones wait at most ``timeout_micros`` for each other.

It only pays where a forward pass of B images costs much less than B passes of
one image (GPUs) and where a worker has several request threads
(``MNIST_REST_THREADS`` > 1, gunicorn's gthread worker). docs/rest-server.md
has the measured figures behind the default (off).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from serving.torch_server.errors import ServiceUnavailable
from serving.torch_server.model_store import LoadedModel

log = logging.getLogger(__name__)

# A request waits at most this long for its batch before it is answered 503.
_RESULT_TIMEOUT_S = 30.0

Prediction = tuple[np.ndarray, np.ndarray]


class _Pending:
    __slots__ = ("model", "images", "future")

    def __init__(self, model: LoadedModel, images: np.ndarray) -> None:
        self.model = model
        self.images = images
        self.future: Future[Prediction] = Future()


class MicroBatcher:
    def __init__(
        self,
        max_batch_size: int,
        timeout_micros: int,
        on_forward: Callable[[int], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_micros / 1e6
        self._on_forward = on_forward
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._carry: _Pending | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._in_scope = 0  # requests being handled that may still join a batch
        self._scope_lock = threading.Lock()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Hold for the whole handling of a request, so that the batcher knows who may still come."""
        with self._scope_lock:
            self._in_scope += 1
        try:
            yield
        finally:
            with self._scope_lock:
                self._in_scope -= 1

    def predict(self, model: LoadedModel, images: np.ndarray) -> Prediction:
        if len(images) >= self.max_batch_size or self._alone():
            # Large enough on its own, or nobody to batch with: run it in this thread, without
            # the hand-over to the batching thread, and tell the batcher not to wait for it.
            with self._scope_lock:
                self._in_scope -= 1
            try:
                self._forwarded(len(images))
                return model.predict(images)
            finally:
                with self._scope_lock:
                    self._in_scope += 1
        self._ensure_started()
        pending = _Pending(model, images)
        self._queue.put(pending)
        try:
            return pending.future.result(timeout=_RESULT_TIMEOUT_S)
        except TimeoutError:
            raise ServiceUnavailable(f"the batching queue did not answer within {_RESULT_TIMEOUT_S:.0f} s") from None

    def _alone(self) -> bool:
        return self._in_scope <= 1 and self._queue.empty() and self._carry is None

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5.0)
            self._thread = None

    def _ensure_started(self) -> None:
        # Started lazily, in the process and thread that serves (never before a fork).
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
                    self._thread.start()

    def _forwarded(self, images: int) -> None:
        if self._on_forward is not None:
            self._on_forward(images)

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception as exc:  # never leave a request waiting
                log.exception("micro-batch of %d requests failed", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)

    def _collect(self) -> list[_Pending] | None:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, size = [first], len(first.images)
        deadline = time.monotonic() + self.timeout_s
        while size < self.max_batch_size:
            if self._in_scope <= len(batch) and self._queue.empty():
                break  # nobody else is on the way: do not wait for company that cannot come
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            if size + len(item.images) > self.max_batch_size:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            size += len(item.images)
        return batch

    def _execute(self, batch: list[_Pending]) -> None:
        groups: dict[int, list[_Pending]] = {}
        for pending in batch:  # one forward pass per model version in the batch
            groups.setdefault(id(pending.model), []).append(pending)
        for members in groups.values():
            images = members[0].images if len(members) == 1 else np.concatenate([m.images for m in members])
            self._forwarded(len(images))
            probabilities, classes = members[0].model.predict(images)
            start = 0
            for member in members:
                stop = start + len(member.images)
                member.future.set_result((probabilities[start:stop], classes[start:stop]))
                start = stop
