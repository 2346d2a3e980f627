"""Install Python packages into an image's virtualenv at the versions the repository pins.

Runs during ``docker build`` (see the Dockerfiles) with the system Python and the standard library
only. Every package named must be pinned in ``requirements/constraints.txt`` (or listed in
``requirements/no-deps.txt``), so the images run exactly the versions the local virtualenv and the
tests run; a name without a pin is refused rather than installed at whatever version is newest.

Two names pick a build by ``--variant`` (build argument ``VARIANT``):

- ``torch``: ``gpu`` installs the pinned version from PyPI, which is PyTorch's CUDA build (its CUDA
  libraries arrive as ``nvidia-*`` wheels, so the host needs only the driver); ``cpu`` installs the
  ``+cpu`` build from PyTorch's CPU index (``--torch-cpu-index-url``).
- ``tensorflow``: ``gpu`` installs ``tensorflow[and-cuda]``, ``cpu`` installs ``tensorflow-cpu``,
  both at the version pinned for ``tensorflow-cpu``.

Packages listed in ``requirements/no-deps.txt`` are installed with ``--no-deps`` (that file says
why). Local wheels in ``--find-links`` (``docker/wheels/`` in the build context) are used before
any index, which is how a machine without access to PyTorch's index supplies the torch wheel.

Usage (inside a Dockerfile RUN)::

    python3 /tmp/pip_install.py torch numpy tensorboard tqdm
    python3 /tmp/pip_install.py --project-dependencies /tmp/clients/pyproject.toml
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("gpu", "cpu")
DEFAULT_TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
# A requirement as written in pyproject dependencies: name, optional [extras], optional specifier.
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


class PinError(ValueError):
    """A requested package has no pin in the repository's requirements."""


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name: ``Tensorflow_CPU`` -> ``tensorflow-cpu``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` from a file of ``name==version`` lines (comments ignored)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise PinError(f"{path}:{number}: {raw!r} is not an exact pin; expected NAME==VERSION")
        pins[normalize(name.split("[", 1)[0].strip())] = version.strip()
    return pins


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement string such as ``numpy>=1.24`` or ``grpcio[protobuf]``."""
    match = _REQUIREMENT.match(requirement)
    if not match:
        raise PinError(f"{requirement!r} is not a requirement; expected NAME[EXTRAS][SPECIFIER]")
    return match.group(1)


def project_dependencies(pyproject: Path, extras: Sequence[str] = ()) -> list[str]:
    """The ``[project] dependencies`` (plus the named optional-dependency groups) of a pyproject.toml."""
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise PinError(f"{pyproject}: no optional dependency group {extra!r}; it has {sorted(optional)}")
        requirements.extend(optional[extra])
    return requirements


@dataclass(frozen=True)
class Plan:
    """The pip commands that install the requested packages (without the interpreter prefix)."""

    constraints: str  # text of the constraints file the commands refer to as CONSTRAINTS
    commands: tuple[tuple[str, ...], ...]


def plan_install(
    requirements: Sequence[str],
    requirements_dir: Path,
    variant: str,
    torch_cpu_index_url: str,
    find_links: Path | None,
) -> Plan:
    """Resolve each requirement to a pinned spec and return the pip commands that install them."""
    if variant not in VARIANTS:
        raise PinError(f"variant {variant!r}; expected one of {VARIANTS}")
    pins = read_pins(requirements_dir / "constraints.txt")
    no_deps_pins = read_pins(requirements_dir / "no-deps.txt")

    specs: list[str] = []
    no_deps_specs: list[str] = []
    extra_index: list[str] = []
    for requirement in requirements:
        name = normalize(requirement_name(requirement))
        if name == "torch":
            version = _base_version(pins, "torch")
            if variant == "cpu":
                specs.append(f"torch=={version}+cpu")
                if torch_cpu_index_url:
                    extra_index = ["--extra-index-url", torch_cpu_index_url]
            else:
                specs.append(f"torch=={version}")
        elif name == "tensorflow":
            version = _base_version(pins, "tensorflow-cpu")
            specs.append(f"tensorflow[and-cuda]=={version}" if variant == "gpu" else f"tensorflow-cpu=={version}")
        elif name in no_deps_pins:
            no_deps_specs.append(f"{name}=={no_deps_pins[name]}")
        elif name in pins:
            specs.append(requirement)  # the constraints file fixes its version
        else:
            raise PinError(
                f"{requirement!r} is not pinned in {requirements_dir / 'constraints.txt'}; "
                "pin it there (and in requirements/main.txt) before installing it in an image"
            )

    # The CUDA build of torch is plain "X.Y.Z", which the local "+cpu" pin would refuse.
    constraint_lines = [
        line
        for line in (requirements_dir / "constraints.txt").read_text().splitlines()
        if not (variant == "gpu" and normalize(line.partition("==")[0].strip()) == "torch")
    ]
    links = ["--find-links", str(find_links)] if find_links is not None and any(find_links.glob("*.whl")) else []
    commands: list[tuple[str, ...]] = []
    if specs:
        commands.append(("install", "--constraint", "CONSTRAINTS", *links, *extra_index, *specs))
    if no_deps_specs:
        commands.append(("install", "--no-deps", *links, *no_deps_specs))
    return Plan(constraints="\n".join(constraint_lines) + "\n", commands=tuple(commands))


def _base_version(pins: dict[str, str], name: str) -> str:
    if name not in pins:
        raise PinError(f"{name} is not pinned in requirements/constraints.txt")
    return pins[name].split("+", 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("requirements", nargs="*", help="distribution names (or requirement strings) to install")
    parser.add_argument(
        "--project-dependencies",
        type=Path,
        metavar="PYPROJECT",
        help="also install the [project] dependencies of this pyproject.toml",
    )
    parser.add_argument("--extra", action="append", default=[], help="optional dependency group of that project")
    parser.add_argument("--variant", default=os.environ.get("VARIANT", "gpu"), help="gpu or cpu (default: $VARIANT)")
    parser.add_argument(
        "--torch-cpu-index-url",
        default=os.environ.get("TORCH_CPU_INDEX_URL", DEFAULT_TORCH_CPU_INDEX_URL),
        help="index holding the +cpu torch builds; empty: only PyPI and --find-links (default: $TORCH_CPU_INDEX_URL)",
    )
    parser.add_argument("--requirements-dir", type=Path, default=Path("/tmp/requirements"))
    parser.add_argument("--find-links", type=Path, default=Path("/tmp/wheels"), help="folder of local wheels")
    parser.add_argument("--python", default="/opt/venv/bin/python", help="interpreter of the target virtualenv")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = parser.parse_args(argv)

    requirements = list(args.requirements)
    try:
        if args.project_dependencies is not None:
            requirements += project_dependencies(args.project_dependencies, args.extra)
        if not requirements:
            parser.error("nothing to install: name packages or give --project-dependencies")
        plan = plan_install(
            requirements, args.requirements_dir, args.variant, args.torch_cpu_index_url, args.find_links
        )
    except (PinError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"pip_install: {exc}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as scratch:
        constraints = Path(scratch) / "constraints.txt"
        constraints.write_text(plan.constraints)
        for command in plan.commands:
            full = [args.python, "-m", "pip", *(str(constraints) if a == "CONSTRAINTS" else a for a in command)]
            print("+", shlex.join(full), flush=True)
            if not args.dry_run:
                returncode = subprocess.run(full, check=False).returncode
                if returncode != 0:
                    print(f"pip_install: pip failed (exit status {returncode}); see its messages above", file=sys.stderr)
                    return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
