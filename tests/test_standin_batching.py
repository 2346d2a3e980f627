"""Server-side batching: TF Serving's parameters and queueing rules, then a live server with batching on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import types_pb2

from mnist_client import contract
from serving.tfs_standin import status
from serving.tfs_standin.batching import QUEUE_FULL_MESSAGE, BatchScheduler
from serving.tfs_standin.config import BatchingOptions, ConfigError
from serving.tfs_standin.servable import Signature, TensorSpec
from tests.standin_helpers import (
    outputs,
    running,
    server_options,
    stubs_for,
    tf_model_copy,  # noqa: F401 - fixture
    wait_for,
)

X = TensorSpec("x", "x:0", types_pb2.DT_FLOAT, np.dtype(np.float32), (None, 2))
Y = TensorSpec("y", "y:0", types_pb2.DT_FLOAT, np.dtype(np.float32), (None, 2))
SIGNATURE = Signature("serving_default", {"x": X}, {"y": Y}, ("x",), ("y",))


class Doubler:
    """Stands in for a Servable: y = 2x, recording each batch size; can be held to fill the queue."""

    name, version = "fake", 1

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def run(self, signature: Signature, inputs: list[np.ndarray], fetch: tuple[str, ...],
            timeout_ms: int | None = None) -> list[np.ndarray]:
        self.started.set()
        self.release.wait(10)
        self.batch_sizes.append(len(inputs[0]))
        return [inputs[0] * 2]


@pytest.fixture
def make_scheduler() -> Iterator:
    created: list[BatchScheduler] = []

    def make(**params: object) -> BatchScheduler:
        scheduler = BatchScheduler(BatchingOptions(**params))  # type: ignore[arg-type]
        scheduler.start()
        created.append(scheduler)
        return scheduler

    yield make
    for scheduler in created:
        scheduler.stop(timeout=10)


def _rows(start: int, count: int) -> np.ndarray:
    return np.arange(start * 2, (start + count) * 2, dtype=np.float32).reshape(count, 2)


def _submit(scheduler: BatchScheduler, servable: Doubler, rows: np.ndarray,
            deadline: float | None = None) -> np.ndarray:
    return scheduler.run(servable, SIGNATURE, [rows], ("y",), deadline)[0]  # type: ignore[arg-type]


def test_concurrent_tasks_share_one_run_and_each_gets_its_own_rows(make_scheduler) -> None:
    # 15 rows fill the batch exactly, which closes it at once; the 60 s timeout only bounds a broken run.
    scheduler = make_scheduler(max_batch_size=15, batch_timeout_micros=60_000_000, num_batch_threads=1)
    servable = Doubler()
    tasks = [_rows(10 * i, i + 1) for i in range(5)]  # sizes 1..5
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda rows: _submit(scheduler, servable, rows), tasks))
    for rows, result in zip(tasks, results):
        np.testing.assert_array_equal(result, rows * 2)
    assert servable.batch_sizes == [15]  # one run for all five tasks


def test_a_task_larger_than_max_batch_size_is_invalid(make_scheduler) -> None:
    scheduler = make_scheduler(max_batch_size=4)
    with pytest.raises(status.ServingError) as caught:
        _submit(scheduler, Doubler(), _rows(0, 5))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "Task size 5 is larger than maximum input batch size 4"


def test_a_full_queue_answers_unavailable(make_scheduler) -> None:
    scheduler = make_scheduler(max_batch_size=1, num_batch_threads=1, max_enqueued_batches=1)
    servable = Doubler()
    servable.release.clear()
    with ThreadPoolExecutor(2) as pool:
        running_task = pool.submit(_submit, scheduler, servable, _rows(0, 1))
        assert servable.started.wait(10)  # the only thread is busy with the first task
        queued_task = pool.submit(_submit, scheduler, servable, _rows(1, 1))
        wait_for(lambda: scheduler.queued_tasks() == 1, what="the second task to fill the one allowed batch")
        with pytest.raises(status.ServingError) as caught:
            _submit(scheduler, servable, _rows(2, 1))
        servable.release.set()
        np.testing.assert_array_equal(running_task.result(10), _rows(0, 1) * 2)
        np.testing.assert_array_equal(queued_task.result(10), _rows(1, 1) * 2)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.message == QUEUE_FULL_MESSAGE


def test_batches_are_padded_to_the_next_allowed_size(make_scheduler) -> None:
    scheduler = make_scheduler(max_batch_size=8, allowed_batch_sizes=(2, 4, 8))
    servable = Doubler()
    result = _submit(scheduler, servable, _rows(0, 3))
    assert servable.batch_sizes == [4]
    np.testing.assert_array_equal(result, _rows(0, 3) * 2)


def test_a_call_whose_deadline_passes_in_the_queue_gets_deadline_exceeded(make_scheduler) -> None:
    scheduler = make_scheduler(max_batch_size=8, batch_timeout_micros=2_000_000)
    with pytest.raises(status.ServingError) as caught:
        _submit(scheduler, Doubler(), _rows(0, 1), deadline=time.monotonic() + 0.1)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_stop_finishes_queued_tasks_then_refuses_new_ones(make_scheduler) -> None:
    # The batch would wait ten minutes for company: only stop() can have run it within the safety deadline.
    scheduler = make_scheduler(max_batch_size=8, batch_timeout_micros=600_000_000)
    servable = Doubler()
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(_submit, scheduler, servable, _rows(0, 2))
        wait_for(lambda: scheduler.queued_tasks() == 1, what="the task to wait in the open batch")
        scheduler.stop(timeout=60)
        np.testing.assert_array_equal(queued.result(60), _rows(0, 2) * 2)
    assert scheduler.queued_tasks() == 0
    with pytest.raises(status.ServingError) as caught:
        _submit(scheduler, servable, _rows(0, 1))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"max_batch_size": 0}, "max_batch_size is 0"),
        ({"max_batch_size": 8, "allowed_batch_sizes": (2, 4)}, "expected max_batch_size (8)"),
        ({"max_batch_size": 8, "allowed_batch_sizes": (4, 2, 8)}, "positive and increasing"),
        ({"max_enqueued_batches": 0}, "max_enqueued_batches is 0"),
    ],
)
def test_bad_batching_parameters_are_refused(params: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match="batching parameters") as caught:
        BatchingOptions(**params)
    assert fragment in str(caught.value)


def test_live_server_with_batching_answers_like_without(
    tf_model_copy: Path, tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray]  # noqa: F811
) -> None:
    images = test_images[0][:64]
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 2000 }\n"
                      "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n")
    with running(server_options(tf_model_copy)) as plain, stubs_for(plain) as stubs:
        want = outputs(stubs.predict(images))
    options = server_options(tf_model_copy, enable_batching=True, batching_parameters_file=str(params))
    with running(options) as batched, stubs_for(batched) as stubs, ThreadPoolExecutor(16) as pool:
        singles = list(pool.map(lambda i: outputs(stubs.predict(images[i : i + 1])), range(len(images))))
        scheduler = batched.core.batch_scheduler
        assert scheduler is not None and scheduler.options.max_batch_size == 64
    got_classes = np.concatenate([s[contract.CLASSES_NAME] for s in singles])
    got_probabilities = np.concatenate([s[contract.PROBABILITIES_NAME] for s in singles])
    np.testing.assert_array_equal(got_classes, want[contract.CLASSES_NAME])
    np.testing.assert_allclose(got_probabilities, want[contract.PROBABILITIES_NAME], atol=1e-5)
