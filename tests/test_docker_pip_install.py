"""Offline checks of docker/pip_install.py, the installer every image runs at build time.

It is asked for its plan (and its dry run), never run against an index: the torch and TensorFlow
builds each variant (gpu, cpu) gets, the pins it applies, and what it refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from docker_files import REPO, load_pip_install


def _torch_pin() -> str:
    pins = load_pip_install().read_pins(REPO / "requirements" / "constraints.txt")
    return pins["torch"].split("+")[0]


def test_pip_install_picks_the_cuda_torch_from_pypi_for_gpu() -> None:
    pip_install = load_pip_install()
    plan = pip_install.plan_install(["torch", "numpy"], REPO / "requirements", "gpu", "https://cpu.example/", None)
    (command,) = plan.commands
    assert f"torch=={_torch_pin()}" in command
    assert "--extra-index-url" not in command
    # The +cpu pin of the local venv must not veto the CUDA build.
    assert not any(line.startswith("torch==") for line in plan.constraints.splitlines())
    assert "numpy==" in plan.constraints


def test_pip_install_picks_the_cpu_torch_from_the_cpu_index() -> None:
    pip_install = load_pip_install()
    plan = pip_install.plan_install(["torch"], REPO / "requirements", "cpu", "https://cpu.example/", None)
    (command,) = plan.commands
    assert f"torch=={_torch_pin()}+cpu" in command
    assert command[command.index("--extra-index-url") + 1] == "https://cpu.example/"
    # Empty index URL: only PyPI and local wheels (a machine that cannot reach PyTorch's index).
    plan = pip_install.plan_install(["torch"], REPO / "requirements", "cpu", "", None)
    assert "--extra-index-url" not in plan.commands[0]


def test_pip_install_tensorflow_variants_and_no_deps_packages(tmp_path: Path) -> None:
    pip_install = load_pip_install()
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
    pip_install = load_pip_install()
    with pytest.raises(pip_install.PinError, match="not pinned"):
        pip_install.plan_install(["numpy", "left-pad"], REPO / "requirements", "gpu", "", None)
    with pytest.raises(pip_install.PinError, match="variant"):
        pip_install.plan_install(["numpy"], REPO / "requirements", "tpu", "", None)


def test_pip_install_dry_run_prints_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    pip_install = load_pip_install()
    code = pip_install.main(
        ["--dry-run", "--variant", "cpu", "--requirements-dir", str(REPO / "requirements"), "torch", "numpy"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "/opt/venv/bin/python -m pip install --constraint" in out and "+cpu" in out
    assert pip_install.main(["--dry-run", "--requirements-dir", str(REPO / "requirements"), "left-pad"]) == 2
