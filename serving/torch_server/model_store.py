"""TorchScript model versions: loading, validation, a polling watcher and an atomic swap.

The store serves ``<base_path>/<version>/model.pt`` (TF Serving's layout) and
keeps the highest ``keep_versions`` loadable versions in memory. A background
thread polls the base path; a new version is loaded, checked against the model
contract on a dummy batch and warmed up *before* it replaces the served one, by
assigning one immutable snapshot reference, so a request in flight keeps the
model it started with. A version that fails to load or to pass the check is
logged and refused while the previous one keeps serving; it is remembered by a
fingerprint of its folder so it is retried only when its files change.

Status follows TF Serving's ``ModelVersionStatus``: LOADING while a version
loads, AVAILABLE while it serves, END once unloaded or refused (with the error).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from mnist_client import contract
from serving.check_set import (
    CHECK_SET_FILENAME,
    CheckSet,
    CheckSetError,
    disagreement,
    pixels_to_images,
    read_check_set,
)
from serving.model_repository import list_versions

log = logging.getLogger(__name__)

# Probabilities of the dummy batch must sum to 1 within this tolerance.
_SUM_TOLERANCE = 1e-3
# The TorchScript profiling executor optimises a graph after a few runs; run them
# before a version serves so the first real requests do not pay for it.
_WARMUP_BATCHES = (1, 1, 1, 8, 8)

NEVER = 2**31  # an optimised-copy threshold that no batch reaches
# The batch sizes at which the exported module and the optimised copy are timed when a version
# loads: the optimised copy serves from the smallest size from which it is faster at every size.
CROSSOVER_BATCHES = (1, 2, 4, 8, 16)
_CROSSOVER_WARMUP = 3
_CROSSOVER_REPEATS = 7
# On CPUs a forward pass of more images than this runs in chunks of it: per image, a pass of 256
# costs more than one of 64, whose activations stay in cache (docs/rest-server.md has the figures).
CPU_CHUNK = 64
# How many check-set images the small-batch path (the module as exported) is checked on at load;
# the large-batch path runs the whole check set.
_SMALL_PATH_CHECK_ROWS = 256
_CHECK_BATCH = 256
_OPTIMIZED_CHECK_BATCH = 16
# Without a check set, the optimised copy must give the exported module's answers within this.
_OPTIMIZED_ATOL = 1e-5

AVAILABLE, LOADING, END = "AVAILABLE", "LOADING", "END"


class ModelLoadError(RuntimeError):
    """A version folder does not hold a loadable model that honours the contract."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available here; use auto or cpu")
    return device


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One loaded, validated version, ready to predict from any thread.

    ``module`` is the TorchScript file as exported. ``optimized``, when present, is a frozen copy
    optimised for inference (oneDNN convolutions on CPUs), checked to give the export's answers; it
    runs batches of ``optimized_min_batch`` images or more, the size from which it was measured
    faster when the version loaded. On CPUs, passes of more than ``chunk`` images run in chunks.
    ``plan`` says what was chosen and why (logged at load, shown by the benchmarks).
    """

    version: int
    path: Path
    module: torch.jit.ScriptModule
    device: torch.device
    metadata: Mapping[str, Any]
    optimized: torch.jit.ScriptModule | None = None
    optimized_min_batch: int = NEVER
    chunk: int | None = None
    plan: Mapping[str, Any] = field(default_factory=dict)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[N, 28, 28]`` in [0, 1] -> (probabilities float32 [N, 10], classes int64 [N]) on the CPU."""
        module = self.module
        if self.optimized is not None and len(images) >= self.optimized_min_batch:
            module = self.optimized
        chunk = self.chunk
        if chunk is None or len(images) <= chunk:
            return run_module(module, images, self.device)
        parts = [run_module(module, images[start : start + chunk], self.device) for start in range(0, len(images), chunk)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])


def run_module(
    module: torch.jit.ScriptModule, images: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass of a contract module: numpy in (moved to ``device``), numpy out on the CPU."""
    with torch.inference_mode():
        outputs = module(torch.from_numpy(images).to(device))
        probabilities = outputs[contract.PROBABILITIES_NAME].cpu().numpy()
        classes = outputs[contract.CLASSES_NAME].cpu().numpy()
    return probabilities, classes


@dataclass(frozen=True)
class VersionStatus:
    """TF Serving's ModelVersionStatus: version, state and status (error code and message)."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True)
class _Snapshot:
    models: Mapping[int, LoadedModel] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def latest(self) -> LoadedModel | None:
        return self.models[max(self.models)] if self.models else None


def load_version(
    path: Path, version: int, device: torch.device, optimize: bool = True, optimized_min_batch: int = 0
) -> LoadedModel:
    """Load ``<path>/model.pt``, check it against the contract and its check set, choose the fastest
    forms, and warm it up.

    With ``optimize``, also build the inference-optimised copy; it serves batches from
    ``optimized_min_batch`` images (0: from the size at which it is measured faster here) if it
    gives the export's answers on the check set (``check_set.npz``, written by training), else the
    version serves without it and the log says why. A module that does not itself reproduce its
    check set is refused.
    """
    model_file = path / contract.TORCHSCRIPT_FILENAME
    if not model_file.is_file():
        raise ModelLoadError(f"{model_file} does not exist")
    metadata = _read_metadata(path)
    try:
        check = read_check_set(path)
    except CheckSetError as exc:
        raise ModelLoadError(str(exc)) from exc
    if device.type == "cuda":
        # TF32 convolutions would move probabilities by ~1e-4: serve the export's own numerics.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    module = _load_module(model_file, device)
    check_contract(module, device, version)
    plain = LoadedModel(version, path, module, device, MappingProxyType(metadata),
                        chunk=CPU_CHUNK if device.type == "cpu" else None)  # fmt: skip
    if check is not None:
        # The module as exported, as it runs small batches (one image at a time) and large ones.
        why = disagreement(check, *_predict_rows(plain, check, 1, _SMALL_PATH_CHECK_ROWS), rows=_SMALL_PATH_CHECK_ROWS)
        if why is None:
            why = disagreement(check, *_predict_rows(plain, check, _CHECK_BATCH, _SMALL_PATH_CHECK_ROWS),
                               rows=_SMALL_PATH_CHECK_ROWS)  # fmt: skip
        if why is not None:
            raise ModelLoadError(f"version {version} does not reproduce its own check set ({CHECK_SET_FILENAME}): {why}")
    model = _with_optimized_copy(plain, model_file, check, optimized_min_batch) if optimize else plain
    for batch in _WARMUP_BATCHES:
        model.predict(np.zeros((batch, *contract.IMAGE_SHAPE), dtype=contract.INPUT_DTYPE))
    log.info("version %d on %s: %s", version, device, _describe(model))
    return model


def _predict_rows(model: LoadedModel, check: CheckSet, batch: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``model.predict`` over the first ``rows`` check images (default all), ``batch`` at a time."""
    images = pixels_to_images(check.pixels[:rows])  # only the rows checked, not the whole set each time
    parts = [model.predict(images[start : start + batch]) for start in range(0, len(images), batch)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])


def _with_optimized_copy(
    plain: LoadedModel, model_file: Path, check: CheckSet | None, optimized_min_batch: int
) -> LoadedModel:
    """``plain`` with the optimised copy for the batches where it is faster, if it is correct."""
    version, device = plain.version, plain.device
    try:
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(_load_module(model_file, device)))
        check_contract(optimized, device, version)
    except Exception as exc:  # an optimisation pass that fails here must not cost the version
        log.warning("version %d: no optimised copy (%s); serving the module as exported", version, exc)
        return plain
    if optimized_min_batch > 0:
        threshold, timings = optimized_min_batch, {}
    else:
        threshold, timings = _measured_crossover(plain.module, optimized, device)
    plan = {"optimized_min_batch": threshold, "timings_us": timings}
    model = replace(plain, optimized=optimized, optimized_min_batch=threshold, plan=MappingProxyType(plan))
    if threshold >= NEVER:
        return model
    if check is not None:
        # The path large batches take, chunks included, over the whole check set.
        why = disagreement(check, *_predict_rows(model, check, _CHECK_BATCH))
        checked_on = f"{len(check)} check-set images"
    else:
        why = _agrees_with_module(model)
        checked_on = f"a {_OPTIMIZED_CHECK_BATCH}-image ramp (no {CHECK_SET_FILENAME} in this version)"
    if why is not None:
        log.warning("version %d: the optimised copy differs from the export on %s (%s); not using it",
                    version, checked_on, why)  # fmt: skip
        return replace(plain, optimized_min_batch=NEVER,
                       plan=MappingProxyType({**plan, "optimized_min_batch": NEVER, "rejected": why}))
    return replace(model, plan=MappingProxyType({**plan, "checked_on": checked_on}))


def _agrees_with_module(model: LoadedModel) -> str | None:
    images = _check_batch(_OPTIMIZED_CHECK_BATCH)
    want_probabilities, want_classes = run_module(model.module, images, model.device)
    got_probabilities, got_classes = run_module(model.optimized, images, model.device)
    worst = float(np.max(np.abs(got_probabilities - want_probabilities)))
    if not np.array_equal(got_classes, want_classes) or worst > _OPTIMIZED_ATOL:
        return f"max difference {worst:.2e}"
    return None


def _measured_crossover(
    module: torch.jit.ScriptModule, optimized: torch.jit.ScriptModule, device: torch.device
) -> tuple[int, dict[int, dict[str, float]]]:
    """Time both forms at each of ``CROSSOVER_BATCHES`` (interleaved, best of a few) and return the
    smallest batch from which the optimised copy is faster at every larger size, with the timings."""
    images = _check_batch(max(CROSSOVER_BATCHES))
    # On a CPU the cost is CPU time, which other programs on a busy machine do not inflate (wall time
    # there is mostly waiting for a core): this thread's when torch runs ops in the calling thread (one
    # intra-op thread, as the workers run), else the process's. A GPU's is wall time (run_module syncs).
    if device.type == "cuda":
        clock = time.perf_counter
    else:
        clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    timings: dict[int, dict[str, float]] = {}
    for batch in CROSSOVER_BATCHES:
        x = images[:batch]
        best = {"module": float("inf"), "optimized": float("inf")}
        for _ in range(_CROSSOVER_WARMUP):
            run_module(module, x, device)
            run_module(optimized, x, device)
        for _ in range(_CROSSOVER_REPEATS):
            for name, form in (("module", module), ("optimized", optimized)):
                started = clock()
                run_module(form, x, device)
                best[name] = min(best[name], clock() - started)
        timings[batch] = {name: round(seconds * 1e6, 1) for name, seconds in best.items()}
    threshold = NEVER
    for batch in reversed(CROSSOVER_BATCHES):
        if timings[batch]["optimized"] >= timings[batch]["module"]:
            break
        threshold = batch
    return threshold, timings


def _describe(model: LoadedModel) -> str:
    if model.optimized is None or model.optimized_min_batch >= NEVER:
        forms = "every batch runs the module as exported"
        if "rejected" in model.plan:
            forms += f" (optimised copy rejected: {model.plan['rejected']})"
        elif model.plan.get("timings_us"):
            forms += f" (optimised copy slower at every measured size: {model.plan['timings_us']} us)"
    else:
        forms = (f"batches of {model.optimized_min_batch}+ images run the optimised copy, checked on "
                 f"{model.plan.get('checked_on', 'no images')}")  # fmt: skip
        if model.plan.get("timings_us"):
            forms += f" (best of {_CROSSOVER_REPEATS}, us, module vs optimised: {model.plan['timings_us']})"
    chunks = f"; passes of more than {model.chunk} images run in chunks" if model.chunk else ""
    return forms + chunks


def _load_module(model_file: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(model_file), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors... for a bad file
        raise ModelLoadError(f"cannot load {model_file} as TorchScript: {exc}") from exc


def _check_batch(batch: int) -> np.ndarray:
    """Deterministic images that exercise every pixel: a ramp from 0 to 1."""
    ramp = np.linspace(0.0, 1.0, batch * contract.IMAGE_HEIGHT * contract.IMAGE_WIDTH, dtype=np.float32)
    return ramp.reshape(batch, *contract.IMAGE_SHAPE)


def check_contract(module: torch.jit.ScriptModule, device: torch.device, version: int) -> None:
    """Run a dummy batch and check names, dtypes, shapes and values of the outputs."""
    batch = 3
    dummy = _check_batch(batch)
    try:
        with torch.inference_mode():
            outputs = module(torch.from_numpy(dummy).to(device))
    except Exception as exc:
        raise ModelLoadError(f"version {version} fails on a dummy batch {list(dummy.shape)}: {exc}") from exc
    if not isinstance(outputs, dict) or set(outputs) != set(contract.OUTPUT_NAMES):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ModelLoadError(f"version {version} returns {got}; expected a dict of {list(contract.OUTPUT_NAMES)}")
    probabilities = outputs[contract.PROBABILITIES_NAME].cpu().numpy()
    classes = outputs[contract.CLASSES_NAME].cpu().numpy()
    problems = []
    if probabilities.dtype != contract.PROBABILITIES_DTYPE or probabilities.shape != (batch, contract.NUM_CLASSES):
        problems.append(f"probabilities {probabilities.dtype} {list(probabilities.shape)}, "
                        f"expected float32 [{batch}, {contract.NUM_CLASSES}]")  # fmt: skip
    elif not np.all(np.abs(probabilities.sum(axis=1) - 1.0) < _SUM_TOLERANCE):
        problems.append("probabilities do not sum to 1 (expected a softmax)")
    if classes.dtype != contract.CLASSES_DTYPE or classes.shape != (batch,):
        problems.append(f"classes {classes.dtype} {list(classes.shape)}, expected int64 [{batch}]")
    elif not problems and not np.array_equal(classes, probabilities.argmax(axis=1)):
        problems.append("classes are not the argmax of probabilities")
    if problems:
        raise ModelLoadError(f"version {version} breaks the model contract: " + "; ".join(problems))


def _read_metadata(path: Path) -> dict[str, Any]:
    """``model.json`` if present (optional); a signature in it must be the contract's."""
    meta_file = path / contract.METADATA_FILENAME
    if not meta_file.is_file():
        return {}
    try:
        metadata = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{meta_file} is not readable JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{meta_file} holds {type(metadata).__name__}, expected a JSON object")
    signature = metadata.get("signature")
    if signature is not None and signature != contract.signature():
        raise ModelLoadError(f"{meta_file} declares signature {signature}, expected {contract.signature()}")
    return metadata


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """Names, sizes and modification times of a version folder's files (changes mean: retry it)."""
    try:
        entries = sorted(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()
        )
        return (path.stat().st_mtime_ns, tuple(entries))
    except OSError:
        return ()


Loader = Callable[[Path, int, torch.device], LoadedModel]
Listener = Callable[[str, int], None]


def _call(function: Callable[..., LoadedModel], *args: Any) -> LoadedModel:
    return function(*args)


class ModelStore:
    """The loaded versions of one model, refreshed from its base path."""

    def __init__(
        self,
        base_path: Path,
        device: torch.device,
        keep_versions: int = 1,
        loader: Loader = load_version,
        listener: Listener | None = None,
    ) -> None:
        self.base_path = Path(base_path)
        self.device = device
        self.keep_versions = keep_versions
        self._loader = loader
        # listener(event, version): event is "loaded", "unloaded" or "refused" (metrics hook up here).
        self._listener = listener
        self._snapshot = _Snapshot()
        self._statuses: dict[int, VersionStatus] = {}
        self._refused: dict[int, tuple[Any, ...]] = {}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Runs ``loader(path, version, device)``: directly by default. A gevent worker sets one that runs
        # it in a native thread, so that the event loop keeps answering requests while a version loads.
        self.run_loader: Callable[..., LoadedModel] = _call

    # Reads: lock-free, one attribute read of an immutable snapshot.
    def latest(self) -> LoadedModel | None:
        return self._snapshot.latest

    def get(self, version: int) -> LoadedModel | None:
        return self._snapshot.models.get(version)

    def loaded_versions(self) -> list[int]:
        return sorted(self._snapshot.models)

    def statuses(self) -> list[VersionStatus]:
        """Status of every version seen, highest first (TF Serving lists them that way)."""
        statuses = dict(self._statuses)
        return [statuses[v] for v in sorted(statuses, reverse=True)]

    def refresh(self) -> bool:
        """Scan the base path once and load/unload to match it; True when the served set changed."""
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        current = self._snapshot.models
        on_disk = list_versions(self.base_path)
        for version in list(self._statuses):
            if version not in on_disk and version not in current:  # folder gone: forget it
                self._statuses.pop(version)
                self._refused.pop(version, None)
        keep: dict[int, LoadedModel] = {}
        for version in sorted(on_disk, reverse=True):
            if len(keep) == self.keep_versions:
                break
            if version in current:
                keep[version] = current[version]
                continue
            path = self.base_path / str(version)
            if version in self._refused and self._refused[version] == _fingerprint(path):
                continue
            model = self._try_load(path, version)
            if model is not None:
                keep[version] = model
        if not keep and current:
            # Nothing loadable on disk any more (folders removed or all broken): keep serving what
            # is in memory rather than answering 503 to every request.
            log.warning("no loadable version under %s; still serving version(s) %s", self.base_path, sorted(current))
            return False
        if keep.keys() == current.keys():
            return False
        self._snapshot = _Snapshot(MappingProxyType(dict(keep)))  # the atomic swap
        for version in keep.keys() - current.keys():
            self._statuses[version] = VersionStatus(version, AVAILABLE)
            self._notify("loaded", version)
        for version in current.keys() - keep.keys():
            self._statuses[version] = VersionStatus(version, END)
            self._notify("unloaded", version)
        log.info("serving %s version(s) %s from %s", contract.MODEL_NAME, sorted(keep, reverse=True), self.base_path)
        return True

    def _try_load(self, path: Path, version: int) -> LoadedModel | None:
        previous = self._statuses.get(version)
        self._statuses[version] = VersionStatus(version, LOADING)
        fingerprint = _fingerprint(path)
        started = time.perf_counter()
        try:
            model = self.run_loader(self._loader, path, version, self.device)
        except Exception as exc:  # any failure refuses the version; the served one stays
            message = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            log.error("refusing version %d at %s: %s", version, path, message)
            self._refused[version] = fingerprint
            self._statuses[version] = VersionStatus(version, END, "UNKNOWN", message)
            if previous is None or previous.error_message != message:
                self._notify("refused", version)
            return None
        self._refused.pop(version, None)
        log.info("loaded version %d from %s on %s in %.2f s", version, path, self.device, time.perf_counter() - started)
        return model

    def _notify(self, event: str, version: int) -> None:
        if self._listener is not None:
            try:
                self._listener(event, version)
            except Exception:
                log.exception("model store listener failed on %s %d", event, version)

    def start_watching(self, poll_seconds: float) -> None:
        """Poll the base path every ``poll_seconds`` in a daemon thread (one per worker process)."""
        if self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, args=(poll_seconds,), name="model-watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
            self._watcher = None

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.refresh()
            except Exception:  # keep watching whatever one scan hit (e.g. a transient I/O error)
                log.exception("model watcher: scanning %s failed", self.base_path)
