"""Offline checks of the local compose override and of the compose test's pieces (no Docker engine needed).

docker-compose.local.yml must resolve with Compose and validate against the compose-spec schema, and
change the real stack only where a machine without a registry needs it: the base-image build
arguments, the build network and the image tags of every built service, and for tf-serving the image
(the TF Serving stand-in) and its healthcheck; it publishes TF Serving's ports. The stand-in's
entrypoint must pass TF Serving's own flags, and its healthcheck must tell a serving stand-in from one
that is not. The helpers of ``make compose-test`` (docker/local/*.py) are tested on real files.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_client import contract
from stack.processes import free_port
from training import recipe

REPO = Path(__file__).resolve().parent.parent
LOCAL_DIR = REPO / "docker" / "local"
sys.path.insert(0, str(LOCAL_DIR))

import base_image  # noqa: E402
import build_inputs  # noqa: E402
import compose_test  # noqa: E402
import host_engine  # noqa: E402
import stack_checks  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
LOCAL_OVERRIDE = REPO / "docker-compose.local.yml"
STANDIN_DOCKERFILE = LOCAL_DIR / "tfs-standin.Dockerfile"
BIN = Path(sys.executable).parent
BUILT_SERVICES = ("torch-train", "tf-train", "torch-rest", "tf-serving", "web", "loadtest")


def resolved(*files: Path, env: dict[str, str] | None = None) -> dict:
    """``docker compose config`` (all profiles) of the files, with none of their variables set."""
    clean = {k: v for k, v in os.environ.items() if k not in compose_test.compose_variables(files)}
    clean = {k: v for k, v in clean.items() if not k.startswith("COMPOSE_")}
    command = [str(compose_test.compose_binary())]
    for file in files:
        command += ["-f", str(file)]
    result = subprocess.run(
        [*command, "--profile", "*", "config", "--format", "json"],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cpu_config() -> dict:
    return resolved(COMPOSE_FILE, CPU_OVERRIDE)


@pytest.fixture(scope="module")
def local_config() -> dict:
    return resolved(COMPOSE_FILE, CPU_OVERRIDE, LOCAL_OVERRIDE)


# --- the override --------------------------------------------------------------------------------


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_override_and_merged_stack_match_the_compose_spec_schema(tmp_path: Path, local_config: dict) -> None:
    # `!override` is a Compose merge directive, not data: the schema is checked on the document
    # without the tag, and on the merged configuration Compose resolves from the three files.
    text = LOCAL_OVERRIDE.read_text()
    assert "!override" in text
    untagged = tmp_path / LOCAL_OVERRIDE.name
    untagged.write_text(text.replace("!override", ""))
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps(local_config))
    for path in (untagged, merged):
        result = _check_jsonschema(path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_standin_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "info", str(STANDIN_DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _without(service: dict, *keys: str) -> dict:
    service = copy.deepcopy(service)
    for key in keys:
        service.pop(key, None)
    return service


def test_override_keeps_every_service_but_its_build_and_image(cpu_config: dict, local_config: dict) -> None:
    assert set(local_config["services"]) == set(cpu_config["services"])
    for name, local in local_config["services"].items():
        real = cpu_config["services"][name]
        changed = {
            "tf-serving": ("build", "image", "healthcheck", "ports"),
            "web": ("build", "image", "environment"),  # the stand-in's target names
        }.get(name, ("build", "image"))
        assert _without(local, *changed) == _without(real, *changed), f"{name}: changed beyond {changed}"
    for key in ("volumes", "networks"):
        assert local_config.get(key) == cpu_config.get(key)


def test_python_images_only_change_base_network_and_tag(cpu_config: dict, local_config: dict) -> None:
    for name in ("torch-train", "tf-train", "torch-rest", "web", "loadtest"):
        real, local = cpu_config["services"][name], local_config["services"][name]
        assert local["image"] == real["image"] + "-local", name
        assert local["build"]["network"] == "host", name
        assert local["build"]["args"]["PYTHON_IMAGE"] == base_image.DEFAULT_TAG, name
        added = set(local["build"]["args"]) - set(real["build"].get("args", {}))
        expected = {"PYTHON_IMAGE", "TORCH_CPU_INDEX_URL"} if name.startswith("torch") else {"PYTHON_IMAGE"}
        assert added == expected, name
        if name.startswith("torch"):
            assert local["build"]["args"]["TORCH_CPU_INDEX_URL"] == "", "local wheels only, by default"
        for key in ("context", "dockerfile", "target"):
            assert local["build"].get(key) == real["build"].get(key), f"{name}: build.{key}"


def test_base_image_and_torch_index_follow_their_variables() -> None:
    config = resolved(
        COMPOSE_FILE,
        CPU_OVERRIDE,
        LOCAL_OVERRIDE,
        env={"MNIST_LOCAL_BASE_IMAGE": "example/base:1", "MNIST_LOCAL_TORCH_CPU_INDEX_URL": "https://cpu.example/"},
    )
    assert config["services"]["torch-rest"]["build"]["args"]["PYTHON_IMAGE"] == "example/base:1"
    assert config["services"]["torch-train"]["build"]["args"]["TORCH_CPU_INDEX_URL"] == "https://cpu.example/"


def test_tf_serving_runs_the_standin_on_tf_servings_ports(cpu_config: dict, local_config: dict) -> None:
    real, local = cpu_config["services"]["tf-serving"], local_config["services"]["tf-serving"]
    assert local["build"]["dockerfile"] == "docker/local/tfs-standin.Dockerfile"
    assert local["build"]["args"] == {"TF_TRAIN_IMAGE": local_config["services"]["tf-train"]["image"]}
    assert local["image"].startswith("mnist-tfs-standin:")
    assert local["ports"] == real["ports"], "the same gRPC and REST ports, address and protocol as TF Serving"
    assert sorted(p["target"] for p in local["ports"]) == [contract.TFS_GRPC_PORT, contract.TFS_REST_PORT]
    assert local["volumes"] == real["volumes"], "the same models volume, read-only"
    assert local["depends_on"] == real["depends_on"], "the standin is built on tf-train's image, after it"


def test_standin_healthcheck_is_the_images_and_keeps_the_timing(cpu_config: dict, local_config: dict) -> None:
    real, local = (
        cpu_config["services"]["tf-serving"]["healthcheck"],
        local_config["services"]["tf-serving"]["healthcheck"],
    )
    assert _without(local, "test") == _without(real, "test")
    healthchecks = [line for line in STANDIN_DOCKERFILE.read_text().splitlines() if line.startswith("HEALTHCHECK")]
    (line,) = healthchecks
    assert json.loads(line.split(" CMD ", 1)[1]) == local["test"][1:]
    assert f"COPY docker/local/tfs-standin-healthcheck.py {local['test'][-1]}" in STANDIN_DOCKERFILE.read_text()


def test_standin_dockerfile_copies_existing_files_and_extends_tf_train(local_config: dict) -> None:
    text = STANDIN_DOCKERFILE.read_text()
    default = next(line for line in text.splitlines() if line.startswith("ARG TF_TRAIN_IMAGE="))
    assert default.partition("=")[2] == local_config["services"]["tf-train"]["image"]
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (REPO / source).exists(), f"{STANDIN_DOCKERFILE.name}: {source} is not in the repository"


# --- the stand-in's flags and healthcheck --------------------------------------------------------


def entrypoint_flags(script: Path, env: dict[str, str]) -> dict[str, str]:
    """``{flag: value}`` the entrypoint's exec line passes, with its ``${VAR:?message}`` expanded from ``env``."""
    text = script.read_text().replace("\\\n", " ")
    (exec_line,) = [line for line in text.splitlines() if line.strip().startswith("exec ")]
    exec_line = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: env[m.group(1)], exec_line)
    return dict(word.partition("=")[::2] for word in shlex.split(exec_line) if word.startswith("--"))


ENTRYPOINT_ENV = {"TFS_GRPC_PORT": "8500", "TFS_REST_PORT": "8501", "TFS_BATCHING_PARAMETERS_FILE": "/b.txt"}


def test_standin_passes_tf_servings_flags_except_the_one_it_refuses() -> None:
    real = entrypoint_flags(REPO / "docker" / "tfserving-entrypoint.sh", ENTRYPOINT_ENV)
    standin = entrypoint_flags(LOCAL_DIR / "tfs-standin-entrypoint.sh", ENTRYPOINT_ENV)
    assert real.pop("--monitoring_config_file"), "the stand-in serves no Prometheus metrics"
    assert standin == real
    assert standin["--rest_api_port"] == "8501"


def _dockerfile_lines(path: Path) -> list[str]:
    """The Dockerfile's lines with continuations joined."""
    return path.read_text().replace("\\\n", " ").splitlines()


def _image_env(name: str) -> str:
    """The value the stand-in Dockerfile's ENV gives ``name``."""
    for line in _dockerfile_lines(STANDIN_DOCKERFILE):
        if line.startswith("ENV "):
            for word in shlex.split(line)[1:]:
                key, _, value = word.partition("=")
                if key == name:
                    return value
    raise AssertionError(f"{STANDIN_DOCKERFILE.name} sets no ENV {name}")


def _copied_to_etc_tfserving() -> set[str]:
    names = set()
    for line in _dockerfile_lines(STANDIN_DOCKERFILE):
        words = shlex.split(line) if line.startswith("COPY ") else []
        if words and words[-1] == "/etc/tfserving/":
            names |= {Path(source).name for source in words[1:-1]}
    return names


def test_standin_accepts_those_flags_with_the_files_its_image_holds() -> None:
    from serving.tfs_standin.flags import FlagError, parse_flags

    image_env = {name: _image_env(name) for name in ("TFS_GRPC_PORT", "TFS_REST_PORT", "TFS_BATCHING_PARAMETERS_FILE")}
    flags = entrypoint_flags(LOCAL_DIR / "tfs-standin-entrypoint.sh", image_env)
    copied = _copied_to_etc_tfserving()
    for name, value in flags.items():
        if value.startswith("/etc/tfserving/"):
            assert Path(value).name in copied, f"{name}={value}: the image does not hold that file"
            flags[name] = str(REPO / "serving" / "tfserving" / Path(value).name)
    options = parse_flags([f"{name}={value}" for name, value in flags.items()])
    assert (options.port, options.rest_api_port) == (contract.TFS_GRPC_PORT, contract.TFS_REST_PORT)
    assert options.enable_batching
    given = [f"{name}={value}" for name, value in flags.items()]
    monitoring = REPO / "serving" / "tfserving" / "monitoring.config"
    with pytest.raises(FlagError, match="does not support"):
        parse_flags([*given, f"--monitoring_config_file={monitoring}"])


def run_healthcheck(port: int | None) -> subprocess.CompletedProcess:
    """The stand-in image's healthcheck script against ``port`` (None: TFS_GRPC_PORT left unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFS_")}
    if port is not None:
        env.update(TFS_GRPC_PORT=str(port), TFS_MODEL_NAME=contract.MODEL_NAME, TFS_HEALTHCHECK_TIMEOUT_S="3")
    return subprocess.run(
        [sys.executable, str(LOCAL_DIR / "tfs-standin-healthcheck.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_healthcheck_is_healthy_once_a_version_serves(model_repo: Path, tmp_path: Path) -> None:
    from serving.tfs_standin.flags import ServerOptions
    from serving.tfs_standin.server import ModelServer

    empty = tmp_path / "empty"
    empty.mkdir()
    for base_path, healthy in ((empty, False), (model_repo / "tf" / "mnist", True)):
        options = ServerOptions(port=0, standin_host="127.0.0.1", model_name="mnist", model_base_path=str(base_path))
        with ModelServer(options) as server:
            if healthy:
                # Versions load in the background; while one is LOADING the check rightly says unhealthy.
                server.wait_until_available(timeout=120)
            result = run_healthcheck(server.port)
        assert (result.returncode == 0) is healthy, result.stdout + result.stderr
        assert ("healthy: model mnist version(s) [1]" in result.stdout) is healthy


def test_healthcheck_is_unhealthy_when_nothing_listens() -> None:
    result = run_healthcheck(free_port())
    assert result.returncode == 1
    assert "unhealthy: GetModelStatus(mnist)" in result.stderr


def test_healthcheck_explains_a_missing_port() -> None:
    result = run_healthcheck(None)
    assert result.returncode == 1
    assert "TFS_GRPC_PORT is ''" in result.stderr


# --- make compose-test: its pieces ---------------------------------------------------------------


def test_makefile_runs_the_compose_test() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "compose-test" in makefile.split(".PHONY:", 1)[1].splitlines()[0]
    recipe = makefile.split("\ncompose-test:", 1)[1].split("\n\n", 1)[0]
    assert "docker/local/compose_test.py" in recipe


def test_training_settings_reach_each_trainer(local_config: dict) -> None:
    env = {"MNIST_TORCH_EPOCHS": "1", "MNIST_TF_EPOCHS": "2", "MNIST_TORCH_THREADS": "1", "MNIST_TF_THREADS": "1"}
    config = resolved(COMPOSE_FILE, CPU_OVERRIDE, LOCAL_OVERRIDE, env=env)
    for service, option, value, default in (
        ("torch-train", "--epochs", "1", str(recipe.DEFAULT_EPOCHS)),
        ("tf-train", "--epochs", "2", str(recipe.DEFAULT_EPOCHS)),
        ("torch-train", "--num-threads", "1", "0"),
        ("tf-train", "--num-threads", "1", "0"),
    ):
        command = config["services"][service]["command"]
        assert command[command.index(option) + 1] == value, service
        unset = local_config["services"][service]["command"]
        assert unset[unset.index(option) + 1] == default, f"{service} {option}: the trainer's own default"


def test_loadtest_arguments_shorten_the_services_own_command(local_config: dict) -> None:
    command = local_config["services"]["loadtest"]["command"]
    arguments = stack_checks.loadtest_arguments(command, 2.5, "compose-test-loadtest")
    assert arguments[arguments.index("--duration") + 1] == "2.5"
    assert arguments[arguments.index("--json") + 1] == "/reports/compose-test-loadtest.json"
    assert arguments[arguments.index("--html") + 1] == "/reports/compose-test-loadtest.html"
    assert len(arguments) == len(command)
    changed = {i for i, (a, b) in enumerate(zip(command, arguments, strict=True)) if a != b}
    assert len(changed) == 4, "only the duration and the three report paths"
    assert stack_checks.expected_targets(arguments) == ["torch-rest", "tf-serving-rest", "tf-serving-grpc"]
    assert compose_test.host_path(stack_checks.report_path_in_container(arguments), local_config) == (
        REPO / "reports" / "compose-test-loadtest.json"
    )
    with pytest.raises(stack_checks.CheckFailed, match="--duration"):
        stack_checks.loadtest_arguments(["run", "--rest", "x=http://x"], 1, "r")


def _report(path: Path, target_results: dict[str, tuple[int, int, int]]) -> Path:
    """A real result file: per target (answered, failed, correct) at one sweep point, one image each."""
    from collections import Counter

    from mnist_client.loadtest.report import Report
    from mnist_client.loadtest.stats import Measurement

    measurements = []
    for target, (ok, failed, correct) in target_results.items():
        m = Measurement(target=target, protocol="rest", address="x", mode="closed", point=1.0, images_per_request=1)
        m.ok, m.images, m.correct = ok, ok, correct
        m.errors = Counter({"unavailable": failed}) if failed else Counter()
        measurements.append(m)
    return Report(measurements=measurements).save(path)


def test_check_report_passes_a_good_run_and_names_each_problem(tmp_path: Path) -> None:
    targets = ["pytorch-rest", "tfserving-grpc"]
    good = _report(tmp_path / "good.json", {"pytorch-rest": (100, 0, 99), "tfserving-grpc": (100, 0, 98)})
    assert stack_checks.check_report(good, targets) == []
    bad = _report(tmp_path / "bad.json", {"pytorch-rest": (100, 3, 99), "other": (10, 0, 10)})
    problems = stack_checks.check_report(bad, targets)
    assert problems == [
        "pytorch-rest: 3 of 103 requests failed",
        "tfserving-grpc: not in the report (it holds ['pytorch-rest', 'other'])",
    ]
    low = _report(tmp_path / "low.json", {"pytorch-rest": (100, 0, 97), "tfserving-grpc": (0, 5, 0)})
    assert stack_checks.check_report(low, targets) == [
        "pytorch-rest: served accuracy 0.9700 < 0.98",
        "tfserving-grpc: no request answered",
        "tfserving-grpc: 5 of 5 requests failed",
        "tfserving-grpc: served accuracy none < 0.98",
    ]
    (tmp_path / "junk.json").write_text("{}")
    assert "expected a load-test result" in stack_checks.check_report(tmp_path / "junk.json", targets)[0]


def test_free_loopback_address_skips_an_address_whose_port_is_taken() -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert compose_test.free_loopback_address([port], ["127.0.0.1", "127.0.0.2"]) == "127.0.0.2"
        assert compose_test.free_loopback_address([port], ["127.0.0.1"]) is None


def test_published_ports_are_the_servers_and_the_page(local_config: dict) -> None:
    assert compose_test.published_ports(local_config) == [
        contract.WEB_PORT, contract.REST_PORT, contract.TFS_GRPC_PORT, contract.TFS_REST_PORT
    ]


def test_web_page_names_the_standin_for_what_it_is(cpu_config: dict, local_config: dict) -> None:
    from serving.web.config import WebConfig

    def targets(config: dict) -> list[tuple[str, str, str]]:
        environment = {k: str(v) for k, v in config["services"]["web"]["environment"].items()}
        return [(t.name, t.protocol, t.address) for t in WebConfig.load(environ=environment).targets()]

    assert targets(local_config) == [
        ("torch-rest", "rest", f"http://torch-rest:{contract.REST_PORT}"),
        ("tf-standin-rest", "rest", f"http://tf-serving:{contract.TFS_REST_PORT}"),
        ("tf-standin-grpc", "grpc", f"tf-serving:{contract.TFS_GRPC_PORT}"),
    ]
    assert [name for name, _, _ in targets(cpu_config)] == ["torch-rest", "tf-serving-rest", "tf-serving-grpc"]


def test_the_local_run_names_the_standin_for_what_answers() -> None:
    """Under `make compose-test` the tf-serving service runs the stand-in, so its targets say so."""
    files = [COMPOSE_FILE, CPU_OVERRIDE, LOCAL_OVERRIDE]
    args = compose_test.parse_args([])
    env = compose_test.stack_env({}, files, args, build_inputs.Staged())
    assert env["MNIST_TF_SERVER_NAME"] == "tf-standin"
    config = resolved(*files, env={"MNIST_TF_SERVER_NAME": env["MNIST_TF_SERVER_NAME"]})
    assert stack_checks.expected_targets(config["services"]["loadtest"]["command"]) == [
        "torch-rest", "tf-standin-rest", "tf-standin-grpc"
    ]


def test_no_engine_is_a_skip_unless_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unavailable(state_dir: Path, on_started: object) -> None:
        raise host_engine.EngineUnavailable("starting dockerd needs root")

    monkeypatch.setattr(host_engine, "provide_engine", unavailable)
    assert compose_test.main(["--state-dir", str(tmp_path)]) == 0
    assert compose_test.main(["--state-dir", str(tmp_path), "--require-engine"]) == 1


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        compose_test.parse_args(["--tf-epochs", "0"])
    assert "expected a positive number of epochs" in capsys.readouterr().err


# --- build inputs: wheels and CA certificates ----------------------------------------------------


def _wheel(folder: Path, filename: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_bytes(b"wheel")
    return folder / filename


def test_local_sources_come_from_pip_config(tmp_path: Path) -> None:
    links, index = tmp_path / "links", tmp_path / "pypi" / "simple"
    links.mkdir()
    index.mkdir(parents=True)
    config = "\n".join(
        [
            f"global.find-links='{links} /does/not/exist'",
            f"global.extra-index-url='file://{index} https://pypi.example/simple'",
            "global.index-url='https://pypi.org/simple'",
            f":env:.find-links='{links}'",
            "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        ]
    )
    assert build_inputs.pip_local_sources(config) == ([links], [index])


def test_find_local_wheels_takes_the_pinned_version_that_installs_in_the_images(tmp_path: Path) -> None:
    links, root = tmp_path / "links", tmp_path / "pypi"
    torch = _wheel(links, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    _wheel(links, "numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl")  # another Python
    _wheel(root / "files", "numpy-2.4.5-cp311-cp311-manylinux_2_27_x86_64.whl")  # another version
    numpy = _wheel(root / "files", "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")
    _wheel(root / "files", "glibc_new-1.0-cp311-cp311-manylinux_2_39_x86_64.whl")  # newer glibc than the images'
    page = root / "simple" / "numpy" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        '<a href="../../files/numpy-2.4.5-cp311-cp311-manylinux_2_27_x86_64.whl#sha256=00">old</a>\n'
        '<a href="../../files/numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl#sha256=11">x</a>'
    )
    (root / "simple" / "glibc-new").mkdir()
    (root / "files" / "glibc_new-1.0-cp311-cp311-manylinux_2_39_x86_64.whl").rename(
        root / "simple" / "glibc-new" / "glibc_new-1.0-cp311-cp311-manylinux_2_39_x86_64.whl"
    )
    # torch is pinned without a build label (as in requirements/constraints.txt): the local +cpu build matches.
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "glibc-new": "1.0", "absent": "1.0"}
    found = build_inputs.find_local_wheels(pins, [links], [root / "simple"], build_inputs.image_tags("x86_64"))
    assert found == {"torch": torch, "numpy": numpy.resolve()}


def test_stage_links_files_in_and_removes_only_its_own(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "docker" / "wheels").mkdir(parents=True)
    (repo / "docker" / "ca-certificates").mkdir(parents=True)
    theirs = repo / "docker" / "wheels" / "six-1.17.0-py2.py3-none-any.whl"
    theirs.write_bytes(b"the user's own")
    wheel = _wheel(tmp_path / "src", "tqdm-4.70.1-py3-none-any.whl")
    six = _wheel(tmp_path / "src", "six-1.17.0-py2.py3-none-any.whl")
    certificate = tmp_path / "ca" / "proxy.crt"
    certificate.parent.mkdir()
    certificate.write_text("-----BEGIN CERTIFICATE-----\n")
    staged = build_inputs.stage(repo, {"tqdm": wheel, "six": six}, [certificate])
    linked = repo / "docker" / "wheels" / wheel.name
    assert linked.stat().st_ino == wheel.stat().st_ino, "a hard link, not a copy"
    assert (repo / "docker" / "ca-certificates" / "proxy.crt").read_text() == certificate.read_text()
    assert not staged.has_torch and set(staged.wheels) == {"tqdm", "six"}
    staged.remove()
    assert not linked.exists() and not (repo / "docker" / "ca-certificates" / "proxy.crt").exists()
    assert theirs.read_bytes() == b"the user's own" and wheel.exists() and certificate.exists()


# --- host engine and base image ------------------------------------------------------------------


def test_private_dockerd_leaves_the_firewall_forwarding_and_bridges_alone(tmp_path: Path) -> None:
    layout = host_engine.PrivateEngineLayout(tmp_path)
    command = layout.dockerd_command("dockerd")
    for flag in ("--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"):
        assert flag in command
    assert f"--data-root={tmp_path / 'docker'}" in command
    assert f"--host=unix://{tmp_path / 'docker.sock'}" in command


def test_mounts_under_reads_mountinfo_deepest_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "state"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "\n".join(
            [
                "22 1 0:21 / / rw - ext4 /dev/vda rw",
                f"30 22 0:40 / {root}/docker/overlay2/abc/merged rw - overlay overlay rw",
                f"31 22 0:41 / {root}/run/netns/with\\040space rw - nsfs nsfs rw",
                f"32 22 0:42 / {root}/docker rw - tmpfs tmpfs rw",
                f"33 22 0:43 / {root}-other rw - tmpfs tmpfs rw",
            ]
        )
        + "\n"
    )
    monkeypatch.setattr(host_engine, "MOUNTINFO", mountinfo)
    root.mkdir()
    mounts = host_engine.mounts_under(root)
    assert mounts[-1] == f"{root}/docker"
    assert set(mounts) == {f"{root}/docker/overlay2/abc/merged", f"{root}/run/netns/with space", f"{root}/docker"}


def test_host_debian_mirror_reads_both_source_formats(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://old.example/debian bookworm main\ndeb [arch=amd64] https://m.example/debian/ bookworm main\n"
    )
    assert base_image.host_debian_mirror((deb822,)) == "http://mirror.example/debian"
    assert base_image.host_debian_mirror((one_line,)) == "https://m.example/debian"
    assert base_image.host_debian_mirror((tmp_path / "none.list",)) is None


def test_base_image_has_what_the_dockerfiles_need(tmp_path: Path) -> None:
    command = base_image.debootstrap_command(tmp_path, "http://mirror.example/debian")
    assert command[:2] == ["debootstrap", "--variant=minbase"]
    assert set(command[2].partition("=")[2].split(",")) == {"python3", "python3-venv", "ca-certificates"}
    assert command[-3:] == ["bookworm", str(tmp_path), "http://mirror.example/debian"]
    rootfs = tmp_path / "rootfs"
    for name in ("var/cache/apt/archives/python3_3.11_amd64.deb", "var/lib/apt/lists/x_Packages", "usr/bin/python3"):
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_text("x")
    base_image.slim(rootfs)
    assert [p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*") if p.is_file()] == ["usr/bin/python3"]


def test_agreement_of_server_answers() -> None:
    def answer(classes: list[int]) -> stack_checks.ServerAnswer:
        return stack_checks.ServerAnswer("s", "a", 1, 1.0, np.array(classes))

    assert stack_checks.agreement([answer([1, 2, 3, 4]), answer([1, 2, 3, 5])]) == 0.75
