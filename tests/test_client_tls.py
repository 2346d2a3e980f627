"""TLS (server verification and mutual TLS) and the bearer token, for both clients.

Certificates come from the session's ``certs`` fixture (tests/conftest.py, made by tests/tls_certs.py with
the openssl command line): a CA, a server certificate for 127.0.0.1/localhost and a client certificate,
all signed by that CA.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_fakes import Behaviour, GrpcServer, RestServer
from mnist_client.errors import ServerError, UnavailableError
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from mnist_client.retry import NO_RETRIES

IMAGE = np.zeros((1, 28, 28), np.uint8)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def server_context(certs: dict[str, Path], require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.pem"], certs["server.key"])
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs["ca.pem"])
    return context


# -- REST ------------------------------------------------------------------------------------------------


def test_rest_over_https_verifies_the_server_with_the_ca_file(certs):
    server = RestServer(ssl_context=server_context(certs))
    try:
        with RestClient(server.url, ca_file=certs["ca.pem"]) as client:
            assert client.ready()
            assert client.predict(IMAGE).classes.shape == (1,)
        with RestClient(server.url, ca_file=certs["other-ca.pem"], retry=NO_RETRIES) as client:
            with pytest.raises(UnavailableError, match="TLS failed") as caught:
                client.predict(IMAGE)
            assert caught.value.request_sent is False
            assert not client.ready()
    finally:
        server.stop()
    assert server.behaviour.calls["predict"] == 1


def test_rest_mutual_tls(certs):
    server = RestServer(ssl_context=server_context(certs, require_client_cert=True))
    try:
        with RestClient(
            server.url, ca_file=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"]
        ) as client:
            client.predict(IMAGE)
        with RestClient(server.url, ca_file=certs["ca.pem"], retry=NO_RETRIES) as client:
            with pytest.raises(UnavailableError):
                client.predict(IMAGE)
    finally:
        server.stop()
    assert server.behaviour.calls["predict"] == 1


def test_rest_bearer_token_over_https(certs):
    server = RestServer(Behaviour(token="t0ken"), ssl_context=server_context(certs))
    try:
        with RestClient(server.url, ca_file=certs["ca.pem"], token="t0ken") as client:
            client.predict(IMAGE)
        with RestClient(server.url, ca_file=certs["ca.pem"], token="wrong") as client:
            with pytest.raises(ServerError) as caught:
                client.predict(IMAGE)
        assert caught.value.status == 401 and "bearer token" in caught.value.server_message
    finally:
        server.stop()


# -- gRPC ------------------------------------------------------------------------------------------------


def grpc_credentials(certs: dict[str, Path], require_client_cert: bool = False) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(certs["server.key"].read_bytes(), certs["server.pem"].read_bytes())],
        root_certificates=certs["ca.pem"].read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def test_grpc_tls_verifies_the_server(certs):
    server = GrpcServer(credentials=grpc_credentials(certs))
    try:
        with GrpcClient(server.target, tls=True, root_certificates=certs["ca.pem"]) as client:
            assert client.ready() and client.predict(IMAGE).model_version == 1
        with GrpcClient(
            f"localhost:{server.port}",
            tls=True,
            root_certificates=certs["ca.pem"].read_bytes(),
            tls_server_name="localhost",
        ) as client:
            client.predict(IMAGE)
        with GrpcClient(
            server.target, tls=True, root_certificates=certs["other-ca.pem"], retry=NO_RETRIES, timeout=3
        ) as client:
            with pytest.raises(UnavailableError) as caught:
                client.predict(IMAGE)
            assert caught.value.request_sent is False
        with GrpcClient(server.target, retry=NO_RETRIES, timeout=3) as client:  # plaintext to a TLS port
            with pytest.raises(UnavailableError):
                client.predict(IMAGE)
    finally:
        server.stop()
    assert server.behaviour.calls["predict"] == 2


def test_grpc_mutual_tls(certs):
    server = GrpcServer(credentials=grpc_credentials(certs, require_client_cert=True))
    try:
        with GrpcClient(
            server.target,
            tls=True,
            root_certificates=certs["ca.pem"],
            client_certificate_chain=certs["client.pem"],
            client_private_key=certs["client.key"],
        ) as client:
            client.predict(IMAGE)
        with GrpcClient(
            server.target, tls=True, root_certificates=certs["ca.pem"], retry=NO_RETRIES, timeout=3
        ) as client:
            with pytest.raises(UnavailableError):
                client.predict(IMAGE)
    finally:
        server.stop()
    assert server.behaviour.calls["predict"] == 1
