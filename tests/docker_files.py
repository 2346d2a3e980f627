"""Reading the repository's container build files for the static Docker tests (no tests here).

Dockerfiles are parsed into instructions and named stages (with the ENV and EXPOSE a stage inherits
from the stages it is built FROM), and ``docker/pip_install.py``, which the images run at build time,
is loaded as a module. Used by tests/test_docker_*.py.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
# Where this venv's console scripts (hadolint, check-jsonschema) live, found even when PATH lacks it.
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def instructions(dockerfile: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(dockerfile.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(pending)
        pending = []
        keyword, _, arguments = text.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip(), start))
    return result


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]


def stages(dockerfile: Path) -> dict[str, Stage]:
    """The Dockerfile's stages by name, in file order (every stage must be named)."""
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for instruction in instructions(dockerfile):
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", instruction.arguments, flags=re.IGNORECASE)
            assert match, f"{dockerfile.name}:{instruction.line}: every stage is named (FROM IMAGE AS NAME)"
            current = Stage(name=match.group(2), base=match.group(1), instructions=[])
            result[current.name] = current
        elif current is not None:
            current.instructions.append(instruction)
    return result


def stage_chain(all_stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it is built FROM, base first."""
    chain = []
    stage: Stage | None = all_stages[name]
    while stage is not None:
        chain.insert(0, stage)
        stage = all_stages.get(stage.base)
    return chain


def env_of(dockerfile: Path, stage: str) -> dict[str, str]:
    """The ENV variables a stage sets or inherits from its base stages."""
    env: dict[str, str] = {}
    for part in stage_chain(stages(dockerfile), stage):
        for instruction in part.instructions:
            if instruction.keyword == "ENV":
                for token in shlex.split(instruction.arguments):
                    key, _, value = token.partition("=")
                    env[key] = value
    return env


def exposed(dockerfile: Path, stage: str) -> set[int]:
    """The ports a stage EXPOSEs, its base stages' included."""
    ports: set[int] = set()
    for part in stage_chain(stages(dockerfile), stage):
        for instruction in part.instructions:
            if instruction.keyword == "EXPOSE":
                ports.update(int(p.split("/")[0]) for p in instruction.arguments.split())
    return ports


def load_pip_install() -> ModuleType:
    """docker/pip_install.py as a module (it is a script copied into the images, not a package)."""
    spec = importlib.util.spec_from_file_location("docker_pip_install", REPO / "docker" / "pip_install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
