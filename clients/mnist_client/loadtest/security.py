"""TLS and the bearer token for the load tester: https and gRPC over TLS, mutual TLS, a token.

A target speaks TLS by its address: ``https://host:port`` (REST) or ``grpcs://host:port`` (gRPC).
The material below applies to every TLS target of a run:

- ``ca_file``: the PEM bundle that verifies the servers (default: the system's trust store);
- ``insecure``: https without verifying the server at all (a warning says so; not for gRPC);
- ``client_cert`` / ``client_key``: mutual TLS, both or neither;
- ``token``: sent as ``Authorization: Bearer <token>`` on every REST request and as ``authorization``
  metadata on every gRPC call. It never appears in a report, a log line or an error message.

The token comes from ``--token``, else ``--token-file`` (its first line), else the environment
variable ``MNIST_LOADTEST_TOKEN`` (:func:`resolve_token`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_client.loadtest.errors import ConfigError

TOKEN_ENV = "MNIST_LOADTEST_TOKEN"


@dataclass(frozen=True)
class Security:
    ca_file: Path | None = None
    insecure: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("ca_file", "client_cert", "client_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
                if not Path(value).is_file():
                    raise ConfigError(f"{name} {os.fspath(value)!r} is not a readable file; expected a PEM file")
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigError("client_cert and client_key go together (mutual TLS): give both or neither")
        if self.insecure and self.ca_file is not None:
            raise ConfigError("insecure skips verifying the server, so a ca_file would be ignored; give one of them")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ConfigError("the bearer token is empty or holds a line break; expected one line of text")

    @property
    def tls_material(self) -> bool:
        return self.ca_file is not None or self.insecure or self.client_cert is not None

    def ssl_context(self, server_hostname_check: bool = True) -> ssl.SSLContext:
        """The client context for https targets: verify with ``ca_file`` (or the system store) unless insecure."""
        context = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None and self.client_key is not None:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def grpc_credentials(self) -> Any:
        """``grpc.ssl_channel_credentials`` from the same files (gRPC cannot skip verification)."""
        import grpc

        def read(path: Path | None) -> bytes | None:
            return None if path is None else path.read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.client_key), read(self.client_cert))

    def authorization(self) -> str | None:
        return None if self.token is None else f"Bearer {self.token}"

    def to_dict(self) -> dict[str, Any]:
        """For the report: which files were used, whether a token was sent (never the token)."""
        return {
            "ca_file": None if self.ca_file is None else str(self.ca_file),
            "insecure": self.insecure,
            "client_cert": None if self.client_cert is None else str(self.client_cert),
            "token": "set" if self.token is not None else None,
        }


def resolve_token(option: str | None, token_file: str | os.PathLike[str] | None,
                  environ: Mapping[str, str] | None = None) -> str | None:
    """The token from the option, else the file's first line, else ``MNIST_LOADTEST_TOKEN``; None if none."""
    if option is not None:
        return option.strip()
    if token_file is not None:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"token file {os.fspath(token_file)!r}: cannot read it ({exc.strerror})") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"token file {os.fspath(token_file)!r} is empty; expected the token on its first line")
        return lines[0].strip()
    value = (os.environ if environ is None else environ).get(TOKEN_ENV)
    return value.strip() if value else None
