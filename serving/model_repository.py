"""The model repository layout: ``<base>/<version>/`` with positive integer versions.

TF Serving's convention, used by both frameworks. Training publishes a version
by writing it into a hidden temporary folder beside the versions and renaming
it into place, so a server polling the base path never sees a half-written
version. Servers serve the highest version and ignore anything whose name is
not a positive integer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_STAGING_PREFIX = ".staging-"


def model_base_path(models_root: str | os.PathLike[str], framework_dir: str, model_name: str) -> Path:
    """``<models_root>/<framework>/<model_name>``, e.g. ``models/torch/mnist``."""
    return Path(models_root) / framework_dir / model_name


def list_versions(base_path: str | os.PathLike[str]) -> list[int]:
    """The published versions under ``base_path``, ascending; ``[]`` if none or no folder."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    versions = []
    for entry in base.iterdir():
        name = entry.name
        if entry.is_dir() and name.isdigit() and int(name) > 0:
            versions.append(int(name))
    return sorted(versions)


def latest_version(base_path: str | os.PathLike[str]) -> int | None:
    versions = list_versions(base_path)
    return versions[-1] if versions else None


def next_version(base_path: str | os.PathLike[str]) -> int:
    latest = latest_version(base_path)
    return 1 if latest is None else latest + 1


@contextlib.contextmanager
def publish_version(base_path: str | os.PathLike[str], version: int | None = None) -> Iterator[tuple[Path, int]]:
    """Stage a new version and rename it into place when the block succeeds.

    Yields ``(staging_dir, version)``; write the model into ``staging_dir``.
    If the block raises, the staging folder is removed and nothing is published.
    """
    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = next_version(base)
    if version <= 0:
        raise ValueError(f"version {version}: expected a positive integer")
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; versions are immutable, choose another version")
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{version}-", dir=base))
    try:
        yield staging, version
        staging.chmod(0o755)  # mkdtemp makes 0700; servers may run as another user
        # os.rename of a directory is atomic on POSIX within one file system.
        os.rename(staging, final)
        log.info("published version %d at %s", version, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
