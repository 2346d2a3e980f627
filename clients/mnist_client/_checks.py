"""Argument checks and the readiness wait shared by the REST and gRPC clients."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from mnist_client.errors import ClientConfigError, DeadlineExceededError


def positive_seconds(name: str, value: Any) -> float:
    """``value`` as float seconds; :class:`ClientConfigError` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ClientConfigError(f"{name} is {value!r}; expected a finite number of seconds > 0")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClientConfigError(f"{name} is {value!r}; expected an integer >= 1")
    return value


def check_model(model_name: Any, model_version: Any) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise ClientConfigError(f"model_name is {model_name!r}; expected a non-empty string")
    if model_version is not None and (
        isinstance(model_version, bool) or not isinstance(model_version, int) or model_version < 1
    ):
        raise ClientConfigError(f"model_version is {model_version!r}; expected a positive integer or None")


def wait_until_ready(
    ready: Callable[..., bool], description: str, timeout: float, poll_interval: float, per_call_timeout: float
) -> None:
    """Poll ``ready(timeout=...)`` with capped exponential backoff until true, or raise after ``timeout`` s."""
    positive_seconds("timeout", timeout)
    positive_seconds("poll_interval", poll_interval)
    deadline = time.monotonic() + timeout
    pause = poll_interval
    while True:
        remaining = deadline - time.monotonic()
        if ready(timeout=max(min(remaining, per_call_timeout), 1e-3)):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(f"{description} was not ready within {timeout:g} s")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 1.0)
