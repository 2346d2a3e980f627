"""One loaded SavedModel version: a TensorFlow session, its signatures, and fast callables.

The stand-in loads a version the way TensorFlow Serving does: into a
``tf.compat.v1.Session`` through the SavedModel loader (the C++ server's
SavedModelBundle), not through ``tf.saved_model.load``. So a model that only
works eagerly fails here as it would in TF Serving, and each signature runs as
one ``Session`` callable with no eager dispatch per call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

from serving.tfs_standin import status

log = logging.getLogger(__name__)

# TF2 SavedModels carry this pseudo-signature; it is listed in metadata, as TF Serving does.
INIT_OP_SIGNATURE_KEY = "__saved_model_init_op"
# Longer deadlines than this (about 17 minutes) run without a session timeout.
MAX_RUN_TIMEOUT_MS = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A signature tensor: its alias, graph tensor name, dtype and shape (``None`` = any size)."""

    alias: str
    tensor_name: str
    dtype: int  # types_pb2.DataType
    np_dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: unknown rank

    @property
    def dtype_name(self) -> str:
        return types_pb2.DataType.Name(self.dtype)

    def shape_text(self) -> str:
        if self.shape is None:
            return "any shape"
        return "[" + ",".join("-1" if d is None else str(d) for d in self.shape) + "]"


def _shape(proto: tensor_shape_pb2.TensorShapeProto) -> tuple[int | None, ...] | None:
    if proto.unknown_rank:
        return None
    return tuple(None if d.size < 0 else int(d.size) for d in proto.dim)


def _numpy_dtype(dtype: int) -> np.dtype:
    return np.dtype(tf.dtypes.as_dtype(dtype).as_numpy_dtype)


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    input_order: tuple[str, ...]  # sorted aliases: the feed order of the callables
    output_order: tuple[str, ...]  # sorted aliases: the default fetch order
    where: str = "the signature"  # for error messages: "signature <name> of model <model> version <n>"


def _signature(name: str, proto: meta_graph_pb2.SignatureDef, where: str) -> Signature:
    def specs(infos: Mapping[str, meta_graph_pb2.TensorInfo]) -> dict[str, TensorSpec]:
        return {
            alias: TensorSpec(alias, info.name, info.dtype, _numpy_dtype(info.dtype), _shape(info.tensor_shape))
            for alias, info in infos.items()
            if info.WhichOneof("encoding") == "name"
        }

    inputs, outputs = specs(proto.inputs), specs(proto.outputs)
    return Signature(name, inputs, outputs, tuple(sorted(inputs)), tuple(sorted(outputs)), where)


@dataclass(frozen=True)
class SessionOptions:
    """TensorFlow session settings: a base ConfigProto (--tensorflow_session_config_file), with the
    thread pools of the --tensorflow_*_parallelism flags on top where they are set (0 = keep).

    ``thread_spinning=False`` sets ``experimental.disable_thread_spinning``: TensorFlow's idle pool
    threads sleep at once instead of spinning for work first (docs/tf-serving.md, "The gRPC tail").
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    tags: tuple[str, ...] = (tf.saved_model.SERVING,)
    base_config: bytes = b""  # a serialized ConfigProto
    thread_spinning: bool = True  # TensorFlow's default; False overrides the base config

    def config_proto(self) -> config_pb2.ConfigProto:
        config = config_pb2.ConfigProto(allow_soft_placement=True)
        config.MergeFromString(self.base_config)
        if self.intra_op_threads:
            config.intra_op_parallelism_threads = self.intra_op_threads
        if self.inter_op_threads:
            config.inter_op_parallelism_threads = self.inter_op_threads
        if not self.thread_spinning:
            config.experimental.disable_thread_spinning = True
        return config


class Servable:
    """A loaded version. Thread-safe: ``run`` may be called from many threads at once.

    The session is closed when the last reference goes away (``Servable`` objects
    are dropped by the manager on unload and by requests when they finish), so an
    unload never cuts off a call in flight.
    """

    def __init__(self, name: str, version: int, path: Path, options: SessionOptions) -> None:
        self.name = name
        self.version = version
        self.path = path
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=options.config_proto())
        try:
            with self._graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(self._session, list(options.tags), str(path))
        except BaseException:
            self._session.close()
            raise
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(meta_graph.signature_def)
        self.signatures: dict[str, Signature] = {
            key: _signature(key, proto, f"signature {key} of model {name} version {version}")
            for key, proto in self.signature_defs.items()
            if key != INIT_OP_SIGNATURE_KEY
        }
        if not self.signatures:
            self._session.close()
            raise ValueError(f"{path} has no serving signatures (tags {','.join(options.tags)})")
        self._callables: dict[tuple[str, tuple[str, ...], int | None], Callable[..., Any]] = {}
        self._callables_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Servable({self.name!r}, version={self.version}, path={str(self.path)!r})"

    def signature(self, key: str) -> Signature:
        found = self.signatures.get(key)
        if found is None:
            # TF Serving's code and message for an unknown signature key.
            raise status.failed_precondition(
                f'Serving signature key "{status.clip(key)}" not found. Model {self.name} version {self.version} has: '
                f"{', '.join(sorted(self.signatures))}."
            )
        return found

    def _callable(self, signature: Signature, fetch: tuple[str, ...], timeout_ms: int | None) -> Callable[..., Any]:
        key = (signature.name, fetch, timeout_ms)
        fn = self._callables.get(key)
        if fn is None:
            with self._callables_lock:
                fn = self._callables.get(key)
                if fn is None:
                    options = config_pb2.CallableOptions(
                        feed=[signature.inputs[a].tensor_name for a in signature.input_order],
                        fetch=[signature.outputs[a].tensor_name for a in fetch],
                    )
                    if timeout_ms is not None:
                        options.run_options.timeout_in_ms = timeout_ms
                    # Session::MakeCallable through TF's (long-standing, private) Python binding: one C++
                    # call per run. Session.make_callable with feeds falls back to Session.run, whose
                    # per-call feed and fetch handling costs about a third of a batch-1 prediction.
                    fn = self._session._make_callable_from_options(options)  # noqa: SLF001
                    self._callables[key] = fn
        return fn

    def run(
        self,
        signature: Signature,
        inputs: Sequence[np.ndarray],
        fetch: tuple[str, ...],
        timeout_ms: int | None = None,
    ) -> list[np.ndarray]:
        """Run ``signature`` on ``inputs`` (in ``signature.input_order``); outputs in ``fetch`` order.

        ``timeout_ms`` bounds the session run, as TF Serving does with the call's deadline. A
        callable's timeout is fixed when it is made, so the timeout is rounded up to a power of two:
        a run is cut off at most twice as late as asked (the caller has given up by then anyway),
        and a handful of callables serve every deadline. TensorFlow errors become ServingErrors.
        """
        bucket = None
        if timeout_ms is not None and timeout_ms <= MAX_RUN_TIMEOUT_MS:
            bucket = 1 << max(0, timeout_ms - 1).bit_length()
        fn = self._callable(signature, fetch, bucket)
        try:
            return fn(*inputs)
        except tf.errors.DeadlineExceededError as exc:
            raise status.deadline_exceeded(f"model {self.name} version {self.version} ran out of time: "
                                           f"{exc.message}") from exc
        except tf.errors.OpError as exc:
            code = status.code_from_number(exc.error_code)
            raise status.ServingError(code, f"model {self.name} version {self.version}: {exc.message}") from exc
