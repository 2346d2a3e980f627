"""The nginx front of the PyTorch REST server (serving/torch_server/proxy.py) on free ports.

A small threaded HTTP server stands for gunicorn, so each deadline and bound can be seen alone:
a request head or body that stalls is cut, an idle keep-alive connection is closed, requests past
the bound get 503 with Retry-After, connections past the bound are closed, and bad settings are
refused with the variable's name.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.torch_server.config import ConfigError
from serving.torch_server.proxy import ProxySettings, find_nginx, prepare, render_config
from stack.processes import free_port, stop_process

try:
    find_nginx()
    _NO_NGINX = ""
except ConfigError as exc:
    _NO_NGINX = f"{exc} (.ci/run installs it)"
needs_nginx = pytest.mark.skipif(bool(_NO_NGINX), reason=_NO_NGINX)

SAFETY_S = 30.0  # a bound on every wait, never a measure of speed


class Upstream:
    """Answers GET/POST with 200 {"ok": true}; /hold waits until ``release`` is set."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if self.path == "/hold":
                    outer.holding.set()
                    outer.release.wait(SAFETY_S)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0].decode(errors="replace")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx not listening on {port} within {SAFETY_S} s")


@pytest.fixture
def start_proxy(upstream: Upstream, tmp_path: Path) -> Iterator:
    processes: list[subprocess.Popen[bytes]] = []

    def start(**overrides: object) -> int:
        port = free_port()
        overrides.setdefault("access_log", str(tmp_path / f"access-{port}.log"))  # not the unread pipe
        settings = ProxySettings(host="127.0.0.1", port=port, upstream=f"127.0.0.1:{upstream.port}", **overrides)
        command = prepare(settings, tmp_path / f"run-{port}")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        processes.append(process)
        _wait_listening(port, process)
        return port

    yield start
    for process in processes:
        stop_process(process, grace_s=10)


def _closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (within SAFETY_S); return what it sent."""
    sock.settimeout(SAFETY_S)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:  # reset_timedout_connection: nginx resets what timed out
        pass
    return received


@needs_nginx
def test_ordinary_requests_pass_through(start_proxy) -> None:
    port = start_proxy()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    connection.request("POST", "/v1/models/mnist:predict", body=b'{"instances": []}',
                       headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert (answer.status, json.loads(answer.read())) == (200, {"ok": True})


@needs_nginx
def test_nginx_writes_the_access_log_with_status_and_upstream_time(start_proxy, tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    port = start_proxy(access_log=str(log_file))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    connection.request("POST", "/v1/models/mnist:predict", body=b"{}", headers={"User-Agent": "access-log-test"})
    assert connection.getresponse().status == 200
    connection.close()
    deadline = time.monotonic() + SAFETY_S
    while not (log_file.exists() and log_file.read_text()):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.01)
    (line,) = log_file.read_text().splitlines()
    assert '"POST /v1/models/mnist:predict HTTP/1.1" 200' in line and '"access-log-test"' in line
    assert " upstream 0." in line or " upstream 1." in line  # gunicorn's answer time, in seconds


def test_the_access_log_can_be_off(tmp_path: Path) -> None:
    assert "access_log off;" in render_config(ProxySettings(access_log="off"), tmp_path)
    assert "access_log /dev/stderr mnist;" in render_config(ProxySettings(), tmp_path)


def test_a_request_head_that_stalls_is_cut(start_proxy) -> None:
    port = start_proxy(header_timeout_s=1)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        _closed_by_server(sock)  # the connection ends: no reply to a head that never finished


@needs_nginx
def test_a_body_that_stalls_is_cut_before_the_upstream_sees_it(start_proxy, upstream) -> None:
    port = start_proxy(body_timeout_s=1)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        answer = _closed_by_server(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert not upstream.holding.is_set(), "the upstream must never see an incomplete body"


@needs_nginx
def test_an_idle_keepalive_connection_is_closed(start_proxy) -> None:
    port = start_proxy(keepalive_timeout_s=1)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@needs_nginx
def test_requests_past_the_bound_get_503_with_retry_after(start_proxy, upstream) -> None:
    port = start_proxy(max_active_requests=1, retry_after_s=2)
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    first.request("GET", "/hold")
    assert upstream.holding.wait(SAFETY_S), "the first request never reached the upstream"
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    second.request("GET", "/healthz")
    refused = second.getresponse()
    body = json.loads(refused.read())
    assert refused.status == 503 and refused.getheader("Retry-After") == "2"
    assert "too many requests at once" in body["error"]
    upstream.release.set()
    assert first.getresponse().status == 200


@needs_nginx
def test_past_the_connection_bound_idle_connections_make_room(start_proxy) -> None:
    bound = 4
    port = start_proxy(max_connections=bound, max_active_requests=1)
    squatters = [socket.create_connection(("127.0.0.1", port)) for _ in range(bound + 4)]
    try:
        # nginx closes idle connections (nothing sent yet) to make room for new ones...
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        # ...so some of the idle ones were closed.
        for sock in squatters:
            sock.setblocking(False)
        closed: list[socket.socket] = []
        deadline = time.monotonic() + SAFETY_S
        while not closed and time.monotonic() < deadline:
            for sock in squatters:
                try:
                    if sock.recv(1) == b"":
                        closed.append(sock)
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed.append(sock)
            time.sleep(0.05)
        assert closed, "more idle connections than the bound, yet none was closed"
    finally:
        for sock in squatters:
            sock.close()


@needs_nginx
def test_an_upstream_that_does_not_answer_is_a_503_with_retry_after(start_proxy, upstream) -> None:
    port = start_proxy()
    upstream.close()  # gunicorn gone: nothing listens on the upstream port any more
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    connection.request("GET", "/readyz")
    answer = connection.getresponse()
    assert (answer.status, answer.getheader("Retry-After")) == (503, "1")
    assert "not answering" in json.loads(answer.read())["error"]


def test_settings_from_the_environment_and_their_errors(tmp_path: Path) -> None:
    settings = ProxySettings.from_env({"MNIST_PROXY_PORT": "9000", "MNIST_PROXY_HEADER_TIMEOUT": "3",
                                       "MNIST_PROXY_UPSTREAM": "unix:/run/g.sock"})
    assert (settings.port, settings.header_timeout_s, settings.upstream) == (9000, 3, "unix:/run/g.sock")
    assert ProxySettings.from_env({}) == ProxySettings()
    with pytest.raises(ConfigError, match="MNIST_PROXY_BODY_TIMEOUT='soon': expected an integer"):
        ProxySettings.from_env({"MNIST_PROXY_BODY_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="MNIST_PROXY_MAX_CONNECTIONS=0: expected a positive integer"):
        ProxySettings.from_env({"MNIST_PROXY_MAX_CONNECTIONS": "0"})
    with pytest.raises(ConfigError, match="TLS_CERT and MNIST_PROXY_TLS_KEY go together"):
        ProxySettings.from_env({"MNIST_PROXY_TLS_CERT": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="MNIST_PROXY_UPSTREAM='gunicorn': expected host:port or unix:/path"):
        ProxySettings.from_env({"MNIST_PROXY_UPSTREAM": "gunicorn"})
