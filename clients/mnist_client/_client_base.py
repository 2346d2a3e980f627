"""What the REST and the gRPC client share: the default call timeout, closing, ``with``, waiting until ready."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TypeVar

from mnist_client._checks import positive_seconds, wait_until_ready


_Client = TypeVar("_Client", bound="ClientBase")  # typing.Self needs Python 3.11; the package supports 3.10


class ClientBase(ABC):
    """A client's lifecycle. Subclasses answer :meth:`ready` and free their transport in :meth:`_release`."""

    def __init__(self, timeout: float) -> None:
        self._timeout = positive_seconds("timeout", timeout)
        self._lock = threading.Lock()
        self._closed = False

    @abstractmethod
    def ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server can predict now; never raises for an unreachable or unready server."""

    def wait_until_ready(self, timeout: float = 60.0, *, poll_interval: float = 0.1) -> None:
        """Block until :meth:`ready` is true; raise :class:`DeadlineExceededError` after ``timeout`` s."""
        wait_until_ready(self.ready, repr(self), timeout, poll_interval, self._timeout)

    def close(self) -> None:
        """Free the transport (pooled connections, channel); calls after this fail. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    @abstractmethod
    def _release(self) -> None:
        """Close the transport (called once, by :meth:`close`)."""

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call_timeout(self, timeout: float | None) -> float:
        """The timeout of one call: the one given, else the client's default."""
        return self._timeout if timeout is None else positive_seconds("timeout", timeout)
