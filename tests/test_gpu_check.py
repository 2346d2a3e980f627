"""bench.gpu_check (make gpu-check): the refusal without CUDA, the whole path rehearsed on the CPU, and the
GPU settings that compose, Kubernetes and the check share.

This machine has no GPU, so the rehearsal (``--allow-cpu``) is what runs here: every part on the CPU,
on quick models and tiny load levels, and every line it prints must say CPU and nothing else. The
devices and batch sizes it reports are checked against what must hold on the CPU (a lone request is a
pass of one image; no pass holds more images than there are requests in flight).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.gpu_check.observe import BatchHistogram
from bench.gpu_check.settings import REST_GPU_ENV
from training import recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_TAG_WORDS = "CPU ONLY"


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _check(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def _upper_bound(label: str) -> float:
    """A passes_by_size key ("1", "3-4", "2049+") -> the most images a pass in it holds."""
    return float("inf") if label.endswith("+") else float(label.rpartition("-")[2])


def test_without_cuda_it_refuses_and_names_the_rehearsal(tmp_path: Path) -> None:
    if _cuda_visible():
        pytest.skip("PyTorch sees a CUDA device here: the check runs instead of refusing")
    result = _check("--output-dir", str(tmp_path), timeout_s=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device" in result.stderr and "--allow-cpu" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_allow_cpu_runs_every_part_on_the_cpu_and_every_line_says_so(mnist_dir: Path, tmp_path: Path) -> None:
    if _cuda_visible():
        pytest.skip("PyTorch sees a CUDA device here: --allow-cpu would not move the check to the CPU")
    run = _check("--allow-cpu", "--quick", "--concurrency", "1", "8", "--duration", "0.5", "--warmup", "10",
                 "--data-dir", str(mnist_dir), "--output-dir", str(tmp_path), timeout_s=1400)
    assert run.returncode == 0, run.stdout + run.stderr[-5000:]
    printed = [line for line in run.stdout.splitlines() if line.strip()]
    assert printed and all(CPU_TAG_WORDS in line for line in printed), [x for x in printed if CPU_TAG_WORDS not in x]
    # Whatever a line says a part ran on, it is the CPU.
    devices = {m.lower() for line in printed for m in re.findall(r"\bdevice (\w+)", line)}
    assert devices == {"cpu"}, devices

    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "cpu" and result["problems"] == []
    assert set(result["lines"]) <= set(printed)
    assert result["train_torch"]["device"] == "cpu" and "peak_gpu_memory_mib" not in result["train_torch"]
    assert result["train_tf"]["device"] == "CPU" and result["train_tf"]["visible_gpus"] == []
    assert result["serve_torch"]["worker_devices"] == ["cpu"] and result["serve_tf"]["device"] == "CPU"
    assert any(f"train torch: device cpu, 1 epoch(s) of {recipe.QUICK_TRAIN_EXAMPLES:,} images" in line
               for line in printed)
    assert any("train tf: device CPU, 1 epoch(s)" in line for line in printed)

    # The TensorFlow build is reported as it is installed.
    tf_devices = result["devices"]["tensorflow"]
    try:
        importlib.metadata.version("tensorflow-cpu")
        assert tf_devices["built_with_cuda"] is False and "tensorflow-cpu" in tf_devices["distributions"]
        assert any("built without CUDA" in line for line in printed)
    except importlib.metadata.PackageNotFoundError:
        pass

    # The REST worker's memory: measured on the CPU, so no GPU figure is claimed.
    memory = result["rest_worker_memory"]
    assert memory["device"] == "cpu"
    assert [step["images"] for step in memory["steps"]] == [0, 1, int(REST_GPU_ENV["MNIST_REST_BATCH_MAX_SIZE"]), 1024]
    assert all("reserved_mib" not in step and step["rss_mib"] > 0 for step in memory["steps"])

    torch_levels = result["serve_torch"]["levels"]
    assert [level["concurrency"] for level in torch_levels] == [1, 8]
    for level in torch_levels:
        assert level["errors"] == 0 and level["ok"] > 0 and level["throughput_rps"] > 0
        assert level["latency_ms"]["p50"] > 0 and level["accuracy"] >= 0.8
        batches = level["batches"]
        # Every answered request went through a forward pass (its warm-up's too, so at least as many).
        assert batches["images"] >= level["ok"]
        assert all(_upper_bound(label) <= max(level["concurrency"], 1) for label in batches["passes_by_size"])
        line = next(line for line in printed if f"load torch-rest c={level['concurrency']} " in line)
        assert "req/s" in line and "p50" in line and "0 errors" in line
    # One request at a time: each pass holds one image.
    assert set(torch_levels[0]["batches"]["passes_by_size"]) == {"1"}
    assert torch_levels[0]["batches"]["forward_passes"] == torch_levels[0]["batches"]["images"]

    tf_levels = result["serve_tf"]["levels"]
    assert [level["concurrency"] for level in tf_levels] == [1, 8]
    for level in tf_levels:
        targets = level["targets"]
        assert set(targets) == {"tf-standin-rest", "tf-standin-grpc"}
        assert all(t["errors"] == 0 and t["throughput_rps"] > 0 and t["accuracy"] >= 0.8 for t in targets.values())
        batches = level["batches"]
        assert batches["batching"] is True
        assert batches["requests"] >= sum(t["ok"] for t in targets.values())
    assert tf_levels[0]["batches"]["requests"] == tf_levels[0]["batches"]["batches"]  # one request at a time


def test_batch_histogram_difference_counts_passes_by_size() -> None:
    def exposition(counts: dict[str, int], images: int) -> str:
        """A forward-batch histogram as the REST server exposes it: cumulative buckets, count and sum."""
        lines = ["# HELP mnist_rest_forward_batch_size Images per model forward pass",
                 "# TYPE mnist_rest_forward_batch_size histogram"]
        lines += [f'mnist_rest_forward_batch_size_bucket{{le="{le}"}} {n}' for le, n in counts.items()]
        lines += [f"mnist_rest_forward_batch_size_count {counts['+Inf']}",
                  f"mnist_rest_forward_batch_size_sum {images}"]
        return "\n".join(lines) + "\n"

    before = BatchHistogram.parse(exposition({"1.0": 5, "2.0": 5, "4.0": 5, "8.0": 5, "+Inf": 5}, 5))
    # Since then: 3 passes of 1 image, 2 of 2, 1 of 7 (3 + 4 + 7 = 14 images).
    after = BatchHistogram.parse(exposition({"1.0": 8, "2.0": 10, "4.0": 10, "8.0": 11, "+Inf": 11}, 19))
    summary = after.minus(before).summary()
    assert summary == {"forward_passes": 6, "images": 14, "mean_images_per_pass": 2.33,
                       "passes_by_size": {"1": 3, "2": 2, "5-8": 1}, "largest_bucket": "5-8"}
    with pytest.raises(ValueError, match="no mnist_rest_forward_batch_size histogram"):
        BatchHistogram.parse("# TYPE other counter\nother_total 1\n")


def _make_dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--dry-run", "--always-make", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def test_make_setup_tf_cuda_replaces_tensorflow_cpu_with_the_same_release_of_the_cuda_build() -> None:
    commands = _make_dry_run("setup", "TF=cuda")
    assert commands.returncode == 0, commands.stderr
    assert "uninstall --quiet --yes tensorflow-cpu" in commands.stdout
    assert "install --quiet -r requirements/tf-cuda.txt" in commands.stdout
    assert "tf-cuda.txt" not in _make_dry_run("setup").stdout
    refused = _make_dry_run("setup", "TF=rocm")
    assert refused.returncode != 0 and "TF=rocm: expected TF=cuda" in refused.stderr

    def pins(path: Path) -> dict[str, str]:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        return dict(re.fullmatch(r"([\w-]+)(?:\[[\w-]+\])?==(\S+)", line).groups() for line in lines if line)

    assert pins(REPO_ROOT / "requirements" / "tf-cuda.txt") == {
        "tensorflow": pins(REPO_ROOT / "requirements" / "main.txt")["tensorflow-cpu"]
    }
    target = _make_dry_run("gpu-check", "GPU_CHECK_ARGS=--allow-cpu")
    assert "-m bench.gpu_check --output-dir bench/results --allow-cpu" in target.stdout


def test_kubernetes_gpu_overlay_runs_the_rest_server_with_the_gpu_checks_settings(kubectl: str) -> None:
    overlay = REPO_ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "serving"
    rendered = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120,
                              check=True).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered)
                      if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "torch-rest")
    server = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert {name: env.get(name) for name in REST_GPU_ENV} == REST_GPU_ENV
    assert env["MNIST_REST_DEVICE"] == "cuda"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1  # one worker for one GPU
