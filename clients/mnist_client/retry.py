"""Retries of what is safe to retry: exponential backoff with full jitter, under one overall deadline.

What the clients retry (and nothing else):

- readiness, metadata and model-status probes: they change nothing on the server, so any
  :class:`~mnist_client.errors.UnavailableError` or :class:`~mnist_client.errors.DeadlineExceededError`
  is retried;
- a predict only when the request provably never left the client (``UnavailableError.request_sent`` is
  False: connection refused, DNS failure, no connected gRPC backend). A predict that may have reached a
  server (a timeout, a reset connection, a 503 answer) is never retried: it may have run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mnist_client.errors import ClientConfigError, DeadlineExceededError, UnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how fast to retry.

    ``max_attempts`` counts the first call (1 disables retries). Before attempt k+1 the client sleeps a
    random time in ``[0, min(max_backoff, initial_backoff * multiplier**(k-1))]`` ("full jitter", so that
    many clients do not retry in lockstep). No attempt starts after the call's overall deadline.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ClientConfigError(f"max_attempts is {self.max_attempts!r}; expected an integer >= 1")
        if not self.initial_backoff > 0 or not self.max_backoff >= self.initial_backoff:
            raise ClientConfigError(
                f"backoff is initial={self.initial_backoff!r}, max={self.max_backoff!r}; "
                "expected 0 < initial_backoff <= max_backoff"
            )
        if not self.multiplier >= 1:
            raise ClientConfigError(f"multiplier is {self.multiplier!r}; expected a number >= 1")

    def backoff_ceiling(self, retry_number: int) -> float:
        """The longest sleep before retry ``retry_number`` (1 = the first retry)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))


NO_RETRIES = RetryPolicy(max_attempts=1)


def is_retryable_probe(error: BaseException) -> bool:
    """Readiness/metadata/status probes change nothing: retry any transient failure."""
    return isinstance(error, (UnavailableError, DeadlineExceededError))


def is_retryable_predict(error: BaseException) -> bool:
    """A predict is retried only when the request provably never left the client."""
    return isinstance(error, UnavailableError) and not error.request_sent


def call_with_retries(
    attempt: Callable[[float], T],
    *,
    policy: RetryPolicy,
    timeout: float,
    retryable: Callable[[BaseException], bool],
    description: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> T:
    """Call ``attempt(remaining_seconds)`` until it succeeds, fails for good, or ``timeout`` runs out.

    Each attempt gets the time left until the overall deadline as its own timeout. The last error is
    raised unchanged when it is not retryable, when attempts are used up, or when the next backoff would
    end past the deadline.
    """
    deadline = clock() + timeout
    attempt_number = 1
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise DeadlineExceededError(f"{description}: no time left for attempt {attempt_number} of {timeout:g} s")
        try:
            return attempt(remaining)
        except Exception as error:
            if attempt_number >= policy.max_attempts or not retryable(error):
                raise
            pause = rng() * policy.backoff_ceiling(attempt_number)
            if clock() + pause >= deadline:
                raise
            logger.debug(
                "%s: attempt %d failed (%s: %s); retrying in %.3f s",
                description,
                attempt_number,
                type(error).__name__,
                error,
                pause,
            )
            sleep(pause)
            attempt_number += 1
