"""Server-side batching with TF Serving's parameters and its queueing rules.

Like TF Serving's SharedBatchScheduler + BatchingSession:

- each (version, signature, outputs) has its own queue of batches; one pool of
  ``num_batch_threads`` threads serves all queues in turn;
- a request ("task") joins the open batch of its queue; a batch is closed when
  the next task would not fit in ``max_batch_size``; a thread takes a closed
  batch at once, and an open one when its oldest task has waited
  ``batch_timeout_micros`` (0: as soon as a thread is free);
- a task larger than ``max_batch_size`` is INVALID_ARGUMENT; a task that would
  need one batch more than ``max_enqueued_batches`` is UNAVAILABLE ("queue is
  full"), so the caller can back off or go to another replica;
- a formed batch is padded up to the next ``allowed_batch_sizes`` entry with
  copies of its first row, run once, and its outputs are split back per task.

With ``pad_variable_length_inputs`` off, tasks whose inputs differ beyond the
batch dimension go to different queues rather than failing together.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from serving.tfs_standin import status
from serving.tfs_standin.config import BatchingOptions
from serving.tfs_standin.predict import timeout_ms
from serving.tfs_standin.servable import Servable, Signature

log = logging.getLogger(__name__)

QUEUE_FULL_MESSAGE = "The batch scheduling queue to which this task was submitted is full"


@dataclass(eq=False)
class _Task:
    inputs: list[np.ndarray]
    size: int
    deadline: float | None
    enqueued_at: float
    done: threading.Lock = field(default_factory=threading.Lock)  # held until the result is set
    outputs: list[np.ndarray] | None = None
    error: BaseException | None = None
    abandoned: bool = False  # the caller's deadline passed while it waited

    def finish(self, outputs: list[np.ndarray] | None = None, error: BaseException | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.done.release()


@dataclass(eq=False)
class _Queue:
    servable: Servable
    signature: Signature
    fetch: tuple[str, ...]
    closed: deque[list[_Task]] = field(default_factory=deque)
    open: list[_Task] = field(default_factory=list)
    open_size: int = 0

    def batches(self) -> int:
        return len(self.closed) + (1 if self.open else 0)

    def close_open(self) -> None:
        if self.open:
            self.closed.append(self.open)
            self.open, self.open_size = [], 0


class BatchScheduler:
    """A Runner that batches concurrent requests (see the module docstring)."""

    def __init__(self, options: BatchingOptions) -> None:
        self.options = options
        self._timeout_s = options.batch_timeout_micros / 1e6
        self._queues: dict[tuple[object, ...], _Queue] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.batches_run = 0  # statistics, updated by the batch threads
        self.tasks_run = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"{options.thread_pool_name}-{i}", daemon=True)
            for i in range(options.threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("batching on: %s", self.options)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new tasks, finish the queued ones, then end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        if self.batches_run:
            log.info("batching: %d requests in %d batches (%.1f requests per batch)",
                     self.tasks_run, self.batches_run, self.tasks_run / self.batches_run)

    def queued_tasks(self) -> int:
        """Requests waiting in a batch that no batch thread has taken yet (an observable queue length)."""
        with self._cond:
            return sum(len(q.open) + sum(len(batch) for batch in q.closed) for q in self._queues.values())

    # --- the caller's side (gRPC handler threads) ------------------------------

    def run(
        self,
        servable: Servable,
        signature: Signature,
        inputs: list[np.ndarray],
        fetch: tuple[str, ...],
        deadline: float | None,
    ) -> list[np.ndarray]:
        size = self._task_size(inputs)
        if size > self.options.max_batch_size:
            raise status.invalid_argument(
                f"Task size {size} is larger than maximum input batch size {self.options.max_batch_size}"
            )
        task = _Task(inputs, size, deadline, time.monotonic())
        task.done.acquire()
        key: tuple[object, ...] = (id(servable), signature.name, fetch)
        if not self.options.pad_variable_length_inputs:
            key += tuple(a.shape[1:] for a in inputs)
        with self._cond:
            if self._stopping:
                raise status.unavailable("the server is shutting down and takes no new requests")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(servable, signature, fetch)
            if queue.open_size + size > self.options.max_batch_size:
                if queue.batches() >= self.options.max_enqueued_batches:
                    raise status.unavailable(QUEUE_FULL_MESSAGE)
                queue.close_open()
            elif not queue.open and queue.batches() >= self.options.max_enqueued_batches:
                raise status.unavailable(QUEUE_FULL_MESSAGE)
            queue.open.append(task)
            queue.open_size += size
            if queue.open_size == self.options.max_batch_size:
                queue.close_open()
            self._cond.notify()
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not task.done.acquire(timeout=wait):
            task.abandoned = True
            raise status.deadline_exceeded("the call's deadline passed while it waited in the batch queue")
        if task.error is not None:
            raise task.error
        assert task.outputs is not None
        return task.outputs

    @staticmethod
    def _task_size(inputs: list[np.ndarray]) -> int:
        if any(a.ndim == 0 for a in inputs):
            raise status.invalid_argument(
                "Batching session Run() input tensors must have at least one dimension (the batch dimension)"
            )
        sizes = {a.shape[0] for a in inputs}
        if len(sizes) != 1:
            raise status.invalid_argument(
                f"Batching session Run() input tensors must have equal 0th-dimension size; got {sorted(sizes)}"
            )
        return sizes.pop()

    # --- the batch threads -----------------------------------------------------------

    def _next_batch(self) -> tuple[_Queue, list[_Task]] | None:
        """Under the lock: wait for a batch that is due; None once stopping and drained."""
        while True:
            now = time.monotonic()
            next_due: float | None = None
            for key, queue in list(self._queues.items()):
                if queue.closed:
                    batch = queue.closed.popleft()
                elif queue.open and (
                    self._stopping or now - queue.open[0].enqueued_at >= self._timeout_s
                ):
                    batch = queue.open
                    queue.open, queue.open_size = [], 0
                else:
                    if queue.open:
                        due = queue.open[0].enqueued_at + self._timeout_s
                        next_due = due if next_due is None else min(next_due, due)
                    continue
                # Round robin: this queue goes to the back; an empty one is dropped so
                # that it holds no reference to an unloaded version.
                del self._queues[key]
                if queue.batches():
                    self._queues[key] = queue
                return queue, batch
            if self._stopping and not self._queues:
                return None
            self._cond.wait(None if next_due is None else max(0.0, next_due - now))

    def _work(self) -> None:
        while True:
            with self._cond:
                item = self._next_batch()
            if item is None:
                return
            queue, batch = item
            self._process(queue, batch)

    def _process(self, queue: _Queue, batch: list[_Task]) -> None:
        now = time.monotonic()
        live = []
        for task in batch:
            if task.abandoned or (task.deadline is not None and task.deadline <= now):
                task.finish(error=status.deadline_exceeded("the call's deadline passed while it waited in the "
                                                          "batch queue"))
            else:
                live.append(task)
        if not live:
            return
        self.batches_run += 1
        self.tasks_run += len(live)
        try:
            outputs = self._run_batch(queue, live)
        except BaseException as exc:  # noqa: BLE001 - every task of the batch gets the error
            error = exc if isinstance(exc, status.ServingError) else status.internal(f"batch failed: {exc}")
            for task in live:
                task.finish(error=error)
            return
        start = 0
        for task in live:
            end = start + task.size
            task.finish(outputs=[out[start:end] for out in outputs])
            start = end

    def _run_batch(self, queue: _Queue, tasks: list[_Task]) -> list[np.ndarray]:
        total = sum(t.size for t in tasks)
        padded = self._padded_size(total)
        inputs = []
        for i in range(len(tasks[0].inputs)):
            parts = [t.inputs[i] for t in tasks]
            if self.options.pad_variable_length_inputs:
                parts = _pad_to_common_shape(parts)
            if padded > total:
                parts.append(np.repeat(parts[0][:1], padded - total, axis=0))
            inputs.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        deadlines = [t.deadline for t in tasks]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        outputs = queue.servable.run(queue.signature, inputs, queue.fetch, timeout_ms(deadline, "the batch ran"))
        for alias, out in zip(queue.fetch, outputs):
            if out.ndim == 0 or out.shape[0] != padded:
                raise status.internal(
                    f"output '{alias}' has shape {list(out.shape)}; batching needs its 0th dimension to be the "
                    f"batch size {padded}"
                )
        return outputs

    def _padded_size(self, size: int) -> int:
        sizes = self.options.allowed_batch_sizes
        if not sizes:
            return size
        return sizes[bisect.bisect_left(sizes, size)]


def _pad_to_common_shape(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Zero-pad every dimension after the batch one up to the largest in the batch."""
    target = np.max([p.shape for p in parts], axis=0)
    padded = []
    for part in parts:
        widths = [(0, 0)] + [(0, int(t - s)) for s, t in zip(part.shape[1:], target[1:])]
        padded.append(np.pad(part, widths) if any(w for _, w in widths) else part)
    return padded
