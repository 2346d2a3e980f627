"""TF Serving's configuration files, read and checked the way tensorflow_model_server reads them.

All are protobuf text format: ``--model_config_file`` (ModelServerConfig),
``--batching_parameters_file`` (BatchingParameters), ``--ssl_config_file``
(SSLConfig) and ``--monitoring_config_file`` (MonitoringConfig, parsed so that
the repository's file is checked, though the stand-in serves no metrics).
Anything the stand-in cannot honour is refused with a ConfigError that names
the file, the field and what is supported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from google.protobuf import message, text_format
from tensorflow.core.protobuf import config_pb2 as tf_config_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.tfs_standin.flags import ServerOptions
from serving.tfs_standin.protos import config_pb2

log = logging.getLogger(__name__)

TENSORFLOW_PLATFORM = "tensorflow"

_M = TypeVar("_M", bound=message.Message)


class ConfigError(ValueError):
    """A configuration file is unreadable, malformed or asks for something unsupported."""


def parse_text_proto(path: str | os.PathLike[str], proto: _M) -> _M:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: not a valid {proto.DESCRIPTOR.name} text proto: {exc}") from exc
    return proto


# --- models -----------------------------------------------------------------


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: the ``latest`` N, ``all``, or ``specific`` ones."""

    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    def choose(self, on_disk: list[int]) -> list[int]:
        """The aspired versions among ``on_disk`` (ascending)."""
        if self.kind == "all":
            return list(on_disk)
        if self.kind == "specific":
            return [v for v in on_disk if v in self.versions]
        return list(on_disk[-self.num_versions :]) if on_disk else []


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: Path
    policy: VersionPolicy = VersionPolicy()
    version_labels: dict[str, int] = field(default_factory=dict)


def _version_policy(config: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        if not policy.specific.versions:
            raise ConfigError(f"model {config.name!r}: model_version_policy.specific lists no versions")
        return VersionPolicy("specific", versions=frozenset(policy.specific.versions))
    if which == "latest" and policy.latest.num_versions:
        if policy.latest.num_versions < 0:
            raise ConfigError(f"model {config.name!r}: latest.num_versions must be positive")
        return VersionPolicy("latest", num_versions=policy.latest.num_versions)
    return VersionPolicy()


def _model_config(config: model_server_config_pb2.ModelConfig, source: str) -> ModelConfig:
    if not config.name:
        raise ConfigError(f"{source}: a model config has no name")
    if not config.base_path:
        raise ConfigError(f"{source}: model {config.name!r} has no base_path")
    platform = config.model_platform or TENSORFLOW_PLATFORM
    if platform != TENSORFLOW_PLATFORM:
        raise ConfigError(
            f"{source}: model {config.name!r} has model_platform {platform!r}; the stand-in serves "
            f"{TENSORFLOW_PLATFORM!r} SavedModels only"
        )
    if config.HasField("logging_config"):
        raise ConfigError(f"{source}: model {config.name!r}: logging_config (request logging) is not supported")
    labels = dict(config.version_labels)
    for label, version in labels.items():
        if version <= 0:
            raise ConfigError(f"{source}: model {config.name!r}: label {label!r} -> {version}, expected a version > 0")
    # TF Serving resolves a relative base_path against the working directory.
    return ModelConfig(config.name, Path(config.base_path).absolute(), _version_policy(config), labels)


def model_configs_from_proto(config: model_server_config_pb2.ModelServerConfig, source: str) -> list[ModelConfig]:
    """Check a ModelServerConfig and turn it into ModelConfigs; raise ConfigError if unsupported."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"{source}: custom_model_config is not supported; use model_config_list")
    models = [_model_config(c, source) for c in config.model_config_list.config]
    if not models:
        raise ConfigError(f"{source}: model_config_list has no models")
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: model names must be unique; repeated: {', '.join(duplicates)}")
    return models


def load_model_configs(options: ServerOptions) -> list[ModelConfig]:
    """The models to serve: from --model_config_file, else from --model_name/--model_base_path."""
    if options.model_config_file:
        if options.model_base_path:
            log.warning("--model_config_file is set, so --model_name and --model_base_path are ignored "
                        "(as tensorflow_model_server does)")
        proto = parse_text_proto(options.model_config_file, model_server_config_pb2.ModelServerConfig())
        return model_configs_from_proto(proto, options.model_config_file)
    proto = model_server_config_pb2.ModelServerConfig()
    single = proto.model_config_list.config.add()
    single.name = options.model_name
    single.base_path = options.model_base_path
    single.model_platform = TENSORFLOW_PLATFORM
    return model_configs_from_proto(proto, "--model_base_path")


# --- batching ---------------------------------------------------------------


@dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's batching parameters with its defaults for the unset ones."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 0  # 0: one per CPU core, as TF Serving
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size is {self.max_batch_size}, expected >= 1")
        if self.batch_timeout_micros < 0:
            problems.append(f"batch_timeout_micros is {self.batch_timeout_micros}, expected >= 0")
        if self.max_enqueued_batches < 1:
            problems.append(f"max_enqueued_batches is {self.max_enqueued_batches}, expected >= 1")
        if self.num_batch_threads < 0:
            problems.append(f"num_batch_threads is {self.num_batch_threads}, expected >= 1")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                problems.append(f"allowed_batch_sizes {list(sizes)} must be positive and increasing")
            elif sizes[-1] != self.max_batch_size:
                problems.append(
                    f"the last allowed_batch_sizes entry is {sizes[-1]}, expected max_batch_size "
                    f"({self.max_batch_size})"
                )
        if problems:
            raise ConfigError("batching parameters: " + "; ".join(problems))

    @property
    def threads(self) -> int:
        return self.num_batch_threads or (os.cpu_count() or 1)


def batching_options_from_proto(proto: config_pb2.BatchingParameters) -> BatchingOptions:
    defaults = BatchingOptions()

    def wrapped(name: str, default: int | str) -> int | str:
        return getattr(proto, name).value if proto.HasField(name) else default

    return BatchingOptions(
        max_batch_size=int(wrapped("max_batch_size", defaults.max_batch_size)),
        batch_timeout_micros=int(wrapped("batch_timeout_micros", defaults.batch_timeout_micros)),
        max_enqueued_batches=int(wrapped("max_enqueued_batches", defaults.max_enqueued_batches)),
        num_batch_threads=int(wrapped("num_batch_threads", defaults.num_batch_threads)),
        thread_pool_name=str(wrapped("thread_pool_name", defaults.thread_pool_name)),
        allowed_batch_sizes=tuple(proto.allowed_batch_sizes),
        pad_variable_length_inputs=proto.pad_variable_length_inputs,
    )


def load_batching_options(path: str | os.PathLike[str]) -> BatchingOptions:
    proto = parse_text_proto(path, config_pb2.BatchingParameters())
    try:
        return batching_options_from_proto(proto)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# --- TLS and monitoring -----------------------------------------------------


@dataclass(frozen=True)
class TlsOptions:
    server_key: bytes
    server_cert: bytes
    custom_ca: bytes | None
    client_verify: bool


def _looks_like_pem(text: str, kind: str) -> bool:
    return "-----BEGIN" in text and kind in text


def load_tls_options(path: str | os.PathLike[str]) -> TlsOptions:
    """Read an SSLConfig (PEM text inline, as TF Serving expects) and check it is usable."""
    proto = parse_text_proto(path, config_pb2.SSLConfig())
    if not _looks_like_pem(proto.server_key, "PRIVATE KEY"):
        raise ConfigError(f"{path}: server_key must hold the PEM text of the private key (-----BEGIN ... PRIVATE KEY)")
    if not _looks_like_pem(proto.server_cert, "CERTIFICATE"):
        raise ConfigError(f"{path}: server_cert must hold the PEM text of the certificate (-----BEGIN CERTIFICATE)")
    if proto.custom_ca and not _looks_like_pem(proto.custom_ca, "CERTIFICATE"):
        raise ConfigError(f"{path}: custom_ca must hold PEM certificate text")
    if proto.client_verify and not proto.custom_ca:
        raise ConfigError(f"{path}: client_verify needs custom_ca, the CA that signs client certificates")
    return TlsOptions(
        server_key=proto.server_key.encode(),
        server_cert=proto.server_cert.encode(),
        custom_ca=proto.custom_ca.encode() if proto.custom_ca else None,
        client_verify=proto.client_verify,
    )


def load_session_config(path: str | os.PathLike[str]) -> tf_config_pb2.ConfigProto:
    """--tensorflow_session_config_file: a TensorFlow ConfigProto in text format."""
    return parse_text_proto(path, tf_config_pb2.ConfigProto())


def load_monitoring_config(path: str | os.PathLike[str]) -> config_pb2.MonitoringConfig:
    proto = parse_text_proto(path, config_pb2.MonitoringConfig())
    prometheus = proto.prometheus_config
    if prometheus.enable and prometheus.path and not prometheus.path.startswith("/"):
        raise ConfigError(f"{path}: prometheus_config.path {prometheus.path!r} must start with '/'")
    return proto
