"""The versions of one model: finding them on disk, loading, swapping and unloading them.

TF Serving's behaviour, kept here:

- the base path is polled every ``--file_system_poll_wait_seconds``; the
  version policy (latest N by default, or all, or specific) picks the versions
  to serve among the positive-integer folders;
- a new version is loaded and validated (SavedModel loaded into a session, at
  least one signature, the warm-up requests replayed) before it serves; only
  then does it replace the old one, in one atomic swap, so that no call sees
  a half-loaded version and no call fails during the swap;
- a version that fails to load is retried ``--max_num_load_retries`` times and
  then refused (state END with the error, as GetModelStatus reports it) while
  the old version keeps serving: a version is never unloaded unless a
  version the policy wants is available (availability-preserving policy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2

from serving.model_repository import list_versions
from serving.tfs_standin import status
from serving.tfs_standin.config import ModelConfig
from serving.tfs_standin.servable import Servable

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
START, LOADING, AVAILABLE, UNLOADING, END = State.START, State.LOADING, State.AVAILABLE, State.UNLOADING, State.END

Loader = Callable[[str, int, Path], Servable]


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: int  # get_model_status_pb2.ModelVersionStatus.State
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""

    @property
    def state_name(self) -> str:
        return State.Name(self.state)


@dataclass(frozen=True)
class LoadPolicy:
    """How often to look for versions and how hard to try loading one (TF Serving's flags)."""

    poll_seconds: float = 1.0  # > 0: every N s; 0: once at start; < 0: never
    max_retries: int = 5
    retry_interval_s: float = 60.0


class ModelManager:
    """Serves the aspired versions of one model; thread-safe.

    Reads (``servable``, ``statuses``) take no lock: the map of available
    versions is replaced as a whole, never mutated, so a reader sees either the
    old or the new map.
    """

    def __init__(
        self,
        config: ModelConfig,
        loader: Loader,
        policy: LoadPolicy,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._loader = loader
        self._policy = policy
        self._on_change = on_change
        self._available: dict[int, Servable] = {}
        self._latest: Servable | None = None
        self._states: dict[int, VersionStatus] = {}
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.config.name

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start looking for versions in a background thread (loading never blocks the caller)."""
        self._thread = threading.Thread(target=self._poll_loop, name=f"versions-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling and unload every version (calls in flight finish on their own reference)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._write_lock:
            for version in list(self._available):
                self._unload_locked(version)

    def _poll_loop(self) -> None:
        if self._policy.poll_seconds < 0:
            log.info("model %s: file system polling disabled; no version will be loaded", self.name)
            return
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything and try again
                log.exception("model %s: polling %s failed", self.name, self.config.base_path)
            if self._policy.poll_seconds == 0 or self._stop.wait(self._policy.poll_seconds):
                return

    # --- version transitions --------------------------------------------------

    def poll_once(self) -> None:
        """Load the aspired versions not yet loaded, then unload the ones no longer aspired."""
        on_disk = list_versions(self.config.base_path)
        aspired = self.config.policy.choose(on_disk)
        for version in sorted(aspired, reverse=True):  # newest first: it serves soonest
            if self._stop.is_set():
                return
            state = self._states.get(version)
            refused = state is not None and state.state == END and state.error_code != grpc.StatusCode.OK
            if version not in self._available and not refused:
                self._load(version)
        with self._write_lock:
            if any(v in self._available for v in aspired):
                for version in [v for v in self._available if v not in aspired]:
                    self._unload_locked(version)

    def _set_state(self, status_: VersionStatus) -> None:
        self._states = {**self._states, status_.version: status_}

    def _load(self, version: int) -> None:
        path = self.config.base_path / str(version)
        with self._write_lock:
            self._set_state(VersionStatus(version, LOADING))
        attempts = 1 + self._policy.max_retries
        error: BaseException | None = None
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                servable = self._loader(self.name, version, path)
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version, the old one serves on
                error = exc
                log.warning("model %s version %d: load attempt %d of %d failed: %s",
                            self.name, version, attempt, attempts, _one_line(exc))
                if attempt < attempts and self._stop.wait(self._policy.retry_interval_s):
                    break
                continue
            with self._write_lock:
                self._available = {**self._available, version: servable}
                self._latest = self._available[max(self._available)]
                self._set_state(VersionStatus(version, AVAILABLE))
            log.info("model %s version %d loaded from %s in %.2f s; serving versions %s",
                     self.name, version, path, time.monotonic() - started, sorted(self._available))
            self._notify()
            return
        if self._stop.is_set():
            return  # shutting down between retries: not a verdict on the version
        message = f"version {version} of model {self.name} failed to load from {path}: {_one_line(error)}"
        with self._write_lock:
            self._set_state(VersionStatus(version, END, grpc.StatusCode.UNKNOWN, message))
        log.error("%s; it is refused%s", message,
                  f", versions {sorted(self._available)} keep serving" if self._available else "")

    def _unload_locked(self, version: int) -> None:
        self._set_state(VersionStatus(version, UNLOADING))
        remaining = {v: s for v, s in self._available.items() if v != version}
        self._available = remaining
        self._latest = remaining[max(remaining)] if remaining else None
        # The session closes when the last call holding this Servable finishes.
        self._set_state(VersionStatus(version, END))
        log.info("model %s version %d unloaded; serving versions %s", self.name, version, sorted(remaining))
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # --- queries ------------------------------------------------------------------

    def has_available(self) -> bool:
        return self._latest is not None

    def statuses(self) -> list[VersionStatus]:
        states = self._states
        return [states[v] for v in sorted(states)]

    def status_of(self, version: int) -> VersionStatus | None:
        return self._states.get(version)

    def servable(self, version: int | None = None, label: str = "") -> Servable:
        """The version a request asks for: latest, a number or a label; ServingError if not servable."""
        if label:
            if label not in self.config.version_labels:
                raise status.invalid_argument(
                    f"Unrecognized servable version label: {status.clip(label)}. Model {self.name} has labels "
                    f"{{{','.join(sorted(self.config.version_labels))}}}."
                )
            version = self.config.version_labels[label]
        if version is None:
            latest = self._latest
            if latest is None:
                raise status.unavailable(
                    f"Servable not found for request: Latest({self.name}): no version of model {self.name} "
                    f"is loaded yet ({self._why_nothing_serves()})"
                )
            return latest
        found = self._available.get(version)
        if found is not None:
            return found
        state = self._states.get(version)
        if state is not None and state.state in (START, LOADING):
            raise status.unavailable(
                f"version {version} of model {self.name} is {state.state_name}; it serves once AVAILABLE"
            )
        detail = f": {state.error_message}" if state is not None and state.error_message else ""
        raise status.not_found(
            f"Servable not found for request: Specific({self.name}, {version}){detail}. Model {self.name} serves "
            f"versions {sorted(self._available)}"
        )

    def _why_nothing_serves(self) -> str:
        states = self.statuses()
        if not states:
            return f"no versions under {self.config.base_path} yet"
        return "; ".join(s.error_message or f"version {s.version} is {s.state_name}" for s in states)


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = " ".join(str(exc).split())
    text = text if len(text) <= 500 else text[:497] + "..."
    return f"{type(exc).__name__}: {text}"
