"""The REST client's HTTP/1.1 transport: kept-alive connections, one send per request, lean parsing.

Why not urllib3 (which the client used before): for one image, its layers (connection pool objects,
``http.client`` with the ``email`` header parser, header dicts copied per call) cost a few hundred
microseconds of Python per call, and it sends the request head and body in two ``send`` calls, so the
server wakes up twice. That was most of what an application paid above the load tester's own engine
(bench/client_cost.py). This transport does what the client needs and no more: HTTP/1.1 over TCP or
TLS (the standard library's ``ssl``), ``Content-Length`` and chunked bodies, keep-alive with a
check that an idle connection is still open before it is reused, a timeout on every socket operation.

Every failure is raised as a :mod:`mnist_client.errors` exception here, naming the call (``what``):
could not connect / connecting timed out / TLS failed (``request_sent=False``: the request never left),
no response within the timeout (:class:`DeadlineExceededError`), connection broken after sending
(``request_sent=True``: the server may have run it).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from dataclasses import dataclass

from mnist_client.errors import DeadlineExceededError, ProtocolError, UnavailableError

_MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this is not from a server we talk to
_RECV_BYTES = 256 * 1024


class Headers(dict):
    """Response headers by lower-case name; ``get`` and ``[]`` take any case."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


@dataclass(frozen=True)
class Response:
    status: int
    headers: Headers
    body: bytes


class _Broken(Exception):
    """The connection ended or failed after the request was (perhaps partly) sent."""


class HttpTransport:
    """Kept-alive HTTP/1.1 connections to one ``host:port``; thread-safe, one request per connection at a time.

    Up to ``maxsize`` idle connections are kept; more may be open at once while threads share the
    transport (the extra ones are closed when their request ends).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        default_headers: dict[str, str],
        maxsize: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._address = (host, port)
        self._ssl_context = ssl_context
        self._server_hostname = host
        self._maxsize = maxsize
        host_header = f"[{host}]" if ":" in host else host
        default_port = 443 if ssl_context is not None else 80
        if port != default_port:
            host_header = f"{host_header}:{port}"
        # Everything after the request line that is the same on every call, encoded once.
        lines = [f"Host: {host_header}"] + [f"{name}: {value}" for name, value in default_headers.items()]
        self._fixed_head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None,
        headers: dict[str, str] | None,
        timeout: float,
        connect_timeout: float,
        what: str,
    ) -> Response:
        """One exchange; raises the client error for any transport failure (never for an HTTP status)."""
        head = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), self._fixed_head]
        if headers:
            head.append("".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1"))
        if body is not None or method == "POST":
            head.append(b"Content-Length: %d\r\n" % (len(body) if body is not None else 0))
        head.append(b"\r\n")
        if body:
            head.append(body)
        message = b"".join(head)  # head and body in one send: one wake-up of the server, not two

        sock = self._checkout(connect_timeout, what)
        try:
            sock.settimeout(timeout)
            try:
                sock.sendall(message)
            except (BrokenPipeError, ConnectionResetError):
                # A server may answer before it has read the whole body (413: too large) and close: its
                # answer, if it arrived, says more than the broken send.
                response, _ = _read_response(sock, method)
                sock.close()
                return response
            response, reusable = _read_response(sock, method)
        except TimeoutError:
            sock.close()
            raise DeadlineExceededError(f"{what}: no response within {timeout:.3g} s") from None
        except ProtocolError as error:
            sock.close()
            raise ProtocolError(f"{what}: {error}") from None
        except ssl.SSLError as error:  # e.g. the server refused our client certificate after the handshake
            sock.close()
            raise UnavailableError(f"{what}: TLS failed ({_reason(error)})", request_sent=False) from error
        except (OSError, _Broken) as error:
            sock.close()
            raise UnavailableError(f"{what}: connection broken ({_reason(error)})", request_sent=True) from error
        except BaseException:
            sock.close()
            raise
        if reusable:
            self._checkin(sock)
        else:
            sock.close()
        return response

    def close(self) -> None:
        """Close the idle connections; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    # -- connections -------------------------------------------------------------------------------

    def _checkout(self, connect_timeout: float, what: str) -> socket.socket:
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self._connect(connect_timeout, what)
            if _still_open(sock):
                return sock
            sock.close()  # closed by the server while idle (keep-alive timeout): open a fresh one

    def _checkin(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._maxsize:
                self._idle.append(sock)
                return
        sock.close()

    def _connect(self, connect_timeout: float, what: str) -> socket.socket:
        try:
            sock = socket.create_connection(self._address, timeout=connect_timeout)
        except TimeoutError as error:
            raise UnavailableError(f"{what}: connecting timed out ({_reason(error)})", request_sent=False) from error
        except OSError as error:  # refused, unreachable, name not resolved
            raise UnavailableError(f"{what}: could not connect ({_reason(error)})", request_sent=False) from error
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._server_hostname)
        except TimeoutError as error:
            sock.close()
            raise UnavailableError(f"{what}: connecting timed out (TLS handshake)", request_sent=False) from error
        except (ssl.SSLError, ssl.CertificateError) as error:
            sock.close()
            raise UnavailableError(f"{what}: TLS failed ({_reason(error)})", request_sent=False) from error
        except OSError as error:
            sock.close()
            raise UnavailableError(f"{what}: could not connect ({_reason(error)})", request_sent=False) from error
        return sock


def _still_open(sock: socket.socket) -> bool:
    """An idle kept-alive connection is usable only if nothing arrived on it (a close, or stray bytes)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        readable, _, _ = select.select([sock], [], [], 0)  # pragma: no cover - Windows
        return not readable
    except (OSError, ValueError):
        return False


def _read_response(sock: socket.socket, method: str) -> tuple[Response, bool]:
    """Read one response; returns it and whether the connection may carry another request."""
    buf = bytearray()
    while True:  # skip interim 1xx answers
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > _MAX_HEAD_BYTES:
                raise ProtocolError(f"response head exceeds {_MAX_HEAD_BYTES} bytes; expected an HTTP server")
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                raise _Broken("closed by the server before the response" if not buf else "closed mid-response")
            buf += chunk
            end = buf.find(b"\r\n\r\n")
        status, version, headers = _parse_head(bytes(buf[:end]))
        del buf[: end + 4]
        if not (100 <= status < 200) or status == 101:
            break

    connection = (headers.get("connection") or "").lower()
    reusable = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    if method == "HEAD" or status in (204, 304):
        return Response(status, headers, b""), reusable
    if "chunked" in (headers.get("transfer-encoding") or "").lower():
        return Response(status, headers, _read_chunked(sock, buf)), reusable
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit():
            raise ProtocolError(f"bad Content-Length {length_text[:20]!r} in the response")
        length = int(length_text)
        while len(buf) < length:
            chunk = sock.recv(max(_RECV_BYTES, length - len(buf)))
            if not chunk:
                raise _Broken(f"closed after {len(buf)} of {length} body bytes")
            buf += chunk
        return Response(status, headers, bytes(buf[:length])), reusable and len(buf) == length
    while True:  # no length: the body ends when the server closes the connection
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            return Response(status, headers, bytes(buf)), False
        buf += chunk


def _parse_head(head: bytes) -> tuple[int, str, Headers]:
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise ProtocolError(f"not an HTTP response (status line {lines[0][:60]!r}); expected an HTTP server")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            value = value.strip()
            # Repeated headers join with a comma (RFC 9110), as http.client did.
            fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return int(parts[1]), parts[0], Headers(fields)


def _read_chunked(sock: socket.socket, buf: bytearray) -> bytes:
    body = bytearray()
    pos = 0
    while True:
        line_end = buf.find(b"\r\n", pos)
        while line_end < 0:
            _recv_into(sock, buf)
            line_end = buf.find(b"\r\n", pos)
        size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"malformed chunk size {size_text[:20]!r} in a chunked response") from None
        start = line_end + 2
        if size == 0:  # then optional trailers and an empty line
            while buf.find(b"\r\n\r\n", line_end) < 0:
                _recv_into(sock, buf)
            return bytes(body)
        while len(buf) < start + size + 2:
            _recv_into(sock, buf)
        body += buf[start : start + size]
        pos = start + size + 2


def _recv_into(sock: socket.socket, buf: bytearray) -> None:
    chunk = sock.recv(_RECV_BYTES)
    if not chunk:
        raise _Broken("closed mid-response (chunked body)")
    buf += chunk


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    if isinstance(error, OSError) and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}" if error.errno else error.strerror
    return str(error) or type(error).__name__


__all__ = ["Headers", "HttpTransport", "Response"]
