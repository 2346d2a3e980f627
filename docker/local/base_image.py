"""The local base image of the Python images: Debian with python3, made with debootstrap, or reused.

Where no image can be pulled, the images' ``PYTHON_IMAGE`` build argument points at this one instead
of the official ``python:3.11.14-slim-bookworm``. It holds what the Dockerfiles need of a base:
``python3`` (3.11, the wheels' ABI) with ``venv``, ``ca-certificates`` (``update-ca-certificates``),
``useradd``/``groupadd``; ``debootstrap --variant=minbase`` from a Debian mirror makes it in about a
minute, and ``docker import`` turns the tree into an image. The package downloads and lists are
removed before the import (they are a third of the tree).

Usage: ``ensure_base_image(engine_env, tag, work_dir)``; an existing image with that tag is reused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from host_engine import EngineUnavailable, install_packages, run_process_group, unmount_under

log = logging.getLogger("compose-test.base-image")

DEFAULT_TAG = "mnist-local/debian-python:bookworm"
SUITE = "bookworm"  # Python 3.11: the ABI of the pinned wheels (cp311)
PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The host's apt sources: one-line (deb URI suite ...) and deb822 (URIs: ...) formats.
_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_DEBIAN_URI = re.compile(r"(?:^deb(?:\s+\[[^\]]*\])?\s+|^URIs:\s*)(\S+/debian)/?(?:\s|$)", flags=re.M)


class BaseImageError(RuntimeError):
    """The base image could not be made; the message holds the tool's last lines."""


def image_exists(env: Mapping[str, str], tag: str) -> bool:
    result = subprocess.run(["docker", "image", "inspect", tag], env=dict(env), capture_output=True, check=False)
    return result.returncode == 0


def host_debian_mirror(sources: tuple[Path, ...] = _SOURCES) -> str | None:
    """The first Debian archive URI (``.../debian``, not ``debian-security``) in the host's apt sources."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.is_file():
            files.append(source)
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        match = _DEBIAN_URI.search(text)
        if match:
            return match.group(1)
    return None


def debian_mirror() -> str:
    """``COMPOSE_TEST_DEBIAN_MIRROR``, else the host's own Debian mirror, else deb.debian.org."""
    return os.environ.get("COMPOSE_TEST_DEBIAN_MIRROR") or host_debian_mirror() or DEFAULT_MIRROR


def debootstrap_command(rootfs: Path, mirror: str, suite: str = SUITE) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        suite,
        str(rootfs),
        mirror,
    ]


def slim(rootfs: Path) -> None:
    """Drop the downloaded packages and package lists; the sources stay, so an image build that needs a
    Debian package (Dockerfile.torch's nginx) runs `apt-get update` first, from the same mirror."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for path in rootfs.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def import_command(tag: str, mirror: str) -> list[str]:
    changes = [
        f"ENV PATH={BASE_PATH}",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
        f'LABEL org.opencontainers.image.description="Debian {SUITE} minbase with python3, debootstrap from {mirror}"',
    ]
    command = ["docker", "import"]
    for change in changes:
        command += ["--change", change]
    return [*command, "-", tag]


def ensure_base_image(env: Mapping[str, str], tag: str, work_dir: Path) -> bool:
    """Make the base image unless ``tag`` exists; True when it was made now, False when reused."""
    if image_exists(env, tag):
        log.info("reusing the base image %s", tag)
        return False
    if os.geteuid() != 0:
        raise EngineUnavailable(f"the base image {tag} does not exist, and making it with debootstrap needs root")
    needed = {"debootstrap": "debootstrap"}
    install_packages(needed, "making the base image")
    if not DEBIAN_KEYRING.exists():
        install_packages({str(DEBIAN_KEYRING): "debian-archive-keyring"}, "checking Debian's archive signatures")
    mirror = debian_mirror()
    work_dir.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work_dir))
    started = time.monotonic()
    try:
        command = debootstrap_command(rootfs, mirror)
        log.info("making %s: %s", tag, " ".join(command))
        result = run_process_group(command)
        if result.returncode != 0:
            tail = "\n".join(result.stdout.strip().splitlines()[-10:])
            raise BaseImageError(f"debootstrap failed (exit status {result.returncode}) from {mirror}:\n{tail}")
        unmount_under(rootfs)  # debootstrap unmounts /proc and /sys itself; this covers an interrupted one
        slim(rootfs)
        with subprocess.Popen(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        ) as tar:
            imported = subprocess.run(
                import_command(tag, mirror),
                stdin=tar.stdout,
                env=dict(env),
                capture_output=True,
                text=True,
                check=False,
            )
            assert tar.stdout is not None
            tar.stdout.close()
        if tar.returncode != 0 or imported.returncode != 0:
            raise BaseImageError(f"docker import of {rootfs} failed: {imported.stderr.strip() or 'tar failed'}")
    finally:
        unmount_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)
    log.info("made the base image %s in %.0f s", tag, time.monotonic() - started)
    return True
