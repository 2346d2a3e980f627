"""Command-line flags: the ``tensorflow_model_server`` flags the stand-in implements.

The stand-in accepts TF Serving's own flag syntax (``--name=value``, and also
``--name value``; booleans as ``--name``, ``--name=true`` or ``--name=false``),
so that the local command line reads like the container's. Every flag of the
real server that the stand-in does not implement is refused with the reason,
never silently ignored. Flags that exist only here start with ``--standin_``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mnist_client import contract
from serving.tfs_standin.connection_limits import DEFAULT_REQUEST_READ_TIMEOUT_S, DEFAULT_SLOW_CALL_SLOTS

# The stand-in's default cap on one request message; TF Serving's own default is
# INT32_MAX. Both command lines set it explicitly through --grpc_channel_arguments.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_RECEIVE_MESSAGE_ARG = "grpc.max_receive_message_length"


class FlagError(ValueError):
    """A flag was unknown, unsupported by the stand-in, or had a bad value."""


@dataclass(frozen=True)
class ServerOptions:
    """Everything the server needs, with tensorflow_model_server's defaults."""

    port: int = contract.TFS_GRPC_PORT
    grpc_socket_path: str = ""
    rest_api_port: int = 0
    rest_api_num_threads: int = 0
    rest_api_timeout_in_ms: int = 30_000
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    enable_batching: bool = False
    batching_parameters_file: str = ""
    tensorflow_session_parallelism: int = 0
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    tensorflow_session_config_file: str = ""
    saved_model_tags: str = "serve"
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    ssl_config_file: str = ""
    grpc_channel_arguments: str = ""
    grpc_max_threads: int = 0
    enable_grpc_healthcheck_service: bool = True
    enable_serialization_as_tensor_content: bool = False
    # Stand-in only.
    standin_host: str = "0.0.0.0"
    standin_shutdown_grace_seconds: float = 30.0
    standin_rest_max_body_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    standin_request_read_timeout_seconds: float = DEFAULT_REQUEST_READ_TIMEOUT_S
    standin_slow_call_slots: int = DEFAULT_SLOW_CALL_SLOTS
    standin_model_run_slots: int = 0
    standin_tensorflow_thread_spinning: bool = False

    def replace(self, **changes: Any) -> ServerOptions:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class _Flag:
    field: str
    kind: type
    help: str
    check: Callable[[Any], str | None] | None = None  # returns an error message or None


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port between 0 and 65535"


_FLAGS: dict[str, _Flag] = {
    "port": _Flag("port", int, "TCP port for gRPC (0 with --grpc_socket_path: socket only; "
                  "0 without it: any free port, logged)", _port),
    "grpc_socket_path": _Flag("grpc_socket_path", str, "also listen for gRPC on this UNIX socket"),
    "rest_api_port": _Flag("rest_api_port", int, "TCP port for TF Serving's REST API (0: no REST API)", _port),
    "rest_api_num_threads": _Flag("rest_api_num_threads", int, "REST worker threads (0: 4 per usable CPU)",
                                  _at_least(0)),
    "rest_api_timeout_in_ms": _Flag("rest_api_timeout_in_ms", int, "deadline of a REST request's model run "
                                    "(0 or less: none)"),
    "model_name": _Flag("model_name", str, "name of the model (ignored with --model_config_file)"),
    "model_base_path": _Flag("model_base_path", str, "folder holding the numbered versions "
                             "(ignored with --model_config_file)"),
    "model_config_file": _Flag("model_config_file", str, "text ModelServerConfig: models, base paths, "
                               "version policies and labels"),
    "model_config_file_poll_wait_seconds": _Flag(
        "model_config_file_poll_wait_seconds", int, "re-read --model_config_file every N seconds (0: read once)",
        _at_least(0)),
    "file_system_poll_wait_seconds": _Flag(
        "file_system_poll_wait_seconds", int, "look for new versions every N seconds (0: once at start; "
        "negative: never)"),
    "enable_batching": _Flag("enable_batching", bool, "batch concurrent requests on the server"),
    "batching_parameters_file": _Flag("batching_parameters_file", str, "text BatchingParameters for "
                                      "--enable_batching"),
    "tensorflow_session_parallelism": _Flag(
        "tensorflow_session_parallelism", int, "threads of both TF pools (0: auto)", _at_least(0)),
    "tensorflow_intra_op_parallelism": _Flag(
        "tensorflow_intra_op_parallelism", int, "threads that one op may use (0: auto)", _at_least(0)),
    "tensorflow_inter_op_parallelism": _Flag(
        "tensorflow_inter_op_parallelism", int, "ops run at once (0: auto; negative: in the calling thread)"),
    "tensorflow_session_config_file": _Flag(
        "tensorflow_session_config_file", str, "text ConfigProto for the sessions; the parallelism flags override it"),
    "saved_model_tags": _Flag("saved_model_tags", str, "comma-separated tags of the MetaGraph to load"),
    "enable_model_warmup": _Flag("enable_model_warmup", bool, "replay assets.extra/tf_serving_warmup_requests "
                                 "before a version serves"),
    "num_request_iterations_for_warmup": _Flag(
        "num_request_iterations_for_warmup", int, "times each warm-up request is replayed", _at_least(0)),
    "max_num_load_retries": _Flag("max_num_load_retries", int, "retries of a failed version load",
                                  _at_least(0)),
    "load_retry_interval_micros": _Flag("load_retry_interval_micros", int, "pause between load retries"),
    "ssl_config_file": _Flag("ssl_config_file", str, "text SSLConfig: serve gRPC over TLS"),
    "grpc_channel_arguments": _Flag("grpc_channel_arguments", str, "comma-separated key=value gRPC server "
                                    "arguments, e.g. grpc.max_receive_message_length=33554432"),
    "grpc_max_threads": _Flag("grpc_max_threads", int, "gRPC handler threads (0: auto)", _at_least(0)),
    "enable_grpc_healthcheck_service": _Flag("enable_grpc_healthcheck_service", bool,
                                             "serve grpc.health.v1.Health (stand-in default: true)"),
    "enable_serialization_as_tensor_content": _Flag(
        "enable_serialization_as_tensor_content", bool, "answer with tensor_content instead of typed value fields"),
    "standin_host": _Flag("standin_host", str, "stand-in only: address to bind (TF Serving binds 0.0.0.0)"),
    "standin_shutdown_grace_seconds": _Flag(
        "standin_shutdown_grace_seconds", float, "stand-in only: on SIGTERM, time in-flight calls get to finish",
        _at_least(0)),
    "standin_rest_max_body_bytes": _Flag(
        "standin_rest_max_body_bytes", int, "stand-in only: largest REST request body; larger ones get 413",
        _at_least(1)),
    "standin_request_read_timeout_seconds": _Flag(
        "standin_request_read_timeout_seconds", float, "stand-in only: cancel a call whose request message has not "
        "arrived within this time (0: no deadline)", _at_least(0)),
    "standin_slow_call_slots": _Flag(
        "standin_slow_call_slots", int, "stand-in only: pool threads beyond --grpc_max_threads for calls still "
        "receiving their request; past both, calls get RESOURCE_EXHAUSTED", _at_least(0)),
    "standin_model_run_slots": _Flag(
        "standin_model_run_slots", int, "stand-in only, batching off: at most N model runs at once, the others "
        "wait their turn in arrival order (0: no limit, every handler thread runs at once)", _at_least(0)),
    "standin_tensorflow_thread_spinning": _Flag(
        "standin_tensorflow_thread_spinning", bool, "stand-in only: let TensorFlow's idle pool threads spin for "
        "work (TensorFlow's default; the stand-in's is false: they sleep, leaving the cores to busy threads)"),
}

# tensorflow_model_server flags the stand-in does not implement, with the reason.
_UNSUPPORTED: dict[str, str] = {
    "rest_api_enable_cors_support": "the stand-in's REST API sends no CORS headers",
    "monitoring_config_file": "the stand-in serves no Prometheus metrics (/monitoring/prometheus/metrics)",
    "allow_version_labels_for_unavailable_models": "version labels must name versions that exist",
    "enable_per_model_batching_parameters": "use one --batching_parameters_file",
    "num_load_threads": "versions load one at a time in the stand-in",
    "num_unload_threads": "versions unload one at a time in the stand-in",
    "flush_filesystem_caches": "the stand-in does not manage file system caches",
    "use_alts_credentials": "use --ssl_config_file for TLS",
    "platform_config_file": "the stand-in serves TensorFlow SavedModels only",
    "per_process_gpu_memory_fraction": "the stand-in runs on CPU",
    "remove_unused_fields_from_bundle_metagraph": "not implemented",
    "prefer_tflite_model": "the stand-in serves TensorFlow SavedModels only",
    "num_tflite_pools": "the stand-in serves TensorFlow SavedModels only",
    "num_tflite_interpreters_per_pool": "the stand-in serves TensorFlow SavedModels only",
    "enable_signature_method_name_check": "not implemented",
    "xla_cpu_compilation_enabled": "not implemented",
    "xla_gpu_compilation_enabled": "the stand-in runs on CPU",
    "enable_profiler": "not implemented",
    "thread_pool_factory_config_file": "not implemented",
    "mixed_precision": "not implemented",
    "skip_initialize_tpu": "the stand-in runs on CPU",
}

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _convert(name: str, flag: _Flag, raw: str) -> Any:
    try:
        if flag.kind is bool:
            lowered = raw.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError
        return flag.kind(raw)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[flag.kind]
        raise FlagError(f"--{name}={raw!r}: expected {expected}") from None


def usage() -> str:
    lines = ["usage: python -m serving.tfs_standin [--flag=value ...]", "", "flags (tensorflow_model_server's):"]
    defaults = ServerOptions()
    for name, flag in _FLAGS.items():
        lines.append(f"  --{name} (default {getattr(defaults, flag.field)!r})  {flag.help}")
    lines.append("")
    lines.append("refused (tensorflow_model_server flags the stand-in does not implement): ")
    lines.append("  " + ", ".join(f"--{name}" for name in _UNSUPPORTED))
    return "\n".join(lines)


def parse_flags(argv: Sequence[str]) -> ServerOptions:
    """Parse ``argv`` (without the program name) into ServerOptions; raise FlagError on any problem."""
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"unexpected argument {arg!r}: flags look like --name=value; see --help")
        name, has_value, raw = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name in _UNSUPPORTED:
            raise FlagError(f"--{name} is a tensorflow_model_server flag the stand-in does not support: "
                            f"{_UNSUPPORTED[name]}")
        flag = _FLAGS.get(name)
        if flag is None:
            raise FlagError(f"unknown flag --{name}; see --help for the flags the stand-in supports")
        if not has_value:
            if flag.kind is bool and (i >= len(args) or args[i].lower() not in _TRUE | _FALSE):
                raw = "true"
            elif i < len(args) and not args[i].startswith("--"):
                raw = args[i]
                i += 1
            else:
                raise FlagError(f"--{name} needs a value: --{name}=<value>")
        value = _convert(name, flag, raw)
        problem = flag.check(value) if flag.check else None
        if problem:
            raise FlagError(f"--{name}={raw}: {problem}")
        values[flag.field] = value
    options = ServerOptions(**values)
    _check_combination(options)
    return options


def _check_combination(options: ServerOptions) -> None:
    if not options.model_config_file and not options.model_base_path:
        raise FlagError("either --model_base_path (with --model_name) or --model_config_file is required")
    if options.rest_api_port and options.rest_api_port == options.port:
        raise FlagError(f"--rest_api_port={options.rest_api_port} is the gRPC --port too; TF Serving refuses "
                        "that: use a different port for the REST API")
    if options.batching_parameters_file and not options.enable_batching:
        raise FlagError("--batching_parameters_file is only read with --enable_batching=true")
    for path_flag in ("model_config_file", "batching_parameters_file", "ssl_config_file",
                      "tensorflow_session_config_file"):
        path = getattr(options, path_flag)
        if path and not os.path.isfile(path):
            raise FlagError(f"--{path_flag}={path}: no such file")
    parse_channel_arguments(options.grpc_channel_arguments)


def parse_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """``"a=1,b=x"`` -> ``[("a", 1), ("b", "x")]``: ints where they parse, as TF Serving does."""
    result: list[tuple[str, int | str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FlagError(f"--grpc_channel_arguments: {item!r} is not key=value")
        try:
            result.append((key, int(value)))
        except ValueError:
            result.append((key, value))
    return result


def tensorflow_model_server_flags() -> frozenset[str]:
    """Every flag of the real tensorflow_model_server the stand-in knows, supported or refused."""
    return frozenset(n for n in _FLAGS if not n.startswith("standin_")) | frozenset(_UNSUPPORTED) | {"version"}
