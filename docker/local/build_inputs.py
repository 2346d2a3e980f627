"""Put the host's extra CA certificates and local wheels into the build context, as hard links, and take them out.

The Dockerfiles read two folders of the build context besides the code: ``docker/ca-certificates/``
(``*.crt`` the images trust, for pip behind a TLS-inspecting proxy) and ``docker/wheels/`` (wheels pip
takes before any index). Symbolic links do not reach into a build context, so this hard-links the files
there (copying only where a hard link is impossible, e.g. across file systems) and records exactly what
it created, so that :meth:`Staged.remove` deletes those and nothing else.

- CA certificates: the host's extra ones, ``/usr/local/share/ca-certificates/**/*.crt`` (where
  ``update-ca-certificates`` takes them from on Debian and Ubuntu).
- Wheels: for every version pinned in ``requirements/constraints.txt`` and ``requirements/no-deps.txt``,
  a wheel of exactly that version from the local sources pip is configured with (``find-links``
  folders and ``file://`` indexes, from ``pip config list``), if it installs in the images (CPython 3.11,
  glibc 2.36, this machine's architecture). Packages without a local wheel come from PyPI as usual.
"""

from __future__ import annotations

import errno
import html.parser
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.specifiers import SpecifierSet

log = logging.getLogger("compose-test.build-inputs")

REPO = Path(__file__).resolve().parents[2]
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# The images: Debian bookworm's python3 (3.11) and glibc (2.36).
IMAGE_PYTHON = (3, 11)
IMAGE_GLIBC = (2, 36)


def _load_pip_install():
    """docker/pip_install.py (the images' installer): the same pin reading the builds use."""
    spec = importlib.util.spec_from_file_location("pip_install", REPO / "docker" / "pip_install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pip_install = _load_pip_install()


# --- which wheels --------------------------------------------------------------------------------


def image_tags(arch: str | None = None) -> set[Tag]:
    """Wheel tags the images' interpreter accepts: CPython 3.11 on manylinux up to glibc 2.36."""
    arch = arch or platform.machine()
    platforms = [f"manylinux_{IMAGE_GLIBC[0]}_{minor}_{arch}" for minor in range(IMAGE_GLIBC[1], 4, -1)]
    legacy = {"x86_64": ["manylinux2014", "manylinux2010", "manylinux1"], "aarch64": ["manylinux2014"]}
    platforms += [f"{name}_{arch}" for name in legacy.get(arch, [])] + [f"linux_{arch}"]
    return set(cpython_tags(IMAGE_PYTHON, platforms=platforms)) | set(
        compatible_tags(IMAGE_PYTHON, interpreter="cp311", platforms=platforms)
    )


def pinned_versions(requirements_dir: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every pin the images install from."""
    pins = pip_install.read_pins(requirements_dir / "constraints.txt")
    pins.update(pip_install.read_pins(requirements_dir / "no-deps.txt"))
    return pins


def pip_local_sources(pip_config: str) -> tuple[list[Path], list[Path]]:
    """(find-links folders, file:// index roots) named in the output of ``pip config list``."""
    folders: list[Path] = []
    indexes: list[Path] = []
    for line in pip_config.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        option = key.rsplit(".", 1)[-1]
        if option not in ("find-links", "index-url", "extra-index-url"):
            continue
        for entry in shlex.split(raw.strip().strip("'\"")):
            local = _local_path(entry)
            if local is None or not local.is_dir():
                continue
            target = folders if option == "find-links" else indexes
            if local not in target:
                target.append(local)
    return folders, indexes


def _local_path(entry: str) -> Path | None:
    if entry.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(entry).path))
    if "://" in entry:
        return None
    return Path(entry)


def configured_pip_sources() -> tuple[list[Path], list[Path]]:
    """The local wheel sources of the pip that set up this virtualenv (config files and PIP_* variables)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False, timeout=60
    )
    return pip_local_sources(result.stdout)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def index_wheels(index_root: Path, name: str) -> Iterator[Path]:
    """Wheels a PEP 503 ``file://`` index lists for ``name`` (its page's links, or its folder's files)."""
    project = index_root / canonicalize_name(name)
    page = project / "index.html"
    if page.is_file():
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        for href in parser.hrefs:
            path = urllib.parse.unquote(urllib.parse.urlsplit(href).path)
            if path.endswith(".whl"):
                yield (project / path).resolve() if not path.startswith("/") else Path(path)
    elif project.is_dir():
        yield from project.glob("*.whl")


def find_local_wheels(
    pins: dict[str, str], folders: Iterable[Path], indexes: Iterable[Path], tags: set[Tag]
) -> dict[str, Path]:
    """``{name: wheel}``: per pin, the first local wheel of that version (any build label) installing in the images."""
    folders, indexes = list(folders), list(indexes)
    by_name: dict[str, list[Path]] = {}
    for folder in folders:
        for wheel in folder.glob("*.whl"):
            try:
                name = parse_wheel_filename(wheel.name)[0]
            except InvalidWheelFilename:
                continue
            by_name.setdefault(name, []).append(wheel)
    found: dict[str, Path] = {}
    for name, version in pins.items():
        candidates = by_name.get(name, []) + [w for root in indexes for w in index_wheels(root, name)]
        for wheel in candidates:
            try:
                _, wheel_version, _, wheel_tags = parse_wheel_filename(wheel.name)
            except InvalidWheelFilename:
                continue
            # PEP 440 matching: the pin torch==2.13.0 accepts the local build 2.13.0+cpu.
            if SpecifierSet(f"=={version}").contains(wheel_version) and wheel_tags & tags and wheel.is_file():
                found[name] = wheel
                break
    return found


def host_ca_certificates(ca_dir: Path = HOST_CA_DIR) -> list[Path]:
    return sorted(p for p in ca_dir.rglob("*.crt") if p.is_file()) if ca_dir.is_dir() else []


# --- hard links in, and out again ----------------------------------------------------------------


@dataclass
class Staged:
    """Files put into the build context by :func:`stage`; :meth:`remove` deletes exactly those."""

    created: list[Path] = field(default_factory=list)
    wheels: dict[str, Path] = field(default_factory=dict)  # name -> path in docker/wheels
    certificates: list[Path] = field(default_factory=list)
    copied_bytes: int = 0  # bytes copied where a hard link was impossible

    @property
    def has_torch(self) -> bool:
        return "torch" in self.wheels

    def remove(self) -> None:
        for path in reversed(self.created):
            path.unlink(missing_ok=True)
        self.created.clear()


def _link(source: Path, target: Path, staged: Staged) -> bool:
    """Hard-link (else copy) ``source`` to ``target``; False when ``target`` already exists (left alone)."""
    if target.exists():
        return False
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(source, target)
        staged.copied_bytes += target.stat().st_size
    staged.created.append(target)
    return True


def stage(
    repo: Path,
    wheels: dict[str, Path],
    certificates: Iterable[Path],
) -> Staged:
    """Link the wheels into ``docker/wheels/`` and the certificates into ``docker/ca-certificates/``."""
    staged = Staged()
    wheel_dir, ca_dir = repo / "docker" / "wheels", repo / "docker" / "ca-certificates"
    try:
        for name, wheel in sorted(wheels.items()):
            target = wheel_dir / wheel.name
            _link(wheel, target, staged)
            staged.wheels[name] = target
        for certificate in certificates:
            # The images read the folder's top level only (docker/ca-certificates/*.crt).
            target = ca_dir / certificate.name
            if _link(certificate, target, staged):
                staged.certificates.append(target)
    except BaseException:
        staged.remove()
        raise
    return staged


def stage_host_inputs(repo: Path = REPO) -> Staged:
    """Stage this host's extra CA certificates and its local wheels of the pinned versions."""
    folders, indexes = configured_pip_sources()
    pins = pinned_versions(repo / "requirements")
    wheels = find_local_wheels(pins, folders, indexes, image_tags())
    staged = stage(repo, wheels, host_ca_certificates())
    size = sum(p.stat().st_size for p in staged.wheels.values())
    log.info(
        "build context: %d of %d pinned packages as local wheels (%.0f MB, from %s), %d CA certificate(s)%s",
        len(staged.wheels),
        len(pins),
        size / 1e6,
        ", ".join(str(p) for p in [*folders, *indexes]) or "no local source",
        len(staged.certificates),
        f"; copied {staged.copied_bytes / 1e6:.0f} MB where a hard link was impossible" if staged.copied_bytes else "",
    )
    return staged
