"""Request payloads from the real MNIST test images, encoded once before the load starts.

The client package cannot depend on ``training/``, so this module carries its own small reader for
the two MNIST test files (gzipped or plain IDX). Where the files are, in order:

1. ``data_dir`` given by the caller (``--data-dir``);
2. the ``MNIST_DATA_DIR`` environment variable;
3. ``shared/data/mnist`` in the current directory or any directory above it, and the same beside any
   directory above this package (the layout of the project's machines: ``<repo>/../shared/data/mnist``);
4. the training loader's download cache (``MNIST_CACHE_DIR``, default ``~/.cache/mnist-serving/mnist``).

Requests are encoded by the client library itself (:meth:`mnist_client.rest.RestClient.prepare` and
:meth:`mnist_client.grpc_client.GrpcClient.prepare`), so the load tester sends exactly what an
application would.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_client import contract
from mnist_client.loadtest.config import LoadTestConfig, Target
from mnist_client.loadtest.errors import DataError

TEST_IMAGES_FILE = "t10k-images-idx3-ubyte"
TEST_LABELS_FILE = "t10k-labels-idx1-ubyte"
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


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


def _candidate_dirs() -> Iterator[Path]:
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    seen: set[Path] = set()
    for start in starts:
        for directory in (start, *start.parents):
            candidate = directory / "shared" / "data" / "mnist"
            if candidate not in seen:
                seen.add(candidate)
                yield candidate
    cache = Path(os.environ.get("MNIST_CACHE_DIR", Path.home() / ".cache" / "mnist-serving")) / "mnist"
    yield cache


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the MNIST test files (see the module docstring for the search order)."""
    if data_dir is not None:
        chosen = Path(data_dir)
        if _find_file(chosen, TEST_IMAGES_FILE) is None or _find_file(chosen, TEST_LABELS_FILE) is None:
            raise DataError(
                f"data directory {chosen} lacks the MNIST test files; expected {TEST_IMAGES_FILE}.gz and "
                f"{TEST_LABELS_FILE}.gz (or uncompressed) in it"
            )
        return chosen
    env = os.environ.get("MNIST_DATA_DIR")
    if env:
        return find_mnist_dir(env)
    looked = []
    for candidate in _candidate_dirs():
        looked.append(str(candidate))
        if _find_file(candidate, TEST_IMAGES_FILE) and _find_file(candidate, TEST_LABELS_FILE):
            return candidate
    raise DataError(
        "MNIST test files not found; pass --data-dir DIR (or set MNIST_DATA_DIR) to a directory holding "
        f"{TEST_IMAGES_FILE}.gz and {TEST_LABELS_FILE}.gz. Looked in: " + ", ".join(looked)
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A uint8 IDX file (gzipped or not) as an array, its header checked against ``magic``."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc})") from exc
    ndim = 3 if magic == _IMAGES_MAGIC else 1
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header of {header_len} bytes")
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise DataError(f"{path}: IDX magic number {int(header[0])}, expected {magic}")
    dims = tuple(int(d) for d in header[1:])
    if ndim == 3 and dims[1:] != contract.IMAGE_SHAPE:
        raise DataError(f"{path}: images of {dims[1:]} pixels, expected {contract.IMAGE_SHAPE}")
    expected_len = header_len + int(np.prod(dims))
    if len(raw) != expected_len:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected_len} for IDX dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)  # [N, 28, 28] or [N]


def load_test_set(data_dir: str | os.PathLike[str] | None = None, limit: int | None = None) -> TestSet:
    """The first ``limit`` (default: all) MNIST test images and labels."""
    directory = find_mnist_dir(data_dir)
    images = read_idx(_find_file(directory, TEST_IMAGES_FILE), _IMAGES_MAGIC)  # type: ignore[arg-type]
    labels = read_idx(_find_file(directory, TEST_LABELS_FILE), _LABELS_MAGIC)  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{directory}: {images.shape[0]} test images but {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= contract.NUM_CLASSES:
        raise DataError(f"{directory}: label {int(labels.max())} found, expected 0..{contract.NUM_CLASSES - 1}")
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
