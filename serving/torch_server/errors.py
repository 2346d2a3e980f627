"""The API's errors: every caller mistake is an ``ApiError`` answered as ``{"error": "..."}``.

Decoders and views raise the subclass that names the HTTP status; the app turns
it into a JSON response in one place (``app._api_error``). Messages say what was
wrong and what was expected.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses; ``status`` is the HTTP status code."""

    status = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="mnist"'})


class NotFound(ApiError):
    status = 404


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class ServiceUnavailable(ApiError):
    status = 503
