"""The REST server's model store: which versions it loads, refuses, keeps and unloads, and when."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mnist_client import contract
from serving.model_repository import publish_version
from serving.torch_server.batching import MicroBatcher
from serving.torch_server.model_store import (
    AVAILABLE,
    END,
    LOADING,
    OPTIMIZED_MIN_BATCH,
    ModelStore,
    load_version,
)

CPU = torch.device("cpu")


@pytest.fixture()
def base(model_repo: Path, tmp_path: Path) -> Path:
    """A fresh copy of the quick-trained TorchScript version 1."""
    base = tmp_path / "mnist"
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    return base


def copy_version(base: Path, version: int) -> None:
    with publish_version(base, version) as (staging, _):
        shutil.copy(base / "1" / contract.TORCHSCRIPT_FILENAME, staging)


def publish_module(base: Path, version: int, module: nn.Module) -> None:
    with publish_version(base, version) as (staging, _):
        torch.jit.script(module).save(str(staging / contract.TORCHSCRIPT_FILENAME))


class _NoSoftmax(nn.Module):
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = images.flatten(1)[:, :10] * 5.0
        return {"probabilities": logits, "classes": torch.argmax(logits, dim=1)}


class _WrongNames(nn.Module):
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": images.flatten(1)[:, :10]}


class _Crashes(nn.Module):
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probabilities": images.view(-1, 13), "classes": images.view(-1)}


def states(store: ModelStore) -> dict[int, str]:
    return {s.version: s.state for s in store.statuses()}


def test_serves_the_highest_loadable_version(base):
    copy_version(base, 5)
    store = ModelStore(base, CPU)
    assert store.refresh() is True
    assert store.latest().version == 5 and store.loaded_versions() == [5]
    assert states(store) == {5: AVAILABLE}  # version 1 was never loaded
    assert store.refresh() is False  # nothing changed on disk


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_NoSoftmax(), "do not sum to 1"),
        (_WrongNames(), "returns ['scores']"),
        (_Crashes(), "fails on a dummy batch"),
    ],
    ids=["no_softmax", "wrong_output_names", "crashes"],
)
def test_a_version_breaking_the_contract_is_refused_and_the_old_one_serves(base, module, message):
    store = ModelStore(base, CPU)
    store.refresh()
    publish_module(base, 2, module)
    assert store.refresh() is False
    assert store.latest().version == 1
    refused = {s.version: s for s in store.statuses()}[2]
    assert refused.state == END and refused.error_code == "UNKNOWN" and message in refused.error_message


def test_model_json_with_another_signature_is_refused(base):
    copy_version(base, 2)
    meta = base / "2" / contract.METADATA_FILENAME
    meta.write_text(json.dumps({"signature": {"inputs": {"pixels": {}}}}))
    store = ModelStore(base, CPU)
    store.refresh()
    assert store.latest().version == 1
    assert "declares signature" in {s.version: s for s in store.statuses()}[2].error_message


def test_a_refused_version_is_retried_only_when_its_files_change(base):
    calls: list[int] = []

    def counting_loader(path: Path, version: int, device: torch.device):
        calls.append(version)
        return load_version(path, version, device)

    store = ModelStore(base, CPU, loader=counting_loader)
    store.refresh()
    with publish_version(base, 2) as (staging, _):
        (staging / contract.TORCHSCRIPT_FILENAME).write_bytes(b"garbage")
    for _ in range(3):
        store.refresh()
    assert calls == [1, 2]  # tried once, remembered
    shutil.copy(base / "1" / contract.TORCHSCRIPT_FILENAME, base / "2" / contract.TORCHSCRIPT_FILENAME)  # fixed
    assert store.refresh() is True
    assert calls == [1, 2, 2] and store.latest().version == 2
    assert states(store) == {2: AVAILABLE, 1: END}


def test_keep_versions_serves_several_and_unloads_the_oldest(base):
    copy_version(base, 2)
    store = ModelStore(base, CPU, keep_versions=2)
    store.refresh()
    assert store.loaded_versions() == [1, 2] and store.get(1) is not None
    copy_version(base, 3)
    store.refresh()
    assert store.loaded_versions() == [2, 3] and store.get(1) is None
    assert states(store) == {3: AVAILABLE, 2: AVAILABLE, 1: END}


def test_a_removed_folder_unloads_its_version_but_never_the_last_one(base):
    copy_version(base, 2)
    store = ModelStore(base, CPU)
    store.refresh()
    shutil.rmtree(base / "2")
    store.refresh()
    assert store.latest().version == 1  # falls back to the version still on disk
    assert states(store) == {2: END, 1: AVAILABLE}
    store.refresh()
    assert states(store) == {1: AVAILABLE}  # an unloaded version is forgotten once its folder is gone
    shutil.rmtree(base / "1")
    store.refresh()
    assert store.latest().version == 1  # nothing else loadable: keep serving what is in memory


def test_the_old_version_serves_while_the_new_one_loads(base, test_images):
    release = threading.Event()
    loading = threading.Event()

    def slow_loader(path: Path, version: int, device: torch.device):
        if version == 2:
            loading.set()
            assert release.wait(30)
        return load_version(path, version, device)

    store = ModelStore(base, CPU, loader=slow_loader)
    store.refresh()
    old = store.latest()
    copy_version(base, 2)
    refresher = threading.Thread(target=store.refresh)
    refresher.start()
    try:
        assert loading.wait(30)
        assert states(store) == {2: LOADING, 1: AVAILABLE}
        assert store.latest() is old
        probabilities, classes = old.predict(test_images[0][:4])
        assert probabilities.shape == (4, contract.NUM_CLASSES) and classes.dtype == np.int64
    finally:
        release.set()
        refresher.join(30)
    assert store.latest().version == 2
    # A request that picked version 1 before the swap finishes on it.
    assert old.predict(test_images[0][:1])[0].shape == (1, contract.NUM_CLASSES)


def test_watcher_picks_up_a_new_version(base):
    events: list[tuple[str, int]] = []
    store = ModelStore(base, CPU, listener=lambda event, version: events.append((event, version)))
    store.refresh()
    store.start_watching(0.05)
    try:
        copy_version(base, 2)
        deadline = threading.Event()
        for _ in range(400):
            if store.latest().version == 2:
                break
            deadline.wait(0.05)
    finally:
        store.stop_watching()
    assert store.latest().version == 2
    assert events == [("loaded", 1), ("loaded", 2), ("unloaded", 1)]


# -- the inference-optimised copy for larger batches -----------------------------------------------


def test_larger_batches_run_on_an_optimised_copy_that_agrees_with_the_export(base, test_images):
    images = test_images[0][:64]
    model = load_version(base / "1", 1, CPU)
    assert model.optimized is not None
    exported = load_version(base / "1", 1, CPU, optimize=False)
    assert exported.optimized is None
    for size in (1, OPTIMIZED_MIN_BATCH - 1, OPTIMIZED_MIN_BATCH, 64):
        got_probabilities, got_classes = model.predict(images[:size])
        want_probabilities, want_classes = exported.predict(images[:size])
        np.testing.assert_array_equal(got_classes, want_classes)
        np.testing.assert_allclose(got_probabilities, want_probabilities, atol=1e-5)


def test_a_failing_optimisation_leaves_the_version_serving_as_exported(base, test_images, monkeypatch, caplog):
    def broken(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.jit, "optimize_for_inference", broken)
    model = load_version(base / "1", 1, CPU)
    assert model.optimized is None
    assert "no optimised copy for large batches (no oneDNN here)" in caplog.text
    assert model.predict(test_images[0][:8])[1].shape == (8,)


# -- the micro-batcher -----------------------------------------------------------------------------


class _RecordingModel:
    """Stands in for a LoadedModel: records forward-pass sizes, answers row i with class i."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(len(images))
        marks = images[:, 0, 0].astype(np.int64)
        return np.repeat(images[:, 0, :1], contract.NUM_CLASSES, axis=1), marks


def test_micro_batcher_groups_concurrent_requests_and_returns_each_its_rows():
    batcher = MicroBatcher(max_batch_size=8, timeout_micros=300_000)
    model = _RecordingModel()
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    start = threading.Barrier(6)

    def request(index: int, size: int) -> None:
        images = np.full((size, *contract.IMAGE_SHAPE), index, dtype=np.float32)
        with batcher.scope():  # as the server does from the start of each request
            start.wait()
            results[index] = batcher.predict(model, images)

    sizes = {1: 1, 2: 2, 3: 1, 4: 3, 5: 1, 6: 1}  # 9 images: one batch of up to 8, the rest after
    threads = [threading.Thread(target=request, args=(i, n)) for i, n in sizes.items()]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        batcher.close()
    assert sorted(model.batches) != [1] * 6 and sum(model.batches) == 9 and max(model.batches) <= 8
    for index, size in sizes.items():
        probabilities, classes = results[index]
        assert classes.tolist() == [index] * size and probabilities.shape == (size, contract.NUM_CLASSES)


def test_micro_batcher_passes_large_requests_through_and_keeps_versions_apart():
    batcher = MicroBatcher(max_batch_size=4, timeout_micros=200_000)
    old, new = _RecordingModel(), _RecordingModel()
    try:
        batcher.predict(old, np.zeros((6, *contract.IMAGE_SHAPE), np.float32))
        assert old.batches == [6]  # at or above the batch size: straight to the model
        start = threading.Barrier(4)

        def request(model: _RecordingModel) -> None:
            with batcher.scope():
                start.wait()
                batcher.predict(model, np.zeros((1, *contract.IMAGE_SHAPE), np.float32))

        threads = [threading.Thread(target=request, args=(model,)) for model in (old, new, old, new)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        batcher.close()
    assert sum(old.batches[1:]) == 2 and sum(new.batches) == 2  # never a pass mixing two versions


def test_micro_batcher_does_not_delay_a_lone_request():
    batcher = MicroBatcher(max_batch_size=8, timeout_micros=600_000_000)  # ten minutes' wait for company
    model = _RecordingModel()
    try:
        started = time.monotonic()
        with batcher.scope():
            batcher.predict(model, np.zeros((1, *contract.IMAGE_SHAPE), np.float32))
        assert time.monotonic() - started < 60  # a safety bound: nobody else in scope, so no wait at all
    finally:
        batcher.close()
    assert model.batches == [1]


def test_micro_batcher_hands_a_model_error_to_every_waiting_request():
    class Failing:
        def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            raise RuntimeError("device lost")

    batcher = MicroBatcher(max_batch_size=4, timeout_micros=1000)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            batcher.predict(Failing(), np.zeros((1, *contract.IMAGE_SHAPE), np.float32))
        model = _RecordingModel()
        assert batcher.predict(model, np.zeros((1, *contract.IMAGE_SHAPE), np.float32))[1].tolist() == [0]
    finally:
        batcher.close()
