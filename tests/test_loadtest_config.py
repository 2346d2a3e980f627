"""Settings: impossible values and malformed addresses fail early with messages that say what to give."""

from __future__ import annotations

import gzip
import io
import os
import re
from pathlib import Path

import pytest

from mnist_client.cpus import cgroup_cpu_limit, usable_cpus
from mnist_client.loadtest import ConfigError, LoadTestConfig, Thresholds, parse_target
from mnist_client.loadtest.cli import EXIT_USAGE, main
from mnist_client.loadtest.config import parse_list
from mnist_client.loadtest.errors import DataError
from mnist_client.loadtest.payload import load_test_set

REST = parse_target("http://127.0.0.1:8080", "rest")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(mode="open", rates=(0,)), r"rate 0: expected a finite number of requests per second > 0"),
        (dict(mode="open", rates=(-5.0,)), r"rate -5.0"),
        (dict(mode="open", rates=()), r"open loop needs at least one rate"),
        (dict(duration_s=-1.0), r"duration_s -1.0: expected a number of seconds > 0"),
        (dict(duration_s=0), r"duration_s 0"),
        (dict(duration_s=1.0, requests=10), r"either duration_s or requests, not both"),
        (dict(concurrency=(0,)), r"concurrency 0: expected an integer in 1\.\.65536"),
        (dict(concurrency=(2.5,)), r"concurrency 2.5: expected an integer"),
        (dict(requests=0), r"requests 0: expected an integer >= 1"),
        (dict(timeout_s=0), r"timeout_s 0: expected a number of seconds > 0"),
        (dict(images_per_request=0), r"images_per_request 0"),
        (dict(images_per_request=20, distinct_images=10), r"distinct_images 10 is smaller than images_per_request"),
        (dict(rest_format="xml"), r"rest_format 'xml'; expected one of \('json', 'npy'\)"),
        (dict(targets=()), r"no target given"),
        (dict(targets=(REST, REST)), r"target names \['rest', 'rest'\] repeat"),
        (dict(mode="sideways"), r"mode 'sideways'"),
    ],
)
def test_impossible_settings_are_rejected(settings, message):
    full = {"targets": (REST,), **settings}
    with pytest.raises(ConfigError, match=message):
        LoadTestConfig(**full)


@pytest.mark.parametrize(
    ("spec", "protocol", "message"),
    [
        ("ftp://host:21", "rest", r"scheme 'ftp'; expected http\(s\)://HOST"),
        ("http://:8080", "rest", r"has no host"),
        ("http://host:99999", "rest", r"bad URL"),
        ("http://host:8080/?q=1", "rest", r"query"),
        ("localhost", "grpc", r"has no host or no port; expected HOST:PORT"),
        ("host:http", "grpc", r"port 'http' .* is not in 1\.\.65535"),
        ("http://host:8500", "grpc", r"is not HOST:PORT"),
        ("[zz]:8500", "grpc", r"not an IPv6 address"),
        ("bad name=http://h:1", "rest", r"target name 'bad name'"),
    ],
)
def test_bad_addresses_are_rejected(spec, protocol, message):
    with pytest.raises(ConfigError, match=message):
        parse_target(spec, protocol)


def test_good_addresses():
    rest = parse_target("torch=http://10.0.0.1:8080/prefix/", "rest")
    assert (rest.name, rest.host, rest.port, rest.path_prefix) == ("torch", "10.0.0.1", 8080, "/prefix")
    assert parse_target("http://example", "rest").port == 80
    grpc = parse_target("tfs=dns:///svc.ns.svc.cluster.local:8500", "grpc")
    assert (grpc.name, grpc.host, grpc.port, grpc.grpc_target) == (
        "tfs", "svc.ns.svc.cluster.local", 8500, "dns:///svc.ns.svc.cluster.local:8500")
    assert parse_target("grpc://[::1]:8500", "grpc").grpc_target == "[::1]:8500"


def test_defaults_and_sweeps():
    config = LoadTestConfig(targets=(REST,), concurrency=[1, 16])
    assert config.duration_s == 10.0 and config.requests is None
    assert config.points == (1, 16)
    assert LoadTestConfig(targets=(REST,), requests=5).duration_s is None
    open_loop = LoadTestConfig(targets=(REST,), mode="open", rates=(100, 2500.5))
    assert open_loop.points == (100.0, 2500.5) and open_loop.in_flight(100.0) == 256
    assert parse_list("1, 4,16", int, "--concurrency") == (1, 4, 16)
    with pytest.raises(ConfigError, match=r"--concurrency '1,,4': expected a comma-separated list"):
        parse_list("1,,4", int, "--concurrency")
    with pytest.raises(ConfigError, match=r"--rate 'fast': expected a comma-separated list of floats"):
        parse_list("fast", float, "--rate")


def test_thresholds_are_validated():
    with pytest.raises(ConfigError, match=r"max_error_rate 2: expected a fraction between 0 and 1"):
        Thresholds(max_error_rate=2)
    with pytest.raises(ConfigError, match=r"max_p99_ms -1"):
        Thresholds(max_p99_ms=-1)
    assert not Thresholds().any() and Thresholds(min_accuracy=0.9).any()


def test_mnist_files_are_found_or_named(tmp_path: Path, monkeypatch, mnist_dir: Path):
    assert load_test_set(mnist_dir, limit=3).images.shape == (3, 28, 28)
    missing = re.escape(f"{tmp_path / 't10k-images-idx3-ubyte.gz'}: file not found") + ".*--data-dir DIR"
    with pytest.raises(DataError, match=missing):
        load_test_set(tmp_path)
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=missing):
        load_test_set()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: MD5 [0-9a-f]{32}, expected 9fb629c4"):
        load_test_set()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--rest", "http://127.0.0.1:1", "--rate", "0"], "rate 0.0: expected a finite number"),
        (["run", "--rest", "http://127.0.0.1:1", "--duration", "-3"], "duration_s -3.0"),
        (["run", "--rest", "localhost:8080"], "scheme 'localhost'"),
        (["run", "--grpc", "127.0.0.1"], "has no host or no port"),
        (["run"], "no target given; expected --rest URL and/or --grpc HOST:PORT"),
        (["run", "--rest", "http://127.0.0.1:1", "--concurrency", "0"], "concurrency 0"),
        (["run", "--rest", "http://127.0.0.1:1", "--max-error-rate", "5"], "max_error_rate 5.0"),
        (["compare", "a.json", "b.json", "--max-p99-increase", "-1"], "max_p99_increase_pct -1.0"),
    ],
)
def test_cli_rejects_bad_settings_with_exit_status_2(argv, message, capsys):
    assert main(argv, out=io.StringIO()) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cpu_quota_from_cgroup_v2_and_v1_caps_usable_cpus(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))  # 1.5 CPUs of quota: 2 workers
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 0.5
    assert usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_worker_processes_follow_load_and_usable_cpus(monkeypatch):
    from mnist_client.loadtest import config as config_module

    monkeypatch.setattr(config_module, "usable_cpus", lambda: 4)
    closed = LoadTestConfig(targets=(REST,), concurrency=(1, 16, 256))
    assert [closed.worker_processes(c) for c in closed.points] == [1, 2, 4]
    assert LoadTestConfig(targets=(REST,), concurrency=(16,), processes=8).worker_processes(16) == 8
    assert LoadTestConfig(targets=(REST,), concurrency=(3,), processes=8).worker_processes(3) == 3
    opened = LoadTestConfig(targets=(REST,), mode="open", rates=(100, 4000, 100_000), max_in_flight=2)
    assert [opened.worker_processes(r) for r in opened.points] == [1, 2, 2]
