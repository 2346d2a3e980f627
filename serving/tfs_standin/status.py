"""The one error type of the stand-in: a gRPC status code and a message for the caller.

Codes follow TensorFlow Serving: INVALID_ARGUMENT for a malformed request,
NOT_FOUND for an unknown model or version, UNAVAILABLE while nothing is loaded
or the batch queue is full, FAILED_PRECONDITION for an unknown signature.
Messages say what was received and what was expected.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request failure to be returned to the caller as ``code`` with ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def deadline_exceeded(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def internal(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INTERNAL, message)


def status_code_number(code: grpc.StatusCode) -> int:
    """The numeric code (``tensorflow.error.Code`` uses the same numbers as gRPC)."""
    return int(code.value[0])


# Caller-supplied strings echoed in messages are cut to this length, and whole messages to
# MAX_MESSAGE_CHARS: the message travels as a gRPC trailer, and clients drop calls whose
# metadata exceeds 8 KiB (RESOURCE_EXHAUSTED instead of the real status).
MAX_ECHO_CHARS = 100
MAX_MESSAGE_CHARS = 2048


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` as sent by a caller, cut to ``limit`` characters for an error message."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def code_from_number(number: int) -> grpc.StatusCode:
    """The gRPC code for a ``tensorflow.error.Code`` number (UNKNOWN if there is none)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
