"""What a gevent worker changes in the app (serving/torch_server/gevent_worker.py), in this process.

The real worker (gunicorn with gevent, the CPU default) is tested in test_rest_gunicorn.py: passes
shared by concurrent requests, and metrics answered while two 1024-image passes run (the SIGTERM test).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import gevent
import numpy as np
import pytest

from mnist_client import contract
from serving.torch_server import gevent_worker
from serving.torch_server.app import create_app


class _Recorder:
    """Stands in for a LoadedModel: records the thread of each pass, answers row i with class i."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.threads.append(threading.get_ident())
        classes = np.arange(len(images), dtype=np.int64)
        return np.zeros((len(images), contract.NUM_CLASSES), dtype=np.float32), classes


def _images(count: int) -> np.ndarray:
    return np.zeros((count, *contract.IMAGE_SHAPE), dtype=np.float32)


def test_small_passes_run_on_the_loop_and_large_ones_in_a_native_thread() -> None:
    model = _Recorder()
    small = gevent_worker.OFFLOAD_MIN_IMAGES - 1
    _, classes = gevent_worker.run_pass(model, _images(small))
    assert classes.tolist() == list(range(small))
    _, classes = gevent_worker.run_pass(model, _images(gevent_worker.OFFLOAD_MIN_IMAGES))
    assert classes.tolist() == list(range(gevent_worker.OFFLOAD_MIN_IMAGES))
    here = threading.get_ident()
    assert model.threads[0] == here and model.threads[1] != here


@pytest.fixture()
def app_state(model_repo: Path, tmp_path: Path):
    base = tmp_path / "mnist"
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    app = create_app({"model_base_path": base, "poll_seconds": 3600, "batching": True})
    yield app.extensions["mnist"]
    app.extensions["mnist"].store.stop_watching()


def test_adapt_sets_the_gather_the_pass_runner_and_the_loader_runner(app_state) -> None:
    gevent_worker.adapt(app_state)
    assert app_state.batcher.gather is gevent.idle
    assert app_state.batcher.run_pass is gevent_worker.run_pass
    assert app_state.predictor.run_pass is gevent_worker.run_pass
    loaded_in: list[int] = []

    def load(*args: object) -> tuple[object, ...]:
        loaded_in.append(threading.get_ident())
        return args

    assert app_state.store.run_loader(load, "path", 3) == ("path", 3)
    assert loaded_in and loaded_in[0] != threading.get_ident()  # off the event loop's thread
