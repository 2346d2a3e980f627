"""Request payloads from the real MNIST test images, encoded once before the load starts.

The images come from :mod:`mnist_client.mnist_data` (``--data-dir``, else ``MNIST_DATA_DIR``, else a
shared copy, else the download cache, filled from the mirrors on first use: MD5-checked, see
docs/data.md). Requests are encoded by the client library itself
(:meth:`mnist_client.rest.RestClient.prepare` and :meth:`mnist_client.grpc_client.GrpcClient.prepare`),
so the load tester sends exactly what an application would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mnist_client import mnist_data
from mnist_client.loadtest.config import LoadTestConfig, Target
from mnist_client.loadtest.errors import DataError


@dataclass(frozen=True)
class TestSet:
    """MNIST test images (uint8 ``[N, 28, 28]``) with their labels (uint8 ``[N]``)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Payload:
    """Encoded requests for one target, cycled through by the workers.

    ``bodies[i]`` carries the images ``image_indices[i]`` (indices into the test set, so the reporter
    can score the answers against ``labels``).
    """

    bodies: tuple[bytes, ...]
    image_indices: tuple[tuple[int, ...], ...]
    path: str = ""  # REST: the URL path of the predict call
    content_type: str = ""  # REST: the body's media type

    def __len__(self) -> int:
        return len(self.bodies)


def load_test_set(data_dir: str | os.PathLike[str] | None = None, limit: int | None = None) -> TestSet:
    """The first ``limit`` (default: all) MNIST test images and labels, downloaded if no copy is found."""
    try:
        split = mnist_data.load_split("test", data_dir)
    except mnist_data.MnistDataError as exc:
        raise DataError(str(exc)) from exc
    images, labels = split.images, split.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TestSet(images=images, labels=labels)


def batches(count: int, images_per_request: int) -> list[tuple[int, ...]]:
    """Image indices of each request: consecutive runs through ``count`` images, wrapping at the end.

    Enough requests to use every image at least once: ceil(count / images_per_request).
    """
    n_requests = -(-count // images_per_request)
    return [tuple((r * images_per_request + k) % count for k in range(images_per_request)) for r in range(n_requests)]


def build_payload(target: Target, config: LoadTestConfig, test_set: TestSet) -> Payload:
    """Encode every request of ``target`` once, with the client library's own encoders."""
    groups = batches(len(test_set.labels), config.images_per_request)
    if target.protocol == "rest":
        from mnist_client.rest import RestClient

        client = RestClient(target.address, model_version=config.model_version, timeout=config.timeout_s)
        try:
            prepared = [client.prepare(test_set.images[list(g)], binary=config.rest_format == "npy") for g in groups]
        finally:
            client.close()
        return Payload(
            bodies=tuple(p.body for p in prepared),
            image_indices=tuple(groups),
            path=prepared[0].path,
            content_type=prepared[0].content_type,
        )
    from mnist_client.grpc_client import GrpcClient

    grpc_client = GrpcClient(target.grpc_target, model_version=config.model_version, timeout=config.timeout_s)
    try:
        bodies = tuple(grpc_client.prepare(test_set.images[list(g)]).request for g in groups)
    finally:
        grpc_client.close()
    return Payload(bodies=bodies, image_indices=tuple(groups))
