"""Settings of the web page's backend: defaults, then ``MNIST_WEB_*`` environment variables, then overrides.

The three serving targets of the stack each have one setting of the form ``[NAME=]ADDRESS`` (the load
tester's target syntax): a base URL for the two REST APIs, ``HOST:PORT`` for gRPC, or ``off`` to leave
the target out. Framework and protocol follow from the setting, so the page never guesses them.

    MNIST_WEB_PYTORCH_REST       pytorch-rest=http://127.0.0.1:8080
    MNIST_WEB_TENSORFLOW_REST    tensorflow-rest=http://127.0.0.1:8501
    MNIST_WEB_TENSORFLOW_GRPC    tensorflow-grpc=127.0.0.1:8500

A bad value fails at start with a message naming the variable, the value and what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from mnist_client import contract

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "MNIST_WEB_"
DISABLED = "off"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Framework = Literal["pytorch", "tensorflow"]
Protocol = Literal["rest", "grpc"]


class ConfigError(ValueError):
    """A setting has a value the backend cannot use; the message names the variable."""


@dataclass(frozen=True)
class TargetSpec:
    """One serving target as the page shows it."""

    name: str
    framework: Framework
    protocol: Protocol
    address: str  # base URL (REST) or HOST:PORT (gRPC)


# setting -> (framework, protocol, default name, default address)
TARGET_SLOTS: dict[str, tuple[Framework, Protocol, str, str]] = {
    "pytorch_rest": ("pytorch", "rest", "pytorch-rest", f"http://127.0.0.1:{contract.REST_PORT}"),
    "tensorflow_rest": ("tensorflow", "rest", "tensorflow-rest", f"http://127.0.0.1:{contract.TFS_REST_PORT}"),
    "tensorflow_grpc": ("tensorflow", "grpc", "tensorflow-grpc", f"127.0.0.1:{contract.TFS_GRPC_PORT}"),
}


@dataclass(frozen=True)
class WebConfig:
    """Everything the app factory and ``python -m serving.web`` need; docs/web.md describes each."""

    host: str = "0.0.0.0"
    port: int = contract.WEB_PORT
    # The backend waits on the model servers, it computes little: one process, several threads.
    workers: int = 1
    threads: int = 8
    pytorch_rest: str = "{}={}".format(*TARGET_SLOTS["pytorch_rest"][2:])
    tensorflow_rest: str = "{}={}".format(*TARGET_SLOTS["tensorflow_rest"][2:])
    tensorflow_grpc: str = "{}={}".format(*TARGET_SLOTS["tensorflow_grpc"][2:])
    # Seconds each call to a model server may take; short, so a hung target cannot stall the page.
    timeout_s: float = 2.0
    # MNIST test files for "random test image"; None: MNIST_DATA_DIR, the shared copy, or a download.
    data_dir: Path | None = None
    # Where load-test result files (make demo's demo.json, mnist-loadtest --json) are read from.
    reports_dir: Path = REPO_ROOT / "reports"
    # A 28x28 JSON image is about 16 KB even with long decimals.
    max_body_bytes: int = 256 * 1024
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "PORT", self.port, "a port number between 0 and 65535")
        _check(self.workers >= 1, "WORKERS", self.workers, "an integer >= 1")
        _check(self.threads >= 1, "THREADS", self.threads, "an integer >= 1")
        _check(math.isfinite(self.timeout_s) and self.timeout_s > 0, "TIMEOUT_S", self.timeout_s,
               "a number of seconds > 0")  # fmt: skip
        _check(self.max_body_bytes >= 1024, "MAX_BODY_BYTES", self.max_body_bytes, "an integer >= 1024")
        _check(self.log_level.upper() in _LOG_LEVELS, "LOG_LEVEL", self.log_level, "one of " + ", ".join(_LOG_LEVELS))
        self.targets()  # each target setting parses

    def targets(self) -> list[TargetSpec]:
        """The enabled targets, in the page's order (PyTorch REST, TensorFlow REST, TensorFlow gRPC)."""
        specs = []
        for slot, (framework, protocol, default_name, _) in TARGET_SLOTS.items():
            raw = str(getattr(self, slot)).strip()
            if raw.lower() == DISABLED:
                continue
            name, sep, address = raw.partition("=")
            if not sep or "/" in name or ":" in name:  # no NAME= prefix (an '=' inside a URL is not one)
                name, address = default_name, raw
            name, address = name.strip(), address.strip()
            variable = ENV_PREFIX + slot.upper()
            if not name or any(c.isspace() or c in ",=" for c in name):
                raise ConfigError(f"{variable}={raw!r}: target name {name!r}; expected a name without spaces, ',' '='")
            if not address:
                raise ConfigError(f"{variable}={raw!r}: no address; expected [NAME=]ADDRESS or {DISABLED!r}")
            if protocol == "rest" and not address.startswith(("http://", "https://")):
                raise ConfigError(f"{variable}={raw!r}: expected [NAME=]http://HOST:PORT or {DISABLED!r}")
            if protocol == "grpc" and "://" in address and not address.startswith("dns:///"):
                expected = f"[NAME=]HOST:PORT (or dns:///HOST:PORT) or {DISABLED!r}"
                raise ConfigError(f"{variable}={raw!r}: expected {expected}")
            specs.append(TargetSpec(name, framework, protocol, address))
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"target names {names} repeat; expected a distinct name per target")
        return specs

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> WebConfig:
        """Defaults, then ``MNIST_WEB_<FIELD>`` variables from ``environ`` (default os.environ), then overrides."""
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, spec in known.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw.strip() != "":
                values[name] = _parse(ENV_PREFIX + name.upper(), raw.strip(), str(spec.type))
        for name, value in (overrides or {}).items():
            if name not in known:
                raise ConfigError(f"unknown setting {name!r}; expected one of {', '.join(sorted(known))}")
            values[name] = value
        for name in ("data_dir", "reports_dir"):  # overrides may pass str paths
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{ENV_PREFIX}{name}={value!r}: expected {expected}")


def _parse(variable: str, raw: str, annotation: str) -> Any:
    """One environment value, by the field's annotation (a string under ``from __future__``)."""
    try:
        if annotation == "int":
            return int(raw)
        if annotation == "float":
            return float(raw)
    except ValueError:
        expected = "an integer" if annotation == "int" else "a number"
        raise ConfigError(f"{variable}={raw!r}: expected {expected}") from None
    if "Path" in annotation:
        return Path(raw)
    return raw
