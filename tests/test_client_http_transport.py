"""RestClient's own HTTP/1.1 transport (mnist_client._http) against a scripted raw HTTP server on 127.0.0.1.

The server answers each request with bytes the test chooses, so every framing the transport must read
(Content-Length, chunked with extensions and trailers, a body ended by the close), kept-alive
connections the server drops while idle, and broken answers are exercised exactly. The well-behaved
servers (the PyTorch server, the stand-in, the TLS ones) are in test_client_rest/integration/tls.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

import numpy as np
import pytest

from mnist_client.errors import ClientConfigError, DeadlineExceededError, ProtocolError, ServerError, UnavailableError
from mnist_client.inputs import to_model_input
from mnist_client.rest import RestClient, parse_prediction
from mnist_client.retry import NO_RETRIES

IMAGE = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
PROBABILITIES = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.62, 0.05, 0.05]
ANSWER = json.dumps({"predictions": [{"probabilities": PROBABILITIES, "classes": 7}]}).encode()
DEADLINE_S = 10.0  # generous: for observing the server's state on a busy machine

# A response for request number i (0-based): the raw bytes to send, and whether to close the connection after.
Script = Callable[[int], tuple[bytes, bool]]


def with_length(body: bytes = ANSWER, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class ScriptedServer:
    """Accepts connections, reads each request (head and Content-Length body), answers from ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.closed_after_answer = threading.Event()  # set when the server closed a connection after an answer
        self.stop_event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.05)
        while not self.stop_event.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        buffer = b""
        with connection:
            connection.settimeout(DEADLINE_S)
            while True:
                try:
                    while b"\r\n\r\n" not in buffer:
                        chunk = connection.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffer) < length:
                        buffer += connection.recv(65536)
                except OSError:
                    return
                request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
                with self.lock:
                    index = len(self.requests)
                    self.requests.append(request)
                answer, close = self.script(index)
                try:
                    connection.sendall(answer)
                except OSError:
                    return
                if close:
                    connection.shutdown(socket.SHUT_RDWR)
                    self.closed_after_answer.set()
                    return

    def stop(self) -> None:
        self.stop_event.set()
        self.listener.close()


@pytest.fixture()
def serve():
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def assert_answer(prediction) -> None:
    assert prediction.classes.tolist() == [7]
    np.testing.assert_array_equal(prediction.probabilities, np.asarray([PROBABILITIES], dtype=np.float32))


def chunked(body: bytes) -> bytes:
    parts = [body[:5], body[5:17], body[17:]]
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + chunks + b"0\r\nX-Trailer: yes\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "close", "connections"),
    [
        (with_length(), False, 1),  # kept alive: both calls on one connection
        (chunked(ANSWER), False, 1),
        (with_length(extra="Connection: close\r\n"), True, 2),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + ANSWER, True, 2),
        (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER, True, 2),  # ended by the close
    ],
    ids=["content-length", "chunked", "connection-close", "no-length", "http-1.0"],
)
def test_every_framing_of_the_answer_is_read(serve, answer, close, connections):
    server = serve(lambda index: (answer, close))
    with RestClient(server.url, retry=NO_RETRIES) as client:
        assert_answer(client.predict(IMAGE))
        assert_answer(client.predict(IMAGE))
    assert len(server.requests) == 2 and server.connections == connections


def test_a_kept_alive_connection_the_server_closed_while_idle_is_replaced(serve):
    # The server answers as if keeping the connection, then closes it (as a keep-alive timeout does).
    server = serve(lambda index: (with_length(), index == 0))
    with RestClient(server.url, retry=NO_RETRIES) as client:
        assert_answer(client.predict(IMAGE))
        assert server.closed_after_answer.wait(DEADLINE_S)
        assert_answer(client.predict(IMAGE))  # no error: the dead connection is noticed before reuse
    assert len(server.requests) == 2 and server.connections == 2


def test_the_request_on_the_wire(serve):
    server = serve(lambda index: (with_length(), False))
    with RestClient(server.url, token="t0k", headers={"X-Request-Source": "tests"}, binary=False) as client:
        client.predict(IMAGE)
        body = client.prepare(IMAGE).body
    head, _, sent_body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert lines[0] == "POST /v1/models/mnist:predict HTTP/1.1"
    assert fields["host"] == server.url.removeprefix("http://")
    assert fields["content-type"] == "application/json" and fields["content-length"] == str(len(body))
    assert fields["authorization"] == "Bearer t0k" and fields["x-request-source"] == "tests"
    assert sent_body == body


def test_json_body_holds_the_numbers_json_dumps_writes_and_every_float32_value():
    rng = np.random.default_rng(3)
    floats = rng.random((2, 28, 28), dtype=np.float32)
    floats[0, 0, :3] = [0.0, 1.0, np.float32(1e-7)]
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    pixels[0, 0, :2] = [0, 255]
    client = RestClient("http://127.0.0.1:9", binary=False)
    for images in (floats, pixels, pixels[1], floats.astype(np.float64)):
        body = client.prepare(images).body
        model_input = to_model_input(images)
        reference = json.dumps({"instances": model_input.tolist()}, separators=(",", ":")).encode()
        assert json.loads(body) == json.loads(reference)  # the same float64 numbers (1e-7 may read 1e-07)
        if images.dtype == np.uint8:
            assert body == reference  # pixel / 255 needs no exponent: the very same bytes
        sent = np.asarray(json.loads(body)["instances"], dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(sent, model_input)  # bit for bit the float32 model input
    client.close()


def test_an_answer_that_is_not_http_is_a_protocol_error(serve):
    server = serve(lambda index: (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True))
    with RestClient(server.url, retry=NO_RETRIES) as client, pytest.raises(ProtocolError) as caught:
        client.predict(IMAGE)
    assert "not an HTTP response" in str(caught.value) and "/v1/models/mnist:predict" in str(caught.value)


def test_an_answer_cut_off_mid_body_is_a_broken_connection_that_may_have_run(serve):
    server = serve(lambda index: (with_length()[:-10], True))
    with RestClient(server.url, retry=NO_RETRIES) as client, pytest.raises(UnavailableError) as caught:
        client.predict(IMAGE)
    assert "connection broken" in str(caught.value) and caught.value.request_sent is True


def test_an_answer_stalled_mid_body_hits_the_timeout(serve):
    server = serve(lambda index: (with_length()[:-10], False))  # the rest never comes
    with RestClient(server.url, retry=NO_RETRIES, timeout=0.3) as client:
        with pytest.raises(DeadlineExceededError, match="no response within 0.3 s"):
            client.predict(IMAGE)
    assert len(server.requests) == 1


def test_answers_with_nan_are_still_read():
    # orjson refuses NaN; the client falls back to Python's json, which always took it.
    answer = b'{"predictions": [{"probabilities": [NaN, 0, 0, 0, 0, 0, 0, 0, 0, 1], "classes": 9}]}'
    prediction = parse_prediction(answer, 1, None)
    assert prediction.classes.tolist() == [9] and np.isnan(prediction.probabilities[0, 0])
    with pytest.raises(ProtocolError, match="invalid JSON"):
        parse_prediction(b"{not json", 1, None)


def test_model_version_header_is_read_in_any_case(serve):
    server = serve(lambda index: (with_length(extra="x-MODEL-version: 3\r\n"), False))
    with RestClient(server.url) as client:
        assert client.predict(IMAGE).model_version == 3


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Bad Name": "x"}, "not a valid HTTP header name"),
        ({"X-Injected": "a\r\nHost: evil"}, "single-line string"),
        ({"X-Number": 3}, "single-line string"),
        ([("X-A", "b")], "expected a dict"),
    ],
)
def test_bad_extra_headers_are_refused(headers, message):
    with pytest.raises(ClientConfigError, match=message):
        RestClient("http://127.0.0.1:9", headers=headers)


def test_insecure_https_warns_that_the_server_is_not_verified():
    with pytest.warns(UserWarning, match="does not verify the server's certificate"):
        RestClient("https://127.0.0.1:9", insecure=True).close()


def test_many_threads_share_one_client(serve):
    server = serve(lambda index: (with_length(), False))
    errors: list[BaseException] = []
    with RestClient(server.url, pool_maxsize=2) as client:

        def calls() -> None:
            try:
                for _ in range(10):
                    assert_answer(client.predict(IMAGE))
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(error)

        threads = [threading.Thread(target=calls) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_S * 3)
    assert not errors and len(server.requests) == 40


def test_an_early_answer_to_a_body_the_server_will_not_read_is_reported():
    """A server may answer 413 after the head and close without reading the body, breaking the send."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE_S)
    message = b'{"error": "request body too large"}'

    def answer_after_the_head() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(message), message)
            )

    thread = threading.Thread(target=answer_after_the_head, daemon=True)
    thread.start()
    too_large = np.zeros((20_000, 28, 28), np.uint8)  # 15 MB: more than the socket buffers hold
    try:
        with RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", binary=True, retry=NO_RETRIES) as client:
            with pytest.raises(ServerError) as caught:
                client.predict(too_large)
    finally:
        thread.join(DEADLINE_S)
        listener.close()
    assert caught.value.status == 413 and caught.value.server_message == "request body too large"


def test_a_path_prefix_with_spaces_or_non_ascii_goes_percent_encoded(serve):
    server = serve(lambda index: (with_length(), False))
    with RestClient(f"{server.url}/mnist api/ü") as client:
        assert_answer(client.predict(IMAGE))
    assert server.requests[0].startswith(b"POST /mnist%20api/%C3%BC/v1/models/mnist:predict HTTP/1.1\r\n")
