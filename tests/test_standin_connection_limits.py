"""The stand-in's read deadline (serving/tfs_standin/connection_limits.py) on a real gRPC server.

A tiny echo service stands for the model services, so the deadline is seen alone: a call whose
request message never comes is cancelled and frees its thread; an ordinary call is untouched;
a call with no message at all gets INVALID_ARGUMENT.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from serving.tfs_standin.connection_limits import RequestReadDeadline

SAFETY_S = 30.0
METHOD = "/test.Echo/Echo"


@pytest.fixture
def echo_target() -> Iterator[str]:
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    )
    # One thread: a call the deadline did not free would hold it, and the next call would wait.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), interceptors=[RequestReadDeadline(0.5)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_a_call_whose_request_never_comes_is_cancelled_and_frees_its_thread(echo_target: str) -> None:
    never_sent = threading.Event()

    def nothing() -> Iterator[bytes]:
        never_sent.wait(SAFETY_S)
        return
        yield b""

    with grpc.insecure_channel(echo_target, options=[("grpc.use_local_subchannel_pool", 1)]) as stalled, \
            grpc.insecure_channel(echo_target) as ordinary:  # fmt: skip
        call = stalled.stream_unary(METHOD).future(nothing())
        try:
            with pytest.raises(grpc.RpcError) as caught:
                call.result(timeout=SAFETY_S)
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            # The only handler thread is free again: an ordinary call is answered.
            assert ordinary.unary_unary(METHOD)(b"hello", timeout=SAFETY_S) == b"hello"
        finally:
            never_sent.set()


def test_a_call_without_a_message_is_refused_with_a_reason(echo_target: str) -> None:
    with grpc.insecure_channel(echo_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.stream_unary(METHOD)(iter(()), timeout=SAFETY_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expects one request message, got none" in caught.value.details()
