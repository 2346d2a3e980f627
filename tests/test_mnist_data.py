"""The MNIST reader of the client package: the real shared files, the mirror download path, and its errors."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnist_client import contract, mnist_data
from mnist_client.mnist_data import FILES, MnistDataError
from mnist_mirror import serve_mirror
from mnist_reference import MNIST_DATASET_CHECKSUM
from stack.processes import free_port

TEST_IMAGES, TEST_LABELS = mnist_data.SPLITS["test"]


@pytest.fixture(scope="module")
def real_dir(mnist_dir: Path) -> Path:
    """The real files (conftest's ``mnist_dir``: $MNIST_DATA_DIR or the shared copy)."""
    return mnist_dir


def at(path: Path) -> str:
    """Regex prefix matching an error message that starts with ``path``."""
    return re.escape(str(path))


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes | None = None) -> Path:
    """A gzipped IDX file with the given header; zero payload of the right size unless given."""
    header = np.array([magic, *dims], dtype=">u4").tobytes()
    body = payload if payload is not None else bytes(int(np.prod(dims)))
    path.write_bytes(gzip.compress(header + body, compresslevel=1))
    return path


# --- the real files -------------------------------------------------------------------------------


def test_test_split_has_the_real_shapes_dtypes_and_labels(mnist_test: mnist_data.Split) -> None:
    assert mnist_test.images.shape == (10_000, *contract.IMAGE_SHAPE)
    assert mnist_test.images.dtype == np.uint8
    assert mnist_test.labels.shape == (10_000,)
    assert mnist_test.labels.dtype == np.uint8
    assert len(mnist_test) == 10_000
    assert set(np.unique(mnist_test.labels)) == set(range(contract.NUM_CLASSES))
    assert mnist_test.images.max() == 255 and mnist_test.images.min() == 0
    # the first test image is the famous 7
    assert int(mnist_test.labels[0]) == 7


def test_train_split_has_60000_images_of_every_class(real_dir: Path) -> None:
    train = mnist_data.load_split("train", real_dir)
    assert train.images.shape == (60_000, *contract.IMAGE_SHAPE)
    assert train.labels.shape == (60_000,)
    counts = np.bincount(train.labels, minlength=contract.NUM_CLASSES)
    assert counts.sum() == 60_000 and counts.min() > 5_000  # every digit well represented


def test_scaled_images_follow_the_contract(mnist_test: mnist_data.Split) -> None:
    scaled = mnist_test.scaled()
    assert scaled.dtype == contract.INPUT_DTYPE
    assert scaled.shape == mnist_test.images.shape
    assert scaled.min() == contract.INPUT_MIN and scaled.max() == contract.INPUT_MAX
    np.testing.assert_allclose(scaled * contract.PIXEL_SCALE, mnist_test.images)


def test_dataset_checksum_is_derived_from_the_four_md5s(real_dir: Path) -> None:
    assert mnist_data.dataset_checksum(real_dir) == MNIST_DATASET_CHECKSUM


def test_data_dir_env_var_is_used_and_an_explicit_dir_wins(
    real_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path))
    assert mnist_data.resolve_data_dir() == tmp_path
    assert mnist_data.resolve_data_dir(real_dir) == real_dir
    with pytest.raises(MnistDataError, match=at(tmp_path / TEST_IMAGES) + r": file not found"):
        mnist_data.load_split("test")  # the env var points at an empty folder


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"split 'validation': expected one of \['test', 'train'\]"):
        mnist_data.load_split("validation")


# --- download from mirrors ------------------------------------------------------------------------


@pytest.fixture
def mirror_server(tmp_path: Path, real_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1: ``/good/`` (the real files), ``/corrupt/`` (wrong bytes), ``/truncated/``
    (the connection drops mid-body), ``/not-http/`` (a non-HTTP answer) and no ``/missing/`` (404)."""
    root = tmp_path / "www"
    (root / "good").mkdir(parents=True)
    (root / "corrupt").mkdir()
    for name in FILES:
        (root / "good" / name).symlink_to(real_dir / name)
        (root / "corrupt" / name).write_bytes(gzip.compress(b"not mnist"))
    with serve_mirror(root) as served:
        yield served


@pytest.fixture
def no_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data dir, no env var, no shared copy: the reader has to use its cache (returned, still empty)."""
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(mnist_data, "shared_copy", lambda names=FILES: None)
    return tmp_path / "cache" / "mnist"


def test_download_skips_broken_mirrors_and_verifies_md5(
    mirror_server: tuple[str, list[str]], no_local_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, requests = mirror_server
    refused = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    broken = ("missing", "not-http", "truncated", "corrupt")
    monkeypatch.setenv("MNIST_MIRRORS", ",".join([refused, *(f"{url}/{m}/" for m in broken), f"{url}/good/"]))

    test = mnist_data.load_split("test")  # resolves to the cache and downloads the two test files only

    cache = no_local_copy
    assert sorted(p.name for p in cache.iterdir()) == sorted([TEST_IMAGES, TEST_LABELS])  # no partial files
    assert len(test) == 10_000 and int(test.labels[0]) == 7
    # Each file: the 404, the non-HTTP answer, the dropped connection, the wrong bytes (MD5), then the good one.
    for name in (TEST_IMAGES, TEST_LABELS):
        tried = [r for r in requests if r.endswith(name)]
        assert tried == [f"/{mirror}/{name}" for mirror in (*broken, "good")]

    # All four files (what the trainers resolve): the training files are fetched, the cached ones are not.
    requests.clear()
    assert mnist_data.resolve_data_dir() == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES)
    for name, (md5, _, _) in FILES.items():
        assert mnist_data.md5_of(cache / name) == md5
    assert not [r for r in requests if r.endswith((TEST_IMAGES, TEST_LABELS))]

    # A second resolve finds the verified cache and downloads nothing.
    requests.clear()
    mnist_data.load_split("train")
    assert requests == []


def test_mirrors_argument_overrides_the_environment(
    mirror_server: tuple[str, list[str]], no_local_copy: Path
) -> None:
    url, requests = mirror_server  # $MNIST_MIRRORS is conftest's refusing address
    test = mnist_data.load_split("test", mirrors=[f"{url}/good"])  # no trailing slash needed
    assert len(test) == 10_000
    assert sorted(requests) == sorted([f"/good/{TEST_IMAGES}", f"/good/{TEST_LABELS}"])


def test_offline_error_says_how_to_use_local_files(no_local_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_MIRRORS", f"http://127.0.0.1:{free_port()}/mnist/")  # nothing listens: offline
    with pytest.raises(MnistDataError) as excinfo:
        mnist_data.load_split("test")
    message = str(excinfo.value)
    assert message.startswith(f"could not download {TEST_IMAGES} from any mirror; tried:\n")
    assert "Connection refused" in message
    assert "--data-dir DIR" in message and "MNIST_DATA_DIR=DIR" in message and "MNIST_MIRRORS=" in message
    assert TEST_IMAGES in message.split("local copies", 1)[1] and TEST_LABELS in message.split("local copies", 1)[1]


@pytest.mark.parametrize("entry", ["ftp://example.com/mnist/", "example.com/mnist", "https://"])
def test_malformed_mirror_list_is_a_clear_error(entry: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNIST_MIRRORS", f"https://ok.example/mnist/,{entry}")
    with pytest.raises(MnistDataError, match=re.escape(f"MNIST_MIRRORS entry {entry!r}: expected an http:// or")):
        mnist_data.download(tmp_path)
    with pytest.raises(MnistDataError, match=re.escape(f"mirrors {entry!r}: expected an http:// or")):
        mnist_data.download(tmp_path, mirrors=[entry])
    with pytest.raises(MnistDataError, match=re.escape("['emnist.gz']: not MNIST file names; expected some of")):
        mnist_data.download(tmp_path, mirrors=["https://ok.example/"], names=["emnist.gz"])


def test_download_replaces_a_corrupt_cached_file(
    mirror_server: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, requests = mirror_server
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / TEST_LABELS).write_bytes(b"truncated")
    mnist_data.download(cache, mirrors=[f"{url}/good/"])
    assert mnist_data.md5_of(cache / TEST_LABELS) == FILES[TEST_LABELS][0]
    assert f"/good/{TEST_LABELS}" in requests


def test_download_fails_clearly_when_every_mirror_fails(
    mirror_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = mirror_server
    with pytest.raises(MnistDataError) as excinfo:
        mnist_data.download(tmp_path / "cache", mirrors=[f"{url}/{m}/" for m in ("missing", "not-http", "corrupt")])
    message = str(excinfo.value)
    first = next(iter(FILES))
    assert message.startswith(f"could not download {first} from any mirror; tried:\n")
    assert f"{url}/missing/{first}: HTTP Error 404" in message
    assert f"{url}/not-http/{first}: BadStatusLine('SSH-2.0-OpenSSH_9.6" in message
    assert f"{url}/corrupt/{first}: MD5 " in message and f"expected {FILES[first][0]}" in message
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written


# --- clear errors ---------------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError, match=at(tmp_path / TEST_IMAGES) + r": file not found .*gzipped IDX"):
        mnist_data.read_idx(tmp_path / TEST_IMAGES)


def test_wrong_checksum_names_the_file_and_the_expected_md5(tmp_path: Path) -> None:
    path = write_idx(tmp_path / TEST_LABELS, 2049, (10_000,))
    expected = f": MD5 {mnist_data.md5_of(path)}, expected {FILES[TEST_LABELS][0]}"
    with pytest.raises(MnistDataError, match=at(path) + expected):
        mnist_data.read_idx(path)


def test_corrupt_gzip_is_reported(tmp_path: Path, real_dir: Path) -> None:
    path = tmp_path / TEST_LABELS
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(MnistDataError, match=at(path) + r": not a valid gzip file"):
        mnist_data.read_idx(path, verify_md5=False)
    # A truncated copy of the real file: valid gzip header, stream cut short.
    path.write_bytes((real_dir / TEST_LABELS).read_bytes()[:2000])
    with pytest.raises(MnistDataError, match=at(path) + r": not a valid gzip file"):
        mnist_data.read_idx(path, verify_md5=False)


def test_wrong_idx_magic_names_the_expected_one(tmp_path: Path) -> None:
    path = write_idx(tmp_path / TEST_LABELS, 2051, (10_000, 28, 28))  # an images header in a labels file
    with pytest.raises(MnistDataError, match=at(path) + r": IDX magic number 2051, expected 2049"):
        mnist_data.read_idx(path, verify_md5=False)


def test_wrong_idx_dimensions_name_the_expected_ones(tmp_path: Path) -> None:
    path = write_idx(tmp_path / TEST_IMAGES, 2051, (10_000, 32, 32))
    expected = r": IDX dimensions \(10000, 32, 32\), expected \(10000, 28, 28\)"
    with pytest.raises(MnistDataError, match=at(path) + expected):
        mnist_data.read_idx(path, verify_md5=False)


def test_truncated_payload_and_short_header_are_reported(tmp_path: Path) -> None:
    path = write_idx(tmp_path / TEST_LABELS, 2049, (10_000,), payload=bytes(9_999))
    with pytest.raises(MnistDataError, match=at(path) + r": 10007 bytes after gunzip, expected 10008"):
        mnist_data.read_idx(path, verify_md5=False)
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(MnistDataError, match=at(path) + r": 2 bytes, too short for an IDX header of 8 bytes"):
        mnist_data.read_idx(path, verify_md5=False)


def test_unknown_file_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError, match="not an MNIST file name; expected one of"):
        mnist_data.read_idx(tmp_path / "emnist-letters.gz")


def test_out_of_range_label_is_reported(tmp_path: Path) -> None:
    write_idx(tmp_path / TEST_IMAGES, 2051, (10_000, 28, 28))
    labels = np.zeros(10_000, dtype=np.uint8)
    labels[123] = 10
    write_idx(tmp_path / TEST_LABELS, 2049, (10_000,), payload=labels.tobytes())
    with pytest.raises(MnistDataError, match=at(tmp_path / TEST_LABELS) + r": label 10 found, expected 0..9"):
        mnist_data.load_split("test", tmp_path, verify_md5=False)
