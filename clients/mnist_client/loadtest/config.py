"""The load test's settings, validated once so that nothing downstream meets an impossible value.

A :class:`LoadTestConfig` names one or more :class:`Target` servers and how to load them:

- closed loop: ``concurrency`` requests in flight, each sent as soon as the previous one answered;
  a sweep is a list of concurrencies;
- open loop: requests arrive at a fixed ``rate`` per second whatever the server does, with at most
  ``max_in_flight`` outstanding; a sweep is a list of rates. Latency is measured from each request's
  intended send time, so a stalled server cannot hide the requests queued behind it.

Each (target, sweep point) runs for ``duration_s`` seconds or ``requests`` requests after
``warmup_requests`` excluded calls, ``repeats`` times: the rounds of one sweep point alternate between
the targets (A B A B ...), so that a disturbance of the machine falls on all of them alike, and the
report gives each point's median and spread over its rounds.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from mnist_client import contract
from mnist_client.cpus import usable_cpus
from mnist_client.loadtest.errors import ConfigError
from mnist_client.loadtest.security import Security

Protocol = Literal["rest", "grpc"]
Mode = Literal["closed", "open"]
RestFormat = Literal["json", "npy"]

PROTOCOLS: tuple[str, ...] = ("rest", "grpc")
MODES: tuple[str, ...] = ("closed", "open")
REST_FORMATS: tuple[str, ...] = ("json", "npy")
MNIST_TEST_IMAGES = 10_000
# More in-flight requests than this per run is a misconfiguration, not a load test of this server.
MAX_IN_FLIGHT_LIMIT = 65_536
MAX_PROCESSES = 256
MAX_REPEATS = 100
DEFAULT_DURATION_S = 10.0


@dataclass(frozen=True)
class Target:
    """One server to load.

    ``address`` is a base URL for REST (``http://host:port[/prefix]``, or ``https://`` for TLS) and a
    gRPC target for gRPC (``host:port``, ``grpc://host:port``, ``grpcs://host:port`` for TLS, or
    ``dns:///host:port`` for client-side round-robin over every address the name resolves to).
    """

    name: str
    protocol: Protocol
    address: str

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() or c in ",=" for c in self.name):
            raise ConfigError(f"target name {self.name!r}: expected a non-empty name without spaces, ',' or '='")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"target {self.name!r}: protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        if self.protocol == "rest":
            _parse_rest_url(self.name, self.address)
        else:
            _parse_grpc_target(self.name, self.address)

    @property
    def host(self) -> str:
        return self._endpoint()[0]

    @property
    def port(self) -> int:
        return self._endpoint()[1]

    @property
    def tls(self) -> bool:
        """Whether the target speaks TLS: an https URL or a grpcs:// target (security.py)."""
        return self.address.startswith("https://" if self.protocol == "rest" else "grpcs://")

    @property
    def path_prefix(self) -> str:
        """REST only: the URL path the API lives under ('' for the server root)."""
        return _parse_rest_url(self.name, self.address)[2] if self.protocol == "rest" else ""

    @property
    def grpc_target(self) -> str:
        """gRPC only: the target string for ``grpc.insecure_channel``."""
        if self.protocol != "grpc":
            raise ConfigError(f"target {self.name!r} is a REST target; it has no gRPC target string")
        address = self.address
        for prefix in ("grpc://", "grpcs://"):
            if address.startswith(prefix):
                return address[len(prefix) :]
        return address

    def _endpoint(self) -> tuple[str, int]:
        if self.protocol == "rest":
            host, port, _ = _parse_rest_url(self.name, self.address)
            return host, port
        return _parse_grpc_target(self.name, self.address)


def parse_target(spec: str, protocol: Protocol) -> Target:
    """``[NAME=]ADDRESS`` -> :class:`Target`; the name defaults to the protocol (``rest``, ``grpc``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{protocol} target {spec!r}: expected [NAME=]ADDRESS")
    name, sep, address = spec.partition("=")
    if not sep or "/" in name or ":" in name:  # no NAME= prefix (an '=' inside a URL is not one)
        name, address = protocol, spec
    return Target(name=name.strip(), protocol=protocol, address=address.strip())


def _parse_rest_url(name: str, url: str) -> tuple[str, int, str]:
    expected = "expected http(s)://HOST[:PORT][/PATH-PREFIX], e.g. http://127.0.0.1:8080"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # e.g. a port that is not a number or out of range
        raise ConfigError(f"target {name!r}: bad URL {url!r} ({exc}); {expected}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"target {name!r}: URL {url!r} has scheme {parts.scheme!r}; {expected}")
    if not parts.hostname:
        raise ConfigError(f"target {name!r}: URL {url!r} has no host; {expected}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"target {name!r}: URL {url!r} has a query, fragment or credentials; {expected}")
    default_port = 443 if parts.scheme == "https" else 80
    return parts.hostname, port if port is not None else default_port, parts.path.rstrip("/")


def _parse_grpc_target(name: str, target: str) -> tuple[str, int]:
    expected = "expected HOST:PORT (or grpc://HOST:PORT, grpcs://HOST:PORT for TLS, dns:///HOST:PORT), e.g. 127.0.0.1:8500"
    rest = target
    for prefix in ("grpc://", "grpcs://", "dns:///"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
            break
    if "://" in rest or "/" in rest:
        raise ConfigError(f"target {name!r}: gRPC target {target!r} is not HOST:PORT; {expected}")
    if rest.startswith("["):  # [IPv6]:port
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise ConfigError(f"target {name!r}: gRPC target {target!r} has no port; {expected}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"target {name!r}: {host!r} in {target!r} is not an IPv6 address; {expected}") from None
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"target {name!r}: gRPC target {target!r} has no host or no port; {expected}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"target {name!r}: port {port_text!r} in {target!r} is not in 1..65535; {expected}")
    return host, int(port_text)


@dataclass(frozen=True)
class LoadTestConfig:
    """Everything one ``run`` needs. Construction validates every field (raises :class:`ConfigError`)."""

    targets: tuple[Target, ...]
    mode: Mode = "closed"
    concurrency: tuple[int, ...] = (1,)  # closed loop: the sweep; ignored in open loop
    rates: tuple[float, ...] = ()  # open loop: the sweep, requests per second
    max_in_flight: int = 256  # open loop: outstanding requests beyond this wait (and their wait is counted)
    duration_s: float | None = None  # per (target, sweep point); DEFAULT_DURATION_S unless ``requests`` is given
    requests: int | None = None  # per (target, sweep point), instead of a duration
    warmup_requests: int = 20  # per (target, sweep point), sent before measuring, never counted
    repeats: int = 1  # measured rounds per (target, sweep point), interleaved between targets: A B A B ...
    images_per_request: int = 1
    timeout_s: float = 10.0  # per request
    processes: int | None = None  # worker processes; None: enough for the load, at most the CPU count
    rest_format: RestFormat = "json"
    model_version: int | None = None  # None: the server's latest
    distinct_images: int = 1000  # how many MNIST test images the payload cycles through
    data_dir: Path | None = None  # MNIST files; None: as mnist_client.mnist_data resolves them (may download)
    labels: dict[str, str] = field(default_factory=dict)  # free-form tags copied into the report
    security: Security = field(default_factory=Security)  # TLS files and the bearer token (security.py)

    def __post_init__(self) -> None:
        # Normalise sequences given as lists so the config stays hashable/serialisable.
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "concurrency", tuple(self.concurrency))
        object.__setattr__(self, "rates", tuple(self.rates))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.duration_s is None and self.requests is None:
            object.__setattr__(self, "duration_s", DEFAULT_DURATION_S)
        self._validate()

    def _validate(self) -> None:
        if not self.targets:
            raise ConfigError("no target given; expected at least one REST or gRPC target")
        if not isinstance(self.security, Security):
            raise ConfigError(f"security must be a Security instance; got {self.security!r}")
        if self.security.insecure and any(t.tls and t.protocol == "grpc" for t in self.targets):
            raise ConfigError("insecure (skip verifying the server) applies to https targets only; "
                              "gRPC over TLS always verifies: give the server's CA with ca_file instead")
        for target in self.targets:
            if not isinstance(target, Target):
                raise ConfigError(f"targets must be Target instances (see parse_target); got {target!r}")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"target names {names} repeat; give each target its own NAME= prefix")
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}; expected one of {MODES}")
        if self.mode == "closed":
            if not self.concurrency:
                raise ConfigError("closed loop needs at least one concurrency; got an empty list")
            for value in self.concurrency:
                _check_int("concurrency", value, 1, MAX_IN_FLIGHT_LIMIT)
        else:
            if not self.rates:
                raise ConfigError("open loop needs at least one rate (requests per second); got none")
            for rate in self.rates:
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
                    raise ConfigError(f"rate {rate!r}: expected a finite number of requests per second > 0")
            _check_int("max_in_flight", self.max_in_flight, 1, MAX_IN_FLIGHT_LIMIT)
        if self.duration_s is not None and self.requests is not None:
            raise ConfigError(
                f"give either duration_s or requests, not both (got duration_s={self.duration_s!r}, "
                f"requests={self.requests!r})"
            )
        if self.duration_s is not None:
            if not _is_number(self.duration_s) or not self.duration_s > 0:
                raise ConfigError(f"duration_s {self.duration_s!r}: expected a number of seconds > 0")
        if self.requests is not None:
            _check_int("requests", self.requests, 1, None)
        _check_int("warmup_requests", self.warmup_requests, 0, None)
        _check_int("repeats", self.repeats, 1, MAX_REPEATS)
        _check_int("images_per_request", self.images_per_request, 1, MNIST_TEST_IMAGES)
        if not _is_number(self.timeout_s) or not self.timeout_s > 0:
            raise ConfigError(f"timeout_s {self.timeout_s!r}: expected a number of seconds > 0")
        if self.processes is not None:
            _check_int("processes", self.processes, 1, MAX_PROCESSES)
        if self.rest_format not in REST_FORMATS:
            raise ConfigError(f"rest_format {self.rest_format!r}; expected one of {REST_FORMATS}")
        if self.model_version is not None:
            _check_int("model_version", self.model_version, 1, None)
        _check_int("distinct_images", self.distinct_images, 1, MNIST_TEST_IMAGES)
        if self.distinct_images < self.images_per_request:
            raise ConfigError(
                f"distinct_images {self.distinct_images} is smaller than images_per_request "
                f"{self.images_per_request}; expected distinct_images >= images_per_request"
            )

    @property
    def points(self) -> tuple[float, ...]:
        """The sweep: concurrencies (closed loop) or rates (open loop), in the order given."""
        return tuple(self.concurrency) if self.mode == "closed" else tuple(float(r) for r in self.rates)

    def in_flight(self, point: float) -> int:
        """The most requests outstanding at one sweep point."""
        return int(point) if self.mode == "closed" else self.max_in_flight

    def worker_processes(self, point: float) -> int:
        """How many worker processes carry one sweep point."""
        if self.processes is not None:
            return min(self.processes, self.in_flight(point))
        # One process keeps about 8 connections, or about 1,500 arrivals/s, busy without being the
        # bottleneck (bench/loadtester_vs_wrk.py); more processes than CPUs only contend.
        needed = math.ceil(point / 8) if self.mode == "closed" else math.ceil(point / 1500)
        return max(1, min(usable_cpus(), needed, self.in_flight(point)))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = [asdict(t) for t in self.targets]
        data["concurrency"] = list(self.concurrency)
        data["rates"] = list(self.rates)
        data["data_dir"] = str(self.data_dir) if self.data_dir is not None else None
        data["security"] = self.security.to_dict()  # never the token itself
        data["model_name"] = contract.MODEL_NAME
        return data


@dataclass(frozen=True)
class Thresholds:
    """Limits that fail a run (non-zero exit status) when any (target, sweep point) passes them."""

    max_p50_ms: float | None = None
    max_p99_ms: float | None = None
    max_error_rate: float | None = None  # errors / requests, 0..1
    min_accuracy: float | None = None  # served accuracy, 0..1
    min_agreement: float | None = None  # share of images both servers classified alike, 0..1
    min_throughput_rps: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_p50_ms", "max_p99_ms", "min_throughput_rps"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ConfigError(f"{name} {value!r}: expected a number >= 0")
        for name in ("max_error_rate", "min_accuracy", "min_agreement"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 <= value <= 1):
                raise ConfigError(f"{name} {value!r}: expected a fraction between 0 and 1")

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} {value!r}: expected an integer")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{name} {value}: expected an integer {bound}")


def parse_list(text: str, kind: type, name: str) -> tuple:
    """``"1,4,16"`` -> ``(1, 4, 16)`` for the CLI's sweep flags, with a clear error on bad items."""
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        raise ConfigError(f"{name} {text!r}: expected a comma-separated list such as 1,4,16")
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ConfigError(f"{name} {text!r}: expected a comma-separated list of {kind.__name__}s") from None


def default_targets(protocols: Sequence[str]) -> tuple[Target, ...]:
    """Targets on the stack's default local ports (REST 8080, gRPC 8500)."""
    addresses = {"rest": f"http://127.0.0.1:{contract.REST_PORT}", "grpc": f"127.0.0.1:{contract.TFS_GRPC_PORT}"}
    return tuple(Target(name=p, protocol=p, address=addresses[p]) for p in protocols)  # type: ignore[arg-type]
