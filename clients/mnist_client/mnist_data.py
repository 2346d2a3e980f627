"""MNIST from the four original gzipped IDX files: found, downloaded (MD5-checked, cached), parsed with numpy.

The one MNIST reader of the project: the trainers, the load tester and the web page all use it, and it
needs nothing but numpy and the standard library, so it travels with the client package.

Where the files come from, in order:

1. an explicit directory (``data_dir=``; the ``--data-dir`` flag of the trainers and of ``mnist-loadtest``),
2. the ``MNIST_DATA_DIR`` environment variable,
3. a shared copy, ``shared/data/mnist`` beside a directory above this package (how the project's own
   machines keep it: ``<checkout>/../shared/data/mnist``, seen from the editable install),
4. the download cache, ``$MNIST_CACHE_DIR/mnist`` (default ``~/.cache/mnist-serving/mnist``), filled from
   the mirrors (``MNIST_MIRRORS``, comma-separated base URLs, or ``mirrors=``, replace the built-in list),
   each file MD5-checked, trying the next mirror when one fails. Only the files asked for are fetched:
   the test split alone is 1.6 MB.

Every problem with a file (missing, corrupt gzip, wrong checksum, wrong IDX header) raises
:class:`MnistDataError` naming the file and what was expected; a download that no mirror can serve (no
network) says how to point the reader at local copies instead.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_client.contract import IMAGE_HEIGHT, IMAGE_WIDTH, NUM_CLASSES

log = logging.getLogger(__name__)

DATA_DIR_VARIABLE = "MNIST_DATA_DIR"
CACHE_DIR_VARIABLE = "MNIST_CACHE_DIR"
MIRRORS_VARIABLE = "MNIST_MIRRORS"

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# file name -> (MD5 of the .gz file, IDX magic number, item count)
FILES: dict[str, tuple[str, int, int]] = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 2051, 60000),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", 2049, 60000),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", 2051, 10000),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", 2049, 10000),
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_DOWNLOAD_TIMEOUT_S = 30.0


class MnistDataError(RuntimeError):
    """A data file is missing, corrupt, or not the MNIST file it claims to be."""


@dataclass(frozen=True)
class Split:
    """One MNIST split: uint8 images ``[N, 28, 28]`` and uint8 labels ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def scaled(self) -> np.ndarray:
        """Images as the model contract wants them: float32 pixel / 255."""
        return self.images.astype(np.float32) / np.float32(255.0)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_checksum(data_dir: Path) -> str:
    """One MD5 over the four files' MD5s, recorded in exported model metadata."""
    joined = "".join(md5_of(Path(data_dir) / name) for name in sorted(FILES))
    return hashlib.md5(joined.encode()).hexdigest()


def configured_mirrors(mirrors: Sequence[str] | None = None) -> list[str]:
    """The mirror base URLs to try, in order: ``mirrors``, else ``$MNIST_MIRRORS``, else the built-in list."""
    source = "mirrors"
    if mirrors is None:
        env = os.environ.get(MIRRORS_VARIABLE)
        mirrors = [m.strip() for m in env.split(",") if m.strip()] if env else list(DEFAULT_MIRRORS)
        source = f"{MIRRORS_VARIABLE} entry" if env else source
    for mirror in mirrors:
        parts = urllib.parse.urlsplit(mirror)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise MnistDataError(
                f"{source} {mirror!r}: expected an http:// or https:// base URL "
                "(comma-separated, e.g. https://host/mnist/)"
            )
    return [m if m.endswith("/") else m + "/" for m in mirrors]


def cache_dir() -> Path:
    """Where downloads go: ``$MNIST_CACHE_DIR/mnist``, default ``~/.cache/mnist-serving/mnist``."""
    return Path(os.environ.get(CACHE_DIR_VARIABLE, Path.home() / ".cache" / "mnist-serving")) / "mnist"


def shared_copy(names: Iterable[str] = FILES) -> Path | None:
    """``shared/data/mnist`` beside a directory above this package, if it holds ``names``."""
    names = list(names)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "mnist"
        if all((candidate / name).is_file() for name in names):
            return candidate
    return None


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None = None,
    names: Iterable[str] = FILES,
    mirrors: Sequence[str] | None = None,
) -> Path:
    """The directory to read ``names`` (default: all four files) from, downloading them into the cache if needed."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_VARIABLE)
    if env:
        return Path(env)
    names = list(names)
    shared = shared_copy(names)
    if shared is not None:
        return shared
    target = cache_dir()
    download(target, mirrors, names)
    return target


def download(target: Path, mirrors: Sequence[str] | None = None, names: Iterable[str] = FILES) -> None:
    """Fetch each of ``names`` that is missing or corrupt in ``target``, MD5-checked, mirror by mirror."""
    names = list(names)
    unknown = sorted(set(names) - set(FILES))
    if unknown:
        raise MnistDataError(f"{unknown}: not MNIST file names; expected some of {sorted(FILES)}")
    mirror_list = configured_mirrors(mirrors)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        md5 = FILES[name][0]
        dest = target / name
        if dest.is_file() and md5_of(dest) == md5:
            continue
        failures = []
        for mirror in mirror_list:
            url = mirror + name
            try:
                _fetch(url, dest, md5)
                log.info("downloaded %s from %s", name, mirror)
                break
            # HTTPException: a server that does not speak HTTP (e.g. BadStatusLine) is just a broken mirror.
            except (OSError, urllib.error.URLError, http.client.HTTPException, MnistDataError) as exc:
                detail = str(exc) if isinstance(exc, (urllib.error.URLError, MnistDataError)) else repr(exc)
                log.warning("mirror %s failed for %s: %s", mirror, name, detail)
                failures.append(f"{url}: {detail}")
        else:
            raise MnistDataError(
                f"could not download {name} from any mirror; tried:\n  "
                + "\n  ".join(failures)
                + f"\nWithout network, point the reader at local copies of the gzipped IDX files ({', '.join(names)}):"
                f" --data-dir DIR (trainers, mnist-loadtest) or {DATA_DIR_VARIABLE}=DIR; or name reachable mirrors"
                f" with {MIRRORS_VARIABLE}=URL[,URL...]"
            )


def _fetch(url: str, dest: Path, md5: str) -> None:
    # Write to a temporary file beside the target and rename it only once the
    # checksum matches, so an interrupted download never looks complete.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
        got = md5_of(tmp)
        if got != md5:
            raise MnistDataError(f"MD5 {got}, expected {md5}")  # the caller names the URL
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def read_idx(path: Path, verify_md5: bool = True) -> np.ndarray:
    """Parse one gzipped IDX file into a uint8 array, checking MD5 and header."""
    name = path.name
    if name not in FILES:
        raise MnistDataError(f"{path}: not an MNIST file name; expected one of {sorted(FILES)}")
    md5, magic, count = FILES[name]
    if not path.is_file():
        raise MnistDataError(
            f"{path}: file not found (expected the original gzipped IDX file {name}; --data-dir DIR or "
            f"{DATA_DIR_VARIABLE}=DIR names the directory that holds the MNIST files)"
        )
    if verify_md5:
        got = md5_of(path)
        if got != md5:
            raise MnistDataError(f"{path}: MD5 {got}, expected {md5}")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise MnistDataError(f"{path}: not a valid gzip file ({exc})") from exc

    ndim = 3 if magic == 2051 else 1
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise MnistDataError(f"{path}: {len(raw)} bytes, too short for an IDX header of {header_len} bytes")
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    got_magic, dims = int(header[0]), tuple(int(d) for d in header[1:])
    expected_dims = (count, IMAGE_HEIGHT, IMAGE_WIDTH) if ndim == 3 else (count,)
    if got_magic != magic:
        raise MnistDataError(f"{path}: IDX magic number {got_magic}, expected {magic}")
    if dims != expected_dims:
        raise MnistDataError(f"{path}: IDX dimensions {dims}, expected {expected_dims}")
    expected_len = header_len + int(np.prod(dims))
    if len(raw) != expected_len:
        raise MnistDataError(f"{path}: {len(raw)} bytes after gunzip, expected {expected_len}")
    # [N*28*28] -> [N, 28, 28] for images; labels stay [N]
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_split(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    verify_md5: bool = True,
    mirrors: Sequence[str] | None = None,
) -> Split:
    """Load ``"train"`` or ``"test"`` from the resolved data directory (downloading only that split's files)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    images_file, labels_file = SPLITS[split]
    directory = resolve_data_dir(data_dir, (images_file, labels_file), mirrors)
    images = read_idx(directory / images_file, verify_md5)
    labels = read_idx(directory / labels_file, verify_md5)
    if labels.max(initial=0) >= NUM_CLASSES:
        raise MnistDataError(f"{directory / labels_file}: label {labels.max()} found, expected 0..{NUM_CLASSES - 1}")
    return Split(images=images, labels=labels)


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> tuple[Split, Split]:
    """Both splits: ``(train, test)``."""
    return load_split("train", data_dir), load_split("test", data_dir)
