"""Server settings: defaults, then ``MNIST_REST_*`` environment variables, then overrides.

The same module is read by the gunicorn configuration file (process-level
settings: bind address, workers, TLS) and by the app factory (everything the
app needs). Both fail fast with a message naming the variable, the value and
what was expected, so a typo stops the server at start instead of surfacing as
a crash-looping worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mnist_client import contract

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "MNIST_REST_"

DEFAULT_MODEL_BASE_PATH = REPO_ROOT / "models" / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME
# Probes and metrics are scraped by infrastructure that usually holds no API token;
# the OpenAPI document describes the API and holds nothing secret.
DEFAULT_AUTH_OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.yaml")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting has a value the server cannot use; the message names the variable."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything the app factory needs; see docs/rest-server.md for each setting."""

    model_name: str = contract.MODEL_NAME
    model_base_path: Path = DEFAULT_MODEL_BASE_PATH
    # auto: CUDA when available, else CPU; or cpu, cuda, cuda:N.
    device: str = "auto"
    # Highest N versions kept loaded (TF Serving's `latest { num_versions: N }` policy).
    keep_versions: int = 1
    poll_seconds: float = 1.0
    # Limits, on by default: images per request, and request body bytes.
    max_batch: int = 1024
    max_body_bytes: int = 32 * 1024 * 1024
    torch_threads: int = 1
    # Run larger batches on a frozen copy optimised for inference, checked on the version's check set:
    # from the batch size at which it is measured faster when the version loads (0), or from this size.
    optimize_batches: bool = True
    optimized_min_batch: int = 0
    # Micro-batching: requests queued behind a forward pass share the next one (serving/torch_server/batching.py).
    batching: bool = True
    batch_max_size: int = 32
    # Optional bearer token for the API; the token may come from a file (a mounted secret).
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: Path | None = None
    auth_open_paths: tuple[str, ...] = DEFAULT_AUTH_OPEN_PATHS
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check(self.model_name != "" and "/" not in self.model_name, "MODEL_NAME", self.model_name,
               "a non-empty name without '/'")  # fmt: skip
        _check(self.device in DEVICE_CHOICES or self.device.startswith("cuda:"), "DEVICE", self.device,
               "one of auto, cpu, cuda, cuda:N")  # fmt: skip
        _check(self.keep_versions >= 1, "KEEP_VERSIONS", self.keep_versions, "an integer >= 1")
        _check(self.poll_seconds > 0, "POLL_SECONDS", self.poll_seconds, "a number of seconds > 0")
        _check(self.max_batch >= 1, "MAX_BATCH", self.max_batch, "an integer >= 1")
        _check(self.max_body_bytes >= 1024, "MAX_BODY_BYTES", self.max_body_bytes, "an integer >= 1024")
        _check(self.optimized_min_batch >= 0, "OPTIMIZED_MIN_BATCH", self.optimized_min_batch,
               "an integer >= 0 (0: measure when a version loads)")  # fmt: skip
        _check(self.torch_threads >= 1, "TORCH_THREADS", self.torch_threads, "an integer >= 1")
        _check(self.batch_max_size >= 1, "BATCH_MAX_SIZE", self.batch_max_size, "an integer >= 1")
        _check(self.auth_token != "", "AUTH_TOKEN", "", "a non-empty token, or the variable unset")
        _check(self.log_level.upper() in _LOG_LEVELS, "LOG_LEVEL", self.log_level, "one of " + ", ".join(_LOG_LEVELS))
        _check(all(p.startswith("/") for p in self.auth_open_paths), "AUTH_OPEN_PATHS", self.auth_open_paths,
               "comma-separated paths starting with '/'")  # fmt: skip

    def resolved_auth_token(self) -> str | None:
        """The token from ``auth_token`` or, failing that, the first line of ``auth_token_file``."""
        if self.auth_token is not None:
            return self.auth_token
        if self.auth_token_file is None:
            return None
        try:
            token = self.auth_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{ENV_PREFIX}AUTH_TOKEN_FILE={self.auth_token_file}: cannot read it ({exc})") from None
        if not token:
            raise ConfigError(f"{ENV_PREFIX}AUTH_TOKEN_FILE={self.auth_token_file}: the file is empty")
        return token

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Defaults, then ``MNIST_REST_<FIELD>`` variables from ``environ`` (default os.environ), then overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for name in known:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw.strip() != "":
                values[name] = _parse(name, raw.strip(), known[name].type)
        for name, value in (overrides or {}).items():
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}; expected one of {', '.join(sorted(known))}")
            values[name] = value
        config = cls(**values)
        # Normalise types that overrides may pass loosely (str paths, lists).
        return replace(
            config,
            model_base_path=Path(config.model_base_path),
            auth_token_file=None if config.auth_token_file is None else Path(config.auth_token_file),
            auth_open_paths=tuple(config.auth_open_paths),
        )


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{ENV_PREFIX}{name}={value!r}: expected {expected}")


def _parse(name: str, raw: str, annotation: object) -> Any:
    """Parse one environment value by the field's annotation (a string under `from __future__`)."""
    kind = str(annotation)
    variable = ENV_PREFIX + name.upper()
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return parse_bool(variable, raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if "Path" in kind:
            return Path(raw)
    except ConfigError:
        raise
    except ValueError:
        expected = {"int": "an integer", "float": "a number"}.get(kind, f"a value of type {kind}")
        raise ConfigError(f"{variable}={raw!r}: expected {expected}") from None
    return raw


def parse_bool(variable: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{variable}={raw!r}: expected true/false (1/0, yes/no, on/off)")


def env_int(name: str, default: int, minimum: int = 0, environ: Mapping[str, str] | None = None) -> int:
    """``MNIST_REST_<name>`` as an integer >= minimum, or ``default`` when unset (gunicorn settings)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_PREFIX + name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise ConfigError(f"{ENV_PREFIX}{name}={value}: expected an integer >= {minimum}")
    return value


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_PREFIX + name, "").strip()
    return raw or default
