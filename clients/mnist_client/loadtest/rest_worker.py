"""The REST call loop: HTTP/1.1 over non-blocking sockets and one poller, in the manner of wrk.

A general HTTP client costs tens of microseconds of Python per request in header handling and
object churn; on a machine shared with the server that is load the tester steals from the server.
This loop instead sends request bytes encoded once (:mod:`mnist_client.loadtest.payload`), keeps one
state record per connection, and parses only what it must: the status line, ``Content-Length`` /
``Transfer-Encoding: chunked`` and ``Connection``. Connections are kept alive where the server allows
(TF Serving's REST API, gunicorn's threaded workers); gunicorn's sync workers close every connection,
so then each request opens a new one, as it would for any client, and the connect time is part of its
latency. A kept-alive connection that the server closed while idle is reopened transparently.

Over https (``ssl_context``) a new connection is set up, TCP connect and TLS handshake, before the
loop goes on (a millisecond or so on a local network, counted in that request's latency); servers
behind nginx keep connections alive, so that happens about once per connection slot.

Answers are decoded on a fast path for the row form every server here sends, and otherwise by the
client library (:mod:`mnist_client.rest`), which also translates every HTTP error status, so error
kinds and codes are the ones applications see.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import ssl
import time
from collections.abc import Callable

import numpy as np

from mnist_client.contract import CLASSES_NAME, NUM_CLASSES
from mnist_client.errors import DeadlineExceededError, MnistClientError, ProtocolError, UnavailableError
from mnist_client.loadtest.pacer import Pacer
from mnist_client.loadtest.records import RecordSink
from mnist_client.rest import error_from_response, parse_prediction

_IN = select.POLLIN
_OUT = select.POLLOUT
_RECV_BYTES = 1 << 18
_TIMEOUT_CHECK_NS = 5_000_000  # scan for expired requests at most this often
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # Linux: create sockets non-blocking in one call

# Connection states.
_CONNECTING, _SENDING, _READING, _IDLE = range(4)


class _Poller:
    """epoll where the platform has it, else poll; timeouts in seconds."""

    def __init__(self) -> None:
        if hasattr(select, "epoll"):
            self._poller = select.epoll()
            self._scale = 1.0
            # Closing a socket removes it from an epoll set: no unregister call needed per request.
            self.unregister_on_close = False
        else:  # pragma: no cover - macOS and BSDs
            self._poller = select.poll()
            self._scale = 1000.0
            self.unregister_on_close = True
        self.register = self._poller.register
        self.modify = self._poller.modify
        self.unregister = self._poller.unregister

    def poll(self, timeout_s: float) -> list[tuple[int, int]]:
        return self._poller.poll(max(0.0, timeout_s) * self._scale)

    def close(self) -> None:
        close = getattr(self._poller, "close", None)
        if close is not None:
            close()


class _Conn:
    __slots__ = (
        "sock", "fd", "state", "mask", "buf", "payload", "request", "sent", "intended_ns", "deadline_ns",
        "reused", "head_end", "status", "length", "chunked", "close_after",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = _CONNECTING
        self.mask = 0  # events registered with the poller (0: not registered)
        self.buf = bytearray()
        self.payload = 0
        self.request = b""
        self.sent = 0
        self.intended_ns = 0
        self.deadline_ns = 0
        self.reused = False
        self.head_end = -1
        self.status = 0
        self.length = -1  # body length; -1: until the server closes
        self.chunked = False
        self.close_after = False


def build_request(
    host: str, port: int, path: str, content_type: str, body: bytes, authorization: str | None = None
) -> bytes:
    """One complete HTTP/1.1 POST, head and body, ready to send as is (``authorization``: the header's value)."""
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: mnist-loadtest\r\n{auth}"
        f"Accept: application/json\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _dechunk(data: bytes | bytearray) -> bytes | None:
    """The body of a complete chunked message, or ``None`` while chunks are still missing."""
    out = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size_text = bytes(data[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"malformed chunk size {size_text[:20]!r} in a chunked answer") from None
        start = line_end + 2
        if size == 0:
            # The last chunk, then optional trailers, then an empty line.
            return bytes(out) if data.find(b"\r\n\r\n", line_end) >= 0 else None
        if len(data) < start + size + 2:
            return None
        out += data[start : start + size]
        pos = start + size + 2


class HttpEngine:
    """Runs one phase of REST load: requests from a pacer, over up to ``slots`` connections."""

    def __init__(
        self,
        host: str,
        port: int,
        requests: list[bytes],
        batch_sizes: list[int],
        timeout_s: float,
        what: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        self._host = host
        self._ssl_context = ssl_context
        if not info:  # pragma: no cover - getaddrinfo raises instead
            raise OSError(f"{host}:{port} resolves to no address")
        self._family, _, _, _, self._address = info[0]
        self._requests = requests
        self._batch_sizes = batch_sizes
        self._timeout_ns = int(timeout_s * 1e9)
        self._timeout_s = timeout_s
        self._sink: RecordSink | None = None  # the current phase's, set by run()
        self._what = what  # "POST http://host:port/path", for error messages

    def run(
        self,
        pacer: Pacer,
        slots: int,
        first_payload: int,
        sink: RecordSink,
        *,
        record_lag: bool,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run until the pacer is done and every request answered or failed; returns the last finish time (ns)."""
        poller = _Poller()
        self._sink = sink
        conns: dict[int, _Conn] = {}  # fd -> connection with a request in flight (or connecting)
        idle: list[_Conn] = []  # kept-alive connections without a request
        n_payloads = len(self._requests)
        next_payload = first_payload % n_payloads
        last_end = time.monotonic_ns()
        next_timeout_check = last_end + _TIMEOUT_CHECK_NS
        monotonic_ns = time.monotonic_ns
        stopping = False  # asked to stop: send nothing more, let the requests in flight finish
        try:
            while True:
                now = monotonic_ns()
                # Start every request that is due while a slot is free.
                while not stopping and len(conns) < slots:
                    intended = pacer.take(now)
                    if intended is None:
                        break
                    if record_lag:
                        sink.lag((now - intended) // 1000)
                    conn = self._start(poller, idle, next_payload, intended, now)
                    next_payload = next_payload + 1 if next_payload + 1 < n_payloads else 0
                    if conn is not None:
                        conns[conn.fd] = conn
                    else:
                        last_end = now
                if not conns:
                    next_due = None if stopping else pacer.next_due_ns(now)
                    if next_due is None:
                        break
                    wait_s = (next_due - now) / 1e9
                else:
                    next_due = pacer.next_due_ns(now) if len(conns) < slots and not stopping else None
                    wait_s = min(
                        (next_due - now) / 1e9 if next_due is not None else 1.0,
                        (next_timeout_check - now) / 1e9,
                    )
                if now >= sink.next_flush_ns:
                    sink.flush(now)
                    stopping = stopping or should_stop()
                    wait_s = min(wait_s, 0.1)
                events = poller.poll(wait_s) if wait_s > 0 else poller.poll(0)
                for fd, event in events:
                    conn = conns.get(fd)
                    if conn is None:
                        self._idle_event(poller, idle, fd)
                        continue
                    if event & _OUT and conn.state in (_CONNECTING, _SENDING):
                        finished = self._send(poller, conn)
                    else:
                        finished = self._on_readable(poller, conn)
                    if finished:
                        del conns[fd]
                        last_end = monotonic_ns()
                        if not conn.close_after and conn.state == _IDLE:
                            idle.append(conn)
                    elif conn.fd != fd:  # reconnected after a stale kept-alive connection
                        del conns[fd]
                        conns[conn.fd] = conn
                now = monotonic_ns()
                if now >= next_timeout_check:
                    next_timeout_check = now + _TIMEOUT_CHECK_NS
                    for fd in [fd for fd, c in conns.items() if c.deadline_ns <= now]:
                        conn = conns.pop(fd)
                        self._fail(poller, conn, DeadlineExceededError(
                            f"{self._what}: no response within {self._timeout_s:.3g} s"))
                        last_end = now
        finally:
            for conn in list(conns.values()) + idle:
                self._close(poller, conn)
            poller.close()
            sink.flush(monotonic_ns())
        return last_end

    # -- connection handling -----------------------------------------------------------------------

    def _start(self, poller: _Poller, idle: list[_Conn], payload: int, intended: int, now: int) -> _Conn | None:
        """Send a request on an idle kept-alive connection or a new one; None if it failed at once (recorded)."""
        request = self._requests[payload]
        conn = None
        while idle:
            candidate = idle.pop()
            if candidate.state == _IDLE:  # skip ones the server closed meanwhile
                conn = candidate
                conn.reused = True
                conn.state = _SENDING
                break
        if conn is None:
            try:
                conn = self._connect()
            except OSError as exc:
                self._sink.error(*_kind_code_message(UnavailableError(
                    f"{self._what}: could not connect ({_reason(exc)})", request_sent=False)))
                return None
        self._arm(conn, payload, request, intended, now)
        # Send at once, even on a connection still being set up: on a local network the handshake is
        # usually done by now, which saves a wake-up and two system calls per request. If it is not,
        # send() says so and the poller reports when the socket becomes writable.
        if self._send(poller, conn):
            return None
        return conn

    def _connect(self) -> _Conn:
        if self._ssl_context is not None:
            return self._connect_tls()
        sock = socket.socket(self._family, socket.SOCK_STREAM | _NONBLOCK)
        try:
            if not _NONBLOCK:  # pragma: no cover - not Linux
                sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(self._address)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(err, errno.errorcode.get(err, str(err)))
        except OSError:
            sock.close()
            raise
        return _Conn(sock)

    def _connect_tls(self) -> _Conn:
        """Connect and finish the TLS handshake (blocking, within the request timeout), then go non-blocking."""
        sock = socket.create_connection(self._address[:2], timeout=self._timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._ssl_context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[union-attr]
        except (OSError, ValueError) as exc:
            sock.close()
            raise OSError(f"TLS handshake with {self._host} failed: {_tls_reason(exc)}") from None
        tls.setblocking(False)
        conn = _Conn(tls)
        conn.state = _SENDING
        return conn

    def _arm(self, conn: _Conn, payload: int, request: bytes, intended: int, now: int) -> None:
        conn.payload = payload
        conn.request = request
        conn.sent = 0
        conn.intended_ns = intended
        conn.deadline_ns = now + self._timeout_ns
        conn.buf = bytearray()
        conn.head_end = -1
        conn.length = -1
        conn.chunked = False
        conn.close_after = False

    @staticmethod
    def _want(poller: _Poller, conn: _Conn, mask: int) -> None:
        if conn.mask != mask:
            if conn.mask:
                poller.modify(conn.fd, mask)
            else:
                poller.register(conn.fd, mask)
            conn.mask = mask

    def _send(self, poller: _Poller, conn: _Conn) -> bool:
        """Send what is left of the request; True if the request failed (and was recorded)."""
        try:
            if conn.sent:
                conn.sent += conn.sock.send(memoryview(conn.request)[conn.sent :])
            else:
                conn.sent = conn.sock.send(conn.request)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self._want(poller, conn, _OUT)
            return False
        except OSError as exc:
            if exc.errno == errno.ENOTCONN and conn.state == _CONNECTING:  # handshake still under way
                self._want(poller, conn, _OUT)
                return False
            return self._broken(poller, conn, exc)
        if conn.sent >= len(conn.request):
            conn.state = _READING
            self._want(poller, conn, _IN)
        else:
            conn.state = _SENDING
            self._want(poller, conn, _OUT)
        return False

    def _on_readable(self, poller: _Poller, conn: _Conn) -> bool:
        """Read what arrived; True when the request is finished (answered or failed)."""
        try:
            data = conn.sock.recv(_RECV_BYTES)
            if self._ssl_context is not None:
                while data and conn.sock.pending():  # decrypted bytes the poller cannot see
                    data += conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            data = b""  # the peer closed the TLS session: an end of stream
        except OSError as exc:
            return self._broken(poller, conn, exc)
        if not data:
            if conn.state == _READING and conn.head_end >= 0 and conn.length < 0 and not conn.chunked:
                conn.close_after = True  # body framed by the close itself
                return self._complete(poller, conn, bytes(conn.buf[conn.head_end :]))
            return self._broken(poller, conn, None)
        buf = conn.buf
        buf += data
        if conn.head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            try:
                self._parse_head(conn, bytes(buf[:end]))
            except ProtocolError as exc:
                self._fail(poller, conn, exc)
                return True
            conn.head_end = end + 4
        if conn.chunked:
            try:
                body = _dechunk(memoryview(buf)[conn.head_end :].tobytes())
            except ProtocolError as exc:
                self._fail(poller, conn, exc)
                return True
            if body is None:
                return False
            return self._complete(poller, conn, body)
        if conn.length >= 0 and len(buf) - conn.head_end >= conn.length:
            return self._complete(poller, conn, bytes(buf[conn.head_end : conn.head_end + conn.length]))
        return False

    def _parse_head(self, conn: _Conn, head: bytes) -> None:
        if head[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and head[9:12].isdigit():
            conn.status = int(head[9:12])
            http10 = head[5:8] == b"1.0"
        else:
            line_end = head.find(b"\r\n")
            status_line = head if line_end < 0 else head[:line_end]
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise ProtocolError(f"{self._what}: not an HTTP response (status line {status_line[:60]!r})")
            conn.status = int(parts[1])
            http10 = parts[0] == b"HTTP/1.0"
        lowered = head.lower()  # header names are case-insensitive
        length = _header(head, lowered, b"\r\ncontent-length:")
        if length is not None:
            if not length.isdigit():
                raise ProtocolError(f"{self._what}: bad Content-Length {length[:20]!r}")
            conn.length = int(length)
        encoding = _header(head, lowered, b"\r\ntransfer-encoding:")
        if encoding is not None and b"chunked" in encoding.lower():
            conn.chunked = True
            conn.length = -1
        connection = _header(head, lowered, b"\r\nconnection:")
        conn.close_after = http10 if connection is None else b"close" in connection.lower()
        if conn.status in (204, 304) or 100 <= conn.status < 200:
            conn.length = 0

    def _complete(self, poller: _Poller, conn: _Conn, body: bytes) -> bool:
        now = time.monotonic_ns()
        latency_us = (now - conn.intended_ns) // 1000
        status = conn.status
        if conn.close_after:
            self._close(poller, conn)
        else:
            conn.state = _IDLE
        if 200 <= status < 300:
            try:
                classes = _classes(body, self._batch_sizes[conn.payload])
            except MnistClientError as exc:
                self._sink.error(*_kind_code_message(exc))
                return True
            self._sink.ok(conn.payload, latency_us, classes)
        else:
            self._sink.error(*_kind_code_message(error_from_response(status, body, self._what)))
        return True

    def _broken(self, poller: _Poller, conn: _Conn, exc: OSError | None) -> bool:
        """The connection failed mid-request; reopen once if it was a stale kept-alive one."""
        if conn.reused and not conn.buf and conn.state in (_SENDING, _READING):
            self._close(poller, conn)
            try:
                fresh = self._connect()
            except OSError as error:
                self._sink.error(*_kind_code_message(UnavailableError(
                    f"{self._what}: could not connect ({_reason(error)})", request_sent=False)))
                conn.close_after = True
                return True
            # The run loop keys connections by fd and notices the new one.
            conn.sock, conn.fd, conn.state, conn.mask, conn.reused = fresh.sock, fresh.fd, _CONNECTING, 0, False
            conn.sent, conn.buf, conn.head_end, conn.length, conn.chunked = 0, bytearray(), -1, -1, False
            return self._send(poller, conn)
        if conn.state == _CONNECTING:
            error = UnavailableError(f"{self._what}: could not connect ({_reason(exc)})", request_sent=False)
        else:
            reason = "closed by the server" if exc is None else _reason(exc)
            error = UnavailableError(f"{self._what}: connection {reason} before the response was complete")
        self._fail(poller, conn, error)
        return True

    def _idle_event(self, poller: _Poller, idle: list[_Conn], fd: int) -> None:
        """Activity on an idle kept-alive connection: the server closed it (or sent junk); drop it."""
        for i, conn in enumerate(idle):
            if conn.fd == fd:
                del idle[i]
                conn.state = -1
                self._close(poller, conn)
                return

    def _fail(self, poller: _Poller, conn: _Conn, error: MnistClientError) -> None:
        self._close(poller, conn)
        conn.close_after = True
        self._sink.error(*_kind_code_message(error))

    @staticmethod
    def _close(poller: _Poller, conn: _Conn) -> None:
        if conn.fd >= 0:
            if conn.mask and poller.unregister_on_close:
                poller.unregister(conn.fd)
            conn.sock.close()
            conn.fd = -1
            conn.mask = 0
        conn.close_after = True


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message}); give the server's CA with --ca-file"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


def _reason(exc: OSError | None) -> str:
    if exc is None:
        return "closed"
    if exc.errno is None:  # a message of ours (TLS), not a system error
        return str(exc)
    name = errno.errorcode.get(exc.errno or 0)
    return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc) or type(exc).__name__


def _header(head: bytes, lowered: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case, as ``b"\\r\\nname:"``) in ``head``, or None."""
    pos = lowered.find(name)
    if pos < 0:
        return None
    end = head.find(b"\r\n", pos + 2)
    return head[pos + len(name) : end if end >= 0 else len(head)].strip()


def _classes(body: bytes, batch_size: int) -> bytes:
    """The predicted class of each image, one byte each.

    Fast path for the row form every server here answers with (``{"predictions": [{"classes": k, ...}]}``);
    anything else goes through the client's own decoder, which accepts the column form too and raises
    :class:`ProtocolError` naming what is wrong with a malformed answer.
    """
    try:
        rows = json.loads(body)["predictions"]
        if len(rows) == batch_size:
            classes = bytes([row[CLASSES_NAME] for row in rows])
            if max(classes) < NUM_CLASSES:
                return classes
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    return parse_prediction(body, batch_size, None).classes.astype(np.uint8).tobytes()


def _kind_code_message(error: MnistClientError) -> tuple[str, str, str]:
    return error.kind, error.code, str(error)
