"""The load tester's HTTP/1.1 loop against servers that frame answers every legal way (raw sockets)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from mnist_client.loadtest.pacer import ClosedLoop
from mnist_client.loadtest.records import RecordSink
from mnist_client.loadtest.rest_worker import HttpEngine, build_request

BODY = json.dumps({"predictions": [{"classes": 3, "probabilities": [0.0, 0.0, 0.0, 1.0] + [0.0] * 6}]}).encode()


def chunked(body: bytes, trailer: bytes = b"") -> bytes:
    half = len(body) // 2
    return b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\n%s\r\n" % (half, body[:half], len(body) - half, body[half:],
                                                                 trailer)


ANSWERS = {
    "content-length, close": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY,
    "odd capitalisation": b"HTTP/1.1 200 OK\r\ncOnTeNt-LeNgTh: %d\r\nCONNECTION: Close\r\n\r\n" % len(BODY) + BODY,
    "chunked, close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(BODY),
    "HTTP/1.0, body until close": b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY,
    "keep-alive": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
    "chunked, keep-alive, trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + chunked(BODY, b"X-Checksum: 1\r\n"),
}


class RawServer:
    """Reads one request (head + Content-Length body) at a time and writes a canned answer, byte by byte
    in small pieces, so the client must reassemble. ``requests_per_connection`` limits kept-alive use:
    after that many answers the server closes the connection (the client must reconnect transparently)."""

    def __init__(self, answer: bytes, requests_per_connection: int = 1, split: int = 7) -> None:
        self.answer = answer
        self.requests_per_connection = requests_per_connection
        self.split = split
        self.connections = 0
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            for _ in range(self.requests_per_connection):
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += conn.recv(65536)
                buf = rest[length:]
                self.requests += 1
                for i in range(0, len(self.answer), self.split):
                    conn.sendall(self.answer[i : i + self.split])

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()


def load(port: int, requests: int, slots: int = 2) -> tuple[list, list]:
    batches = []
    request = build_request("127.0.0.1", port, "/v1/models/mnist:predict", "application/json", b'{"instances": []}')
    engine = HttpEngine("127.0.0.1", port, [request], [1], 5.0, "POST test")
    engine.run(ClosedLoop(requests=requests), slots, 0, RecordSink(0, batches.append), record_lag=False)
    oks = [c for b in batches for c in b.ok_classes]
    errors = [e for b in batches for e in b.errors]
    return oks, errors


@pytest.mark.parametrize("framing", sorted(ANSWERS))
def test_every_framing_is_read_completely(framing):
    kept_alive = "keep-alive" in framing
    per_connection = 1000 if kept_alive else 1
    with RawServer(ANSWERS[framing], per_connection) as server:
        oks, errors = load(server.port, 12)
    assert errors == []
    assert oks == [b"\x03"] * 12
    if kept_alive:
        assert server.connections == 2  # one per slot, reused
    else:
        assert server.connections == 12


def test_kept_alive_connections_closed_by_the_server_are_reopened():
    with RawServer(ANSWERS["keep-alive"], requests_per_connection=3) as server:
        oks, errors = load(server.port, 20, slots=1)
    assert errors == [] and len(oks) == 20
    assert server.requests == 20 and server.connections >= 7


def test_malformed_answers_are_protocol_errors():
    with RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!") as server:
        oks, errors = load(server.port, 3)
    assert oks == [] and [kind for kind, _, _ in errors] == ["protocol"] * 3
    with RawServer(b"SMTP ready\r\n\r\n") as server:
        oks, errors = load(server.port, 2)
    assert [kind for kind, _, _ in errors] == ["protocol"] * 2
    assert "not an HTTP response" in errors[0][2]


def test_a_connection_closed_mid_answer_is_unavailable():
    with RawServer(ANSWERS["content-length, close"][:-5]) as server:
        oks, errors = load(server.port, 2)
    assert oks == [] and {(kind, code) for kind, code, _ in errors} == {("unavailable", "UNAVAILABLE")}
    assert "before the response was complete" in errors[0][2]
