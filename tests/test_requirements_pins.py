"""Every pin resolves on the public PyPI alone; the CPU-only torch build is one opt-in make switch.

A pin with a local version label (``torch==2.13.0+cpu``) exists only on the index that built it, a URL
or an index option ties the install to one source: either makes ``make setup`` fail on a machine that
has only PyPI. The stack's requirements pin exact versions; the client package declares ranges.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT_FILES = sorted((REPO_ROOT / "requirements").glob("*.txt"))
CLIENT_PYPROJECT = REPO_ROOT / "clients" / "pyproject.toml"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pypi_only_problems(requirement: str) -> list[str]:
    """Why ``requirement`` could not be installed from PyPI alone (empty: it can)."""
    if requirement.startswith("-"):
        return [f"{requirement!r}: a pip option (index, find-links, editable) ties setup to one package source"]
    try:
        parsed = Requirement(requirement)
    except InvalidRequirement as exc:
        return [f"{requirement!r}: not a requirement ({exc})"]
    problems = []
    if parsed.url:
        problems.append(f"{requirement!r}: a direct URL, not a PyPI release")
    for specifier in parsed.specifier:
        if specifier.version.endswith(".*"):
            continue
        local = Version(specifier.version).local
        if local is not None:
            problems.append(f"{requirement!r}: local version label '+{local}', which PyPI does not carry")
    return problems


def requirement_lines(path: Path) -> list[tuple[int, str]]:
    lines = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append((number, line))
    return lines


def client_requirements() -> list[str]:
    project = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return list(project["dependencies"]) + [r for group in extras.values() for r in group]


def test_the_checker_flags_what_pypi_lacks() -> None:
    assert pypi_only_problems("torch==2.13.0") == []
    assert pypi_only_problems("numpy>=1.24") == []
    assert "local version label '+cpu'" in pypi_only_problems("torch==2.13.0+cpu")[0]
    assert "direct URL" in pypi_only_problems("torch @ https://download.pytorch.org/whl/cpu/torch.whl")[0]
    assert "pip option" in pypi_only_problems(f"--extra-index-url {TORCH_CPU_INDEX}")[0]
    assert "pip option" in pypi_only_problems("--find-links /opt/wheels")[0]


@pytest.mark.parametrize("path", REQUIREMENT_FILES, ids=lambda p: p.name)
def test_stack_pins_are_exact_and_on_pypi(path: Path) -> None:
    problems = []
    for number, line in requirement_lines(path):
        line_problems = pypi_only_problems(line)
        if not line_problems:
            specifiers = list(Requirement(line).specifier)
            if len(specifiers) != 1 or specifiers[0].operator != "==":
                line_problems.append(f"{line!r} is not an exact pin; expected NAME==VERSION")
        problems += [f"{path.name}:{number}: {p}" for p in line_problems]
    assert requirement_lines(path), f"{path} pins nothing"
    assert not problems, "\n".join(problems)


def test_client_package_dependencies_are_on_pypi() -> None:
    requirements = client_requirements()
    problems = [p for r in requirements for p in pypi_only_problems(r)]
    assert requirements and not problems, "\n".join(problems)


def _setup_commands(*make_args: str) -> str:
    """The commands ``make setup`` would run for a fresh venv (dry run: nothing is installed)."""
    result = subprocess.run(
        ["make", "--dry-run", "--always-make", "setup", *make_args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_setup_uses_pypi_unless_the_cpu_build_is_asked_for() -> None:
    default = _setup_commands()
    assert "-r requirements/main.txt" in default
    assert "index-url" not in default and "find-links" not in default
    cpu = _setup_commands("TORCH=cpu")
    install = next(line for line in cpu.splitlines() if "-r requirements/main.txt" in line)
    assert f"--extra-index-url {TORCH_CPU_INDEX}" in install  # beside PyPI, not instead of it


def test_an_unknown_torch_build_is_refused_with_the_accepted_value() -> None:
    result = subprocess.run(
        ["make", "--dry-run", "setup", "TORCH=cu999"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "TORCH=cu999: expected TORCH=cpu" in result.stderr
