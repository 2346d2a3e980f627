""".npy bodies decoded by many request threads at once (gunicorn's gthread workers).

numpy reads a .npy header with ast.literal_eval, and before CPython 3.11.8 two threads building ASTs at once
could fail a valid request with "SystemError: AST constructor recursion depth mismatch" (gh-106905). The race
needs the GIL to change hands inside the AST builder, which a garbage collection running a finaliser causes;
the test forces both (frequent collections, a tiny switch interval), so without the codec's lock it fails in
about one parse in a hundred on 3.11.7.
"""

from __future__ import annotations

import gc
import io
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from serving.torch_server.codecs import NPY_CONTENT_TYPE, decode_request

THREADS = 8
PARSES_PER_THREAD = 600


class _CycleWithFinaliser:
    """Garbage that only the cycle collector frees, running Python code when it does."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(200))


@pytest.fixture
def gil_churn() -> Iterator[None]:
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(50, 1, 1)
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
        gc.collect()


def test_npy_bodies_decode_in_parallel_threads_without_spurious_errors(gil_churn):
    images = np.arange(10 * 28 * 28, dtype=np.uint32).reshape(10, 28, 28).astype(np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, images)
    body = buffer.getvalue()
    failures: list[str] = []
    decoded_ok = [0] * THREADS
    start = threading.Barrier(THREADS)

    def parse_many(slot: int) -> None:
        start.wait()
        for _ in range(PARSES_PER_THREAD):
            _CycleWithFinaliser()
            try:
                decoded = decode_request(body, NPY_CONTENT_TYPE, max_batch=64)
            except Exception as exc:  # noqa: BLE001 - any exception here is the bug under test
                failures.append(repr(exc))
                continue
            if decoded.images.shape == (10, 28, 28) and np.array_equal(np.rint(decoded.images * 255), images):
                decoded_ok[slot] += 1

    workers = [threading.Thread(target=parse_many, args=(slot,)) for slot in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert failures == []
    assert decoded_ok == [PARSES_PER_THREAD] * THREADS
