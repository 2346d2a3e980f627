"""gRPC load balancing as the Kubernetes manifests rely on it, shown with local TF Serving stand-ins.

In the cluster, the headless Service ``tfserving-headless`` makes DNS answer with the address of
every ready TF Serving pod. Here a multi-address target (``ipv4:127.0.0.1:p1,127.0.0.1:p2,...``) gives
the client the same thing: several addresses for one target. Each stand-in serves the same
SavedModel under its own version number, so every answer names the server that computed it.

- ``round_robin`` (what the client library and the load tester use against the headless Service)
  spreads the calls over all servers;
- ``pick_first`` (gRPC's default, and in effect what a ClusterIP Service gives: one connection to
  one pod) sends every call to one server;
- the server-side connection ageing of the TF Serving Deployment (which makes clients re-resolve
  DNS, so they find new pods and leave terminating ones) fails no call.

Run with ``-o log_cli=true --log-cli-level=INFO`` to see the per-server counts.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.k8s import manifest_check as mc
from mnist_client import contract
from mnist_client.grpc_client import GrpcClient
from serving.tfs_standin.flags import ServerOptions
from serving.tfs_standin.server import ModelServer

log = logging.getLogger(__name__)

SERVERS = 3
WARMUP_CALLS = 3 * SERVERS  # until every subchannel has connected
CALLS = 30 * SERVERS
AGE_MS = 200
AGE_GRACE_MS = 1000
AGEING_TEST_SECONDS = 2.0


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory, test_images: tuple[np.ndarray, np.ndarray]) -> Path:
    """One SavedModel with the contract signature (untrained weights: only who answers matters here)."""
    from training import model_tf

    images, labels = test_images
    root = tmp_path_factory.mktemp("export")
    return model_tf.export_saved_model(model_tf.build_model(), root, images[:32], labels[:32], version=1)


@pytest.fixture(scope="module")
def servers(saved_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, ModelServer]]:
    """Stand-ins on free ports, server ``v`` serving the model as version ``v``: {version: server}."""
    started: dict[int, ModelServer] = {}
    try:
        for version in range(1, SERVERS + 1):
            base = tmp_path_factory.mktemp(f"server{version}") / contract.MODEL_NAME
            shutil.copytree(saved_model, base / str(version))
            options = ServerOptions(
                port=0,
                standin_host="127.0.0.1",
                model_name=contract.MODEL_NAME,
                model_base_path=str(base),
                file_system_poll_wait_seconds=0,
                standin_shutdown_grace_seconds=5.0,
            )
            server = ModelServer(options)
            server.start()
            started[version] = server
        for server in started.values():
            server.wait_until_available(timeout=120)
        yield started
    finally:
        for server in started.values():
            server.stop(grace=1.0)


def multi_address_target(servers: dict[int, ModelServer]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{server.port}" for server in servers.values())


def answers_by_server(client: GrpcClient, image: np.ndarray, calls: int) -> collections.Counter[int]:
    """How many of ``calls`` predictions each server (named by its model version) answered."""
    return collections.Counter(client.predict(image).model_version for _ in range(calls))


@pytest.fixture(scope="module")
def image(test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_images[0][:1]


def test_round_robin_spreads_calls_over_every_server(servers: dict[int, ModelServer], image: np.ndarray) -> None:
    with GrpcClient(target=multi_address_target(servers), load_balancing="round_robin", timeout=10) as client:
        client.wait_until_ready(timeout=30)
        answers_by_server(client, image, WARMUP_CALLS)
        counts = answers_by_server(client, image, CALLS)
    log.info("round_robin, %d calls over %d servers: %s", CALLS, SERVERS, dict(sorted(counts.items())))
    assert set(counts) == set(servers), f"servers that answered: {dict(counts)}"
    fair_share = CALLS / SERVERS
    assert all(fair_share / 2 <= n <= fair_share * 3 / 2 for n in counts.values()), dict(counts)


def test_pick_first_pins_every_call_to_one_server(servers: dict[int, ModelServer], image: np.ndarray) -> None:
    with GrpcClient(target=multi_address_target(servers), load_balancing="pick_first", timeout=10) as client:
        client.wait_until_ready(timeout=30)
        counts = answers_by_server(client, image, CALLS)
    log.info("pick_first, %d calls over %d servers: %s", CALLS, SERVERS, dict(sorted(counts.items())))
    assert len(counts) == 1 and sum(counts.values()) == CALLS, dict(counts)


def test_connection_ageing_moves_clients_without_failing_a_call(
    kubectl: str, saved_model: Path, tmp_path_factory: pytest.TempPathFactory, image: np.ndarray
) -> None:
    """The manifest's grpc.max_connection_age closes each connection gracefully (GOAWAY, in-flight calls
    finish), so clients reconnect and re-resolve DNS without a failed call. Same keys as the
    TF Serving Deployment, times scaled down so that one test sees many connection generations."""
    deployment = next(
        o for o in mc.render("serving-cpu") if o["kind"] == "Deployment" and o["metadata"]["name"] == "tfserving"
    )
    flag = next(a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"] if "channel_arguments" in a)
    keys = sorted(key for key in (item.split("=", 1)[0] for item in flag.split("=", 1)[1].split(","))
                  if key.startswith("grpc.max_connection_age"))
    assert keys == ["grpc.max_connection_age_grace_ms", "grpc.max_connection_age_ms"]
    base = tmp_path_factory.mktemp("ageing") / contract.MODEL_NAME
    shutil.copytree(saved_model, base / "1")
    options = ServerOptions(
        port=0,
        standin_host="127.0.0.1",
        model_name=contract.MODEL_NAME,
        model_base_path=str(base),
        file_system_poll_wait_seconds=0,
        grpc_channel_arguments=f"{keys[1]}={AGE_MS},{keys[0]}={AGE_GRACE_MS}",
    )
    with ModelServer(options) as server:
        server.wait_until_available(timeout=120)
        target = f"127.0.0.1:{server.port}"
        # A second channel only watches connectivity: each READY is one new connection.
        observer = grpc.insecure_channel(target)
        states: list[grpc.ChannelConnectivity] = []
        observer.subscribe(states.append, try_to_connect=True)
        health = health_pb2_grpc.HealthStub(observer)
        try:
            with GrpcClient(target=target, timeout=10) as client:
                client.wait_until_ready(timeout=30)
                calls = 0
                deadline = time.monotonic() + AGEING_TEST_SECONDS  # ~10 connection lifetimes
                while time.monotonic() < deadline:
                    client.predict(image)  # raises on any failed call
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    calls += 1
        finally:
            observer.close()
    connections = states.count(grpc.ChannelConnectivity.READY)
    log.info("%d calls in %.1f s, max_connection_age %d ms: %d connections, no call failed",
             calls, AGEING_TEST_SECONDS, AGE_MS, connections)  # fmt: skip
    assert connections >= 3, f"the server did not age connections out: states {states}"
