"""The server's core: the configured models, how versions load, and how requests run.

One ModelManager per configured model; one Runner (direct, or the batch
scheduler with ``--enable_batching``) shared by all. ``reload`` applies a new
model list (``--model_config_file`` polling, or ModelService/HandleReloadConfigRequest)
without disturbing the models that did not change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from tensorflow_serving.apis import model_pb2

from serving.tfs_standin import status
from serving.tfs_standin.batching import BatchScheduler
from serving.tfs_standin.config import BatchingOptions, ModelConfig, load_session_config
from serving.tfs_standin.flags import ServerOptions
from serving.tfs_standin.model_manager import LoadPolicy, ModelManager
from serving.tfs_standin.predict import DirectRunner, Runner
from serving.tfs_standin.run_slots import RunSlots
from serving.tfs_standin.servable import Servable, SessionOptions
from serving.tfs_standin.warmup import replay_warmup

log = logging.getLogger(__name__)


def session_options(options: ServerOptions) -> SessionOptions:
    """TF Serving's rule: the intra/inter flags, each falling back to --tensorflow_session_parallelism."""
    tags = tuple(t.strip() for t in options.saved_model_tags.split(",") if t.strip())
    base = b""
    if options.tensorflow_session_config_file:
        base = load_session_config(options.tensorflow_session_config_file).SerializeToString()
    return SessionOptions(
        intra_op_threads=options.tensorflow_intra_op_parallelism or options.tensorflow_session_parallelism,
        inter_op_threads=options.tensorflow_inter_op_parallelism or options.tensorflow_session_parallelism,
        tags=tags,
        base_config=base,
        thread_spinning=options.standin_tensorflow_thread_spinning,
    )


def model_run_slots(options: ServerOptions) -> RunSlots | None:
    """--standin_model_run_slots: N > 0 runs at once in arrival order; 0 no limit (None)."""
    return RunSlots(options.standin_model_run_slots) if options.standin_model_run_slots > 0 else None


class ServerCore:
    def __init__(
        self,
        options: ServerOptions,
        models: list[ModelConfig],
        batching: BatchingOptions | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self.session_options = session_options(options)
        self.batch_scheduler = BatchScheduler(batching) if batching is not None else None
        self.runner: Runner = (
            self.batch_scheduler if self.batch_scheduler is not None else DirectRunner(model_run_slots(options))
        )
        self.load_policy = LoadPolicy(
            poll_seconds=options.file_system_poll_wait_seconds,
            max_retries=options.max_num_load_retries,
            retry_interval_s=max(0.0, options.load_retry_interval_micros / 1e6),
        )
        self._on_change = on_change
        self._initial_models = models
        self._managers: dict[str, ModelManager] = {}
        self._reload_lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self.batch_scheduler is not None:
            self.batch_scheduler.start()
        self.reload(self._initial_models)

    def stop(self) -> None:
        with self._reload_lock:
            managers, self._managers = self._managers, {}
        for manager in managers.values():
            manager.stop()
        if self.batch_scheduler is not None:
            self.batch_scheduler.stop()

    def reload(self, models: list[ModelConfig]) -> None:
        """Serve exactly ``models``: start new ones, stop removed ones, restart changed ones."""
        with self._reload_lock:
            current = self._managers
            wanted = {m.name: m for m in models}
            updated: dict[str, ModelManager] = {}
            stopped: list[ModelManager] = []
            for name, config in wanted.items():
                manager = current.get(name)
                if manager is not None and manager.config == config:
                    updated[name] = manager
                    continue
                if manager is not None:
                    stopped.append(manager)
                updated[name] = ModelManager(config, self._load, self.load_policy, self._on_change)
                updated[name].start()
                log.info("serving model %s from %s (%s policy)", name, config.base_path, config.policy.kind)
            stopped.extend(m for name, m in current.items() if name not in wanted)
            self._managers = updated
        for manager in stopped:
            log.info("no longer serving model %s", manager.name)
            manager.stop()
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _load(self, name: str, version: int, path: Path) -> Servable:
        servable = Servable(name, version, path, self.session_options)
        if self.options.enable_model_warmup:
            replay_warmup(servable, self.runner, self.options.num_request_iterations_for_warmup)
        return servable

    # --- queries ------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return sorted(self._managers)

    def all_available(self) -> bool:
        """Every configured model has a version AVAILABLE (the readiness of the health service)."""
        managers = self._managers
        return bool(managers) and all(m.has_available() for m in managers.values())

    def manager(self, name: str) -> ModelManager:
        found = self._managers.get(name)
        if found is None:
            raise self._unknown_model(f"Latest({status.clip(name)})")
        return found

    def _unknown_model(self, request_text: str) -> status.ServingError:
        return status.not_found(
            f"Servable not found for request: {request_text}. This server serves models "
            f"{{{','.join(self.model_names)}}}"
        )

    def servable_for(self, spec: model_pb2.ModelSpec) -> Servable:
        """The version ``spec`` asks for (latest, a number or a label), or the ServingError why not."""
        manager = self._managers.get(spec.name)
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            if manager is None:
                raise self._unknown_model(f"Specific({status.clip(spec.name)}, {spec.version.value})")
            return manager.servable(spec.version.value)
        if choice == "version_label":
            if manager is None:
                raise self._unknown_model(
                    f"Labeled({status.clip(spec.name)}, {status.clip(spec.version_label)})"
                )
            return manager.servable(label=spec.version_label)
        if manager is None:
            raise self._unknown_model(f"Latest({status.clip(spec.name)})")
        return manager.servable()
