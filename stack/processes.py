"""Child processes of the local stack: start, wait for readiness, stop cleanly.

Each server runs as its own process group with its output in a log file, so a
failure can be reported with the tail of that log instead of a traceback, and
so that stopping it (SIGTERM, then SIGKILL after a grace period) also reaches
gunicorn's workers.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """Something the user can fix: a port taken, no models, a server that never became ready."""


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Raise StackError naming the service if ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StackError(
                    f"port {port} on {host} is already in use, so the {what} cannot start; "
                    f"stop whatever listens there or choose another port (see the README's environment variables)"
                ) from None
            raise StackError(f"cannot bind {host}:{port} for the {what}: {exc}") from None


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One server process with its log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str | None] | None = None
    ) -> None:
        """``env`` is added to this process's environment; a ``None`` value removes that variable."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        merged: dict[str, str | None] = {**os.environ, **(env or {})}
        self.env = {key: value for key, value in merged.items() if value is not None}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
        log.info("starting %s: %s (log: %s)", self.name, " ".join(self.argv), self.log_path)
        self._proc = subprocess.Popen(
            self.argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # own process group: Ctrl-C in the terminal doesn't hit it twice
        )
        log_file.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def pids(self) -> tuple[int, ...]:
        """The processes that make up this server (its children are theirs): here, the one started."""
        return (self._proc.pid,) if self._proc else ()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def send_signal(self, signum: int) -> None:
        """Signal the process itself (not its group): gunicorn's master, say, which then stops its workers."""
        if self._proc is None:
            raise StackError(f"{self.name} was never started")
        self._proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the process to exit and return its status (subprocess.TimeoutExpired
        if it is still running then)."""
        if self._proc is None:
            raise StackError(f"{self.name} was never started")
        return self._proc.wait(timeout_s)

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float) -> float:
        """Poll ``probe`` until it returns True; return the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                code = self._proc.returncode if self._proc else None
                raise StackError(
                    f"{self.name} exited with status {code} before becoming ready; last lines of "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                if probe():
                    return time.monotonic() - started
            except Exception as exc:  # a probe failing just means "not yet"
                log.debug("%s not ready yet: %s", self.name, exc)
            time.sleep(0.2)
        raise StackError(
            f"{self.name} did not become ready within {timeout_s:.0f} s; last lines of {self.log_path}:\n"
            f"{tail(self.log_path)}"
        )

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the process group, wait up to ``grace_s``, then SIGKILL. Returns the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            log.info("stopping %s (pid %d)", self.name, self._proc.pid)
        return stop_process(self._proc, grace_s, group=True, name=self.name)


def stop_process(
    process: subprocess.Popen[Any], grace_s: float = 30.0, *, group: bool = False, name: str | None = None
) -> int:
    """SIGTERM ``process`` if it still runs, wait up to ``grace_s``, then SIGKILL; return its exit status.

    ``group=True`` signals its whole process group (a child started with ``start_new_session``), so that
    gunicorn's workers get the signal too.
    """

    def send(signum: int) -> None:
        try:
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
        except ProcessLookupError:  # exited between the poll and the signal
            pass

    if process.poll() is None:
        send(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name or f"pid {process.pid}", grace_s)
            send(signal.SIGKILL)
            process.wait()
    return process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
