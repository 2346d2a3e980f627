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
from training.recipe import QUICK_TEST_EXAMPLES
from serving.check_set import CHECK_SET_FILENAME, read_check_set, write_check_set
from serving.torch_server import batching
from serving.torch_server.batching import MicroBatcher
from serving.torch_server.errors import ServiceUnavailable
from serving.torch_server.model_store import (
    AVAILABLE,
    CPU_CHUNK,
    CROSSOVER_BATCHES,
    END,
    LOADING,
    NEVER,
    LoadedModel,
    ModelLoadError,
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


# -- the forms a version serves: the export, the optimised copy, chunks, the check set -------------


def test_every_batch_size_gives_the_exports_answers_on_the_check_set(base):
    check = read_check_set(base / "1")
    assert check is not None and len(check) == QUICK_TEST_EXAMPLES  # written by the quick export, over its test images
    model = load_version(base / "1", 1, CPU)
    assert model.optimized is not None and model.chunk == CPU_CHUNK
    images = check.images
    for size in (1, 2, 3, 4, 8, 16, 64, 65, 200):  # both forms, chunked and not
        probabilities, classes = model.predict(images[:size])
        np.testing.assert_array_equal(classes, check.classes[:size])
        np.testing.assert_allclose(probabilities, check.probabilities[:size], rtol=0, atol=1e-5)


def test_the_optimised_copy_serves_from_the_measured_crossover(base):
    model = load_version(base / "1", 1, CPU)
    timings = model.plan["timings_us"]
    assert sorted(timings) == sorted(CROSSOVER_BATCHES)
    threshold = model.optimized_min_batch
    assert threshold == NEVER or threshold in CROSSOVER_BATCHES
    for batch, timing in timings.items():  # faster from the threshold on, and not at the size below it
        if batch >= threshold:
            assert timing["optimized"] < timing["module"]
        if threshold != NEVER and batch == max((b for b in CROSSOVER_BATCHES if b < threshold), default=None):
            assert timing["optimized"] >= timing["module"]


def test_a_configured_threshold_replaces_the_measurement(base):
    model = load_version(base / "1", 1, CPU, optimized_min_batch=9)
    assert model.optimized_min_batch == 9 and model.plan["timings_us"] == {}
    assert load_version(base / "1", 1, CPU, optimize=False).optimized is None


class _RecordingModule:
    """A contract module for LoadedModel that records the size of every pass and marks each row's class."""

    def __init__(self) -> None:
        self.passes: list[int] = []

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.passes.append(len(images))
        marks = images[:, 0, 0].to(torch.int64)
        return {"probabilities": torch.zeros(len(images), contract.NUM_CLASSES), "classes": marks}


def test_large_batches_run_in_chunks_and_keep_their_order():
    module = _RecordingModule()
    model = LoadedModel(1, Path("."), module, CPU, {}, chunk=64)  # type: ignore[arg-type]
    images = np.zeros((150, *contract.IMAGE_SHAPE), np.float32)
    images[:, 0, 0] = np.arange(150)
    _, classes = model.predict(images)
    assert module.passes == [64, 64, 22]
    assert classes.tolist() == list(range(150))
    model.predict(images[:64])
    assert module.passes[-1] == 64


def _rewrite_check_set(version_dir: Path, change) -> None:
    check = read_check_set(version_dir)
    probabilities, classes = check.probabilities.copy(), check.classes.copy()
    change(probabilities, classes)
    write_check_set(version_dir, check.pixels, probabilities, classes)


def test_a_version_that_does_not_reproduce_its_check_set_is_refused(base):
    def flip_first_class(probabilities: np.ndarray, classes: np.ndarray) -> None:
        classes[0] = (classes[0] + 1) % contract.NUM_CLASSES

    _rewrite_check_set(base / "1", flip_first_class)
    with pytest.raises(ModelLoadError, match=r"does not reproduce its own check set .*a different class for 1 of"):
        load_version(base / "1", 1, CPU)


def test_an_optimised_copy_that_misses_the_check_set_is_not_used(base, caplog):
    # Row 600 is past the rows the exported module is checked on, so only the optimised copy sees it.
    def nudge(probabilities: np.ndarray, classes: np.ndarray) -> None:
        probabilities[600] += 1e-3

    _rewrite_check_set(base / "1", nudge)
    model = load_version(base / "1", 1, CPU, optimized_min_batch=4)
    assert model.optimized_min_batch == NEVER and "probabilities differ by up to" in model.plan["rejected"]
    assert "the optimised copy differs from the export" in caplog.text
    assert model.predict(np.zeros((8, *contract.IMAGE_SHAPE), np.float32))[1].shape == (8,)


def test_a_broken_check_set_refuses_the_version_with_the_reason(base):
    (base / "1" / CHECK_SET_FILENAME).write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="is not a readable check set"):
        load_version(base / "1", 1, CPU)


def test_a_version_without_a_check_set_still_checks_its_optimised_copy(base, caplog):
    (base / "1" / CHECK_SET_FILENAME).unlink()
    model = load_version(base / "1", 1, CPU, optimized_min_batch=4)
    assert model.optimized is not None and "ramp" in model.plan["checked_on"]


def test_a_failing_optimisation_leaves_the_version_serving_as_exported(base, test_images, monkeypatch, caplog):
    def broken(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.jit, "optimize_for_inference", broken)
    model = load_version(base / "1", 1, CPU)
    assert model.optimized is None
    assert "no optimised copy (no oneDNN here)" in caplog.text
    assert model.predict(test_images[0][:8])[1].shape == (8,)


# -- the micro-batcher -----------------------------------------------------------------------------


class _GatedModel:
    """Stands in for a LoadedModel: records each pass's size and thread, answers row i with class i;
    the first pass waits at the gate until the test opens it."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.threads: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(len(images))
        self.threads.append(threading.get_ident())
        self.entered.set()
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(30), "the test never opened the gate"
        marks = images[:, 0, 0].astype(np.int64)
        return np.repeat(images[:, 0, :1], contract.NUM_CLASSES, axis=1), marks


def _rows(mark: int, size: int = 1) -> np.ndarray:
    return np.full((size, *contract.IMAGE_SHAPE), mark, dtype=np.float32)


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def test_a_lone_request_runs_at_once_in_its_own_thread():
    batcher = MicroBatcher(max_batch_size=8)
    model = _GatedModel()
    _, classes = batcher.predict(model, _rows(3))
    assert classes.tolist() == [3]
    assert model.batches == [1] and model.threads == [threading.get_ident()]  # no hand-over, no timer
    assert batcher.queued() == 0


def test_requests_that_arrive_during_a_pass_share_the_next_one():
    gate = threading.Event()
    batcher = MicroBatcher(max_batch_size=8)
    model = _GatedModel(gate)
    results: dict[int, np.ndarray] = {}

    def request(mark: int, size: int) -> None:
        results[mark] = batcher.predict(model, _rows(mark, size))[1]

    first = threading.Thread(target=request, args=(0, 1))
    first.start()
    assert model.entered.wait(30)
    sizes = {1: 1, 2: 2, 3: 1, 4: 3, 5: 1, 6: 1}  # 9 images: 8 fit the next pass, the last one the pass after
    waiting = [threading.Thread(target=request, args=(mark, size)) for mark, size in sizes.items()]
    for index, thread in enumerate(waiting, start=1):
        thread.start()
        _wait_until(lambda: batcher.queued() == index, f"{index} requests are queued")  # keeps arrival order
    gate.set()
    for thread in (first, *waiting):
        thread.join(30)
    assert model.batches == [1, 8, 1]
    assert {mark: classes.tolist() for mark, classes in results.items()} == {
        0: [0], **{mark: [mark] * size for mark, size in sizes.items()}
    }


def test_gather_lets_the_requests_already_received_join_the_pass_it_precedes():
    # Under gevent, gather is gevent.idle: the lead yields until the event loop has nothing ready, so
    # requests received meanwhile queue first. Here the hook itself lets three requests arrive.
    batcher = MicroBatcher(max_batch_size=8)
    model = _GatedModel()
    results: dict[int, np.ndarray] = {}

    def request(mark: int) -> None:
        results[mark] = batcher.predict(model, _rows(mark))[1]

    arriving = [threading.Thread(target=request, args=(mark,)) for mark in (1, 2, 3)]
    gathered: list[int] = []

    def gather() -> None:
        gathered.append(threading.get_ident())
        if len(gathered) == 1:
            for count, thread in enumerate(arriving, start=1):
                thread.start()
                _wait_until(lambda: batcher.queued() == count, f"{count} requests are queued")

    batcher.gather = gather
    request(0)
    for thread in arriving:
        thread.join(30)
    assert model.batches == [4]  # one pass for the lead and the three that arrived while it gathered
    assert {mark: classes.tolist() for mark, classes in results.items()} == {0: [0], 1: [1], 2: [2], 3: [3]}
    assert gathered == [threading.get_ident()]  # once per pass, by the request that runs it


def test_a_large_request_is_a_pass_of_its_own_and_versions_never_share_one():
    gate = threading.Event()
    batcher = MicroBatcher(max_batch_size=4)
    blocker, old, new = _GatedModel(gate), _GatedModel(), _GatedModel()
    threads = [threading.Thread(target=batcher.predict, args=(blocker, _rows(0)))]
    threads[0].start()
    assert blocker.entered.wait(30)
    for model, size in ((old, 1), (new, 1), (old, 6), (old, 1), (new, 1)):
        threads.append(threading.Thread(target=batcher.predict, args=(model, _rows(1, size))))
        threads[-1].start()
        count = len(threads) - 1
        _wait_until(lambda: batcher.queued() == count, f"{count} requests are queued")
    gate.set()
    for thread in threads:
        thread.join(30)
    # Next pass after the blocker: old 1 + new 1 (two passes, one per version); the 6-image request
    # does not fit, so it is a pass of its own; then old 1 + new 1 again.
    assert old.batches == [1, 6, 1] and new.batches == [1, 1]


def test_a_model_error_reaches_every_request_of_its_pass_and_frees_the_model():
    class Failing(_GatedModel):
        def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            super().predict(images)
            raise RuntimeError("device lost")

    gate = threading.Event()
    batcher = MicroBatcher(max_batch_size=4)
    failing = Failing(gate)
    errors: list[BaseException] = []

    def request() -> None:
        try:
            batcher.predict(failing, _rows(1))
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(3)]
    threads[0].start()
    assert failing.entered.wait(30)
    for count, thread in enumerate(threads[1:], start=1):
        thread.start()
        _wait_until(lambda: batcher.queued() == count, f"{count} requests are queued")
    gate.set()
    for thread in threads:
        thread.join(30)
    assert [str(e) for e in errors] == ["device lost"] * 3 and failing.batches == [1, 2]
    assert batcher.predict(_GatedModel(), _rows(5))[1].tolist() == [5]  # the model is free again


def test_a_request_that_waits_too_long_gets_503_and_leaves_the_queue(monkeypatch):
    monkeypatch.setattr(batching, "_RESULT_TIMEOUT_S", 0.05)
    gate = threading.Event()
    batcher = MicroBatcher(max_batch_size=4)
    blocker = _GatedModel(gate)
    first = threading.Thread(target=batcher.predict, args=(blocker, _rows(0)))
    first.start()
    try:
        assert blocker.entered.wait(30)
        with pytest.raises(ServiceUnavailable, match="did not become free"):
            batcher.predict(_GatedModel(), _rows(1))
        assert batcher.queued() == 0
    finally:
        gate.set()
        first.join(30)
    assert blocker.batches == [1]


def test_a_pass_that_never_ends_reports_the_worker_stuck_once(monkeypatch):
    monkeypatch.setattr(batching, "_RESULT_TIMEOUT_S", 0.05)
    gate = threading.Event()
    batcher = MicroBatcher(max_batch_size=4)
    stuck: list[bool] = []
    batcher.on_stuck = lambda: stuck.append(True)
    blocker = _GatedModel(gate)
    first = threading.Thread(target=batcher.predict, args=(blocker, _rows(0)))
    first.start()
    try:
        assert blocker.entered.wait(30)
        for _ in range(2):  # each waits past the limit, so the pass is older than it
            with pytest.raises(ServiceUnavailable):
                batcher.predict(_GatedModel(), _rows(1))
        assert stuck == [True]
    finally:
        gate.set()
        first.join(30)
