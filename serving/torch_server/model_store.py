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
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from mnist_client import contract
from serving.model_repository import list_versions

log = logging.getLogger(__name__)

# Probabilities of the dummy batch must sum to 1 within this tolerance.
_SUM_TOLERANCE = 1e-3
# The TorchScript profiling executor optimises a graph after a few runs; run them
# before a version serves so the first real requests do not pay for it.
_WARMUP_BATCHES = (1, 1, 1, 8, 8)

# Batches of this many images or more run on the inference-optimised copy: measured on our CPUs it
# is about 2x faster per image from 8 images up, 1.3x at 4, but slower for 1 to 3 (docs/rest-server.md).
OPTIMIZED_MIN_BATCH = 4
_OPTIMIZED_CHECK_BATCH = 16
# The optimised copy must give the exported module's classes and probabilities within this.
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
    optimised for inference (oneDNN convolutions on CPUs), checked to agree with ``module``; it
    runs batches of ``OPTIMIZED_MIN_BATCH`` images or more, where it is about twice as fast per
    image, while smaller batches, where it is slower, stay on ``module``.
    """

    version: int
    path: Path
    module: torch.jit.ScriptModule
    device: torch.device
    metadata: Mapping[str, Any]
    optimized: torch.jit.ScriptModule | None = None

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[N, 28, 28]`` in [0, 1] -> (probabilities float32 [N, 10], classes int64 [N]) on the CPU."""
        module = self.module
        if self.optimized is not None and len(images) >= OPTIMIZED_MIN_BATCH:
            module = self.optimized
        return run_module(module, images, self.device)


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


def load_version(path: Path, version: int, device: torch.device, optimize: bool = True) -> LoadedModel:
    """Load ``<path>/model.pt``, check it against the contract on a dummy batch, and warm it up.

    With ``optimize``, also build the inference-optimised copy for larger batches; if that fails
    or disagrees with the exported module, the version serves without it (and says so in the log).
    """
    model_file = path / contract.TORCHSCRIPT_FILENAME
    if not model_file.is_file():
        raise ModelLoadError(f"{model_file} does not exist")
    metadata = _read_metadata(path)
    module = _load_module(model_file, device)
    check_contract(module, device, version)
    optimized = _optimized_copy(model_file, module, device, version) if optimize else None
    model = LoadedModel(version, path, module, device, MappingProxyType(metadata), optimized)
    for batch in _WARMUP_BATCHES:
        model.predict(np.zeros((batch, *contract.IMAGE_SHAPE), dtype=contract.INPUT_DTYPE))
    return model


def _load_module(model_file: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(model_file), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors... for a bad file
        raise ModelLoadError(f"cannot load {model_file} as TorchScript: {exc}") from exc


def _optimized_copy(
    model_file: Path, module: torch.jit.ScriptModule, device: torch.device, version: int
) -> torch.jit.ScriptModule | None:
    """A frozen, inference-optimised copy that gives the exported module's answers, or None."""
    try:
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(_load_module(model_file, device)))
        check_contract(optimized, device, version)
        images = _check_batch(_OPTIMIZED_CHECK_BATCH)
        want_probabilities, want_classes = run_module(module, images, device)
        got_probabilities, got_classes = run_module(optimized, images, device)
    except Exception as exc:  # an optimisation pass that fails here must not cost the version
        log.warning(
            "version %d: no optimised copy for large batches (%s); serving the module as exported", version, exc
        )
        return None
    worst = float(np.max(np.abs(got_probabilities - want_probabilities)))
    if not np.array_equal(got_classes, want_classes) or worst > _OPTIMIZED_ATOL:
        log.warning(
            "version %d: the optimised copy disagrees with the export (max difference %.2e); not using it",
            version,
            worst,
        )
        return None
    return optimized


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
            model = self._loader(path, version, self.device)
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
