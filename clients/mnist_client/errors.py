"""The client's exception tree: every error the REST and gRPC clients raise.

::

    MnistClientError                 base class; catch this to catch everything below
    ├── ClientConfigError            bad constructor argument (URL, timeout, TLS files...); also a ValueError
    ├── InvalidInputError            images rejected before anything was sent; also a ValueError
    ├── ServerError                  the server answered with an error (a 4xx/5xx status or a gRPC code)
    ├── DeadlineExceededError        no answer within the timeout (client or server side); also a TimeoutError
    ├── UnavailableError             could not reach the server, or it is not serving now; also a ConnectionError
    └── ProtocolError                the server answered 2xx/OK with a body that is not a valid response

Every instance carries:

- ``code``: the canonical gRPC status name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``, ``"UNAVAILABLE"``...),
  for REST errors too (mapped from the HTTP status the way TensorFlow Serving maps them), so that callers
  and the load tester can group errors of both protocols by one key;
- ``status``: the HTTP status for REST responses, else ``None``;
- ``server_message``: the message the server sent (REST ``{"error": ...}`` body or gRPC details), if any;
- ``kind``: a short stable label of the class (``"invalid_input"``, ``"server_error"``...).

``UnavailableError.request_sent`` is ``False`` only when the request provably never left the client
(connection refused, DNS failure, no connected backend); only those are safe to retry for a predict.

Transport exceptions are translated in exactly one place per transport: ``mnist_client._http`` for the
REST transport's socket and TLS errors, ``rest.error_from_response`` for HTTP statuses,
``grpc_client.translate_rpc_error`` for ``grpc.RpcError``.
"""

from __future__ import annotations

from typing import Final

# HTTP status -> canonical gRPC code name (TensorFlow Serving's mapping, inverted where ambiguous).
_HTTP_STATUS_TO_CODE: Final[dict[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    411: "INVALID_ARGUMENT",
    412: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def code_for_http_status(status: int) -> str:
    """The canonical gRPC code name for an HTTP error status (``"UNKNOWN"`` if it has none)."""
    if status in _HTTP_STATUS_TO_CODE:
        return _HTTP_STATUS_TO_CODE[status]
    if 400 <= status < 500:
        return "FAILED_PRECONDITION"
    if 500 <= status < 600:
        return "INTERNAL"
    return "UNKNOWN"


class MnistClientError(Exception):
    """Base class of every error raised by :mod:`mnist_client`."""

    kind: str = "client_error"
    default_code: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status
        self.server_message = server_message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status!r})"


class ClientConfigError(MnistClientError, ValueError):
    """A client was constructed with an invalid argument (the message says which and what is accepted)."""

    kind = "config"
    default_code = "INVALID_ARGUMENT"


class InvalidInputError(MnistClientError, ValueError):
    """The images given to ``predict`` were rejected before anything was sent."""

    kind = "invalid_input"
    default_code = "INVALID_ARGUMENT"


class ServerError(MnistClientError):
    """The server answered with an error; ``status`` (REST) / ``code`` say which, ``server_message`` why."""

    kind = "server_error"
    default_code = "UNKNOWN"


class DeadlineExceededError(MnistClientError, TimeoutError):
    """No answer within the deadline; the request may or may not have run on the server."""

    kind = "deadline_exceeded"
    default_code = "DEADLINE_EXCEEDED"


class UnavailableError(MnistClientError, ConnectionError):
    """The server could not be reached, or answered that it cannot serve now (HTTP 502/503, gRPC UNAVAILABLE).

    ``request_sent`` is ``False`` only when the request provably never reached a server, which makes
    even a predict safe to retry.
    """

    kind = "unavailable"
    default_code = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        request_sent: bool = True,
        code: str | None = None,
        status: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status, server_message=server_message)
        self.request_sent = request_sent


class ProtocolError(MnistClientError):
    """The server reported success but its answer is not a valid prediction/metadata/status response."""

    kind = "protocol"
    default_code = "DATA_LOSS"


__all__ = [
    "ClientConfigError",
    "DeadlineExceededError",
    "InvalidInputError",
    "MnistClientError",
    "ProtocolError",
    "ServerError",
    "UnavailableError",
    "code_for_http_status",
]
