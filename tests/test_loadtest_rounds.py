"""Repeated rounds (median and spread per sweep point, interleaved between targets) and the CPU
accounting that tells the server's CPU from the load tester's and everything else's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from mnist_client.loadtest import LoadTestConfig, parse_target, run
from mnist_client.loadtest.cli import main
from mnist_client.loadtest.errors import ConfigError
from mnist_client.loadtest.cpu_usage import (
    CpuSnapshot,
    contention,
    machine_busy_seconds,
    process_tree_cpu_seconds,
    usage,
)
from mnist_client.loadtest.payload import load_test_set
from mnist_client.loadtest.printers.csv_out import csv_rows
from mnist_client.loadtest.printers.html import format_html
from mnist_client.loadtest.printers.table import format_table
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import Measurement
from tests.loadtest_servers import GrpcServer, Oracle, RestServer

IMAGES = 60
LINUX_PROC = pytest.mark.skipif(machine_busy_seconds() is None, reason="CPU accounting reads /proc (Linux only)")


@pytest.fixture(scope="module")
def test_set():
    return load_test_set(limit=IMAGES)


def _burner(children: int = 0) -> subprocess.Popen[bytes]:
    """A process that keeps one core busy (and ``children`` busy children) until killed."""
    code = textwrap.dedent(f"""
        import multiprocessing, sys
        def spin():
            while True:
                pass
        if __name__ == "__main__":
            for _ in range({children}):
                multiprocessing.Process(target=spin, daemon=True).start()
            print("ready", flush=True)
            spin()
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    subprocess.run(["pkill", "-KILL", "-P", str(process.pid)], check=False)
    process.kill()
    process.wait()


def test_rounds_alternate_between_targets_and_each_keeps_its_figures(test_set):
    oracle = Oracle(test_set.images, test_set.labels)
    with RestServer(oracle) as rest, GrpcServer(oracle) as grpc_server:
        report = run(LoadTestConfig(
            targets=(parse_target(f"a={rest.url}", "rest"), parse_target(f"b={grpc_server.target}", "grpc")),
            concurrency=(1, 2), requests=20, repeats=3, warmup_requests=2, distinct_images=IMAGES, timeout_s=5.0,
        ))
    # One measurement per (target, point), in sweep order, each holding its three rounds.
    assert [(m.target, m.point) for m in report.measurements] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for m in report.measurements:
        assert len(m.rounds) == 3 and len(m.windows) == 3
        assert [r["requests"] for r in m.rounds] == [20, 20, 20]
        assert m.requests == 60 and m.ok == 60
        assert all(r["p50_ms"] > 0 and r["throughput_rps"] > 0 for r in m.rounds)
        assert set(m.round_stats()) == {"p50_ms", "p99_ms", "throughput_rps"}
    # Interleaved: a's round k ends before b's round k starts, which ends before a's round k+1 starts.
    for point in (1, 2):
        a, b = report.measurement("a", point), report.measurement("b", point)
        order = [w for pair in zip(a.windows, b.windows) for w in pair]
        assert all(earlier[1] <= later[0] for earlier, later in zip(order, order[1:]))
    # Rounds survive the result file.
    again = Report.from_dict(report.to_dict())
    assert [m.rounds for m in again.measurements] == [m.rounds for m in report.measurements]


def _measurement_with_rounds(rps: list[float], p50: list[float], cpu: dict | None = None) -> Measurement:
    m = Measurement("t", "rest", "http://h:1", "closed", 4, 1)
    m.rounds = [{"requests": 100, "errors": 0, "elapsed_s": 1.0, "throughput_rps": r, "p50_ms": p, "p99_ms": 2 * p,
                 "cpu": cpu or {}} for r, p in zip(rps, p50)]
    return m


def test_round_stats_are_median_and_relative_range():
    m = _measurement_with_rounds([1000.0, 800.0, 900.0], [1.0, 1.5, 1.1])
    stats = m.round_stats()
    assert stats["throughput_rps"] == {"median": 900.0, "min": 800.0, "max": 1000.0, "spread": pytest.approx(0.2222, abs=1e-4)}
    assert stats["p50_ms"]["median"] == 1.1 and stats["p50_ms"]["spread"] == pytest.approx(0.4545, abs=1e-4)
    assert m.flags() == [
        "p50_ms spread 45% over 3 rounds (above 20%)",  # (1.5 - 1.0) / 1.1
        "p99_ms spread 45% over 3 rounds (above 20%)",  # (3.0 - 2.0) / 2.2
        "throughput_rps spread 22% over 3 rounds (above 20%)",  # (1000 - 800) / 900
    ]


def test_a_narrow_spread_is_not_flagged_and_shows_in_every_printer():
    m = _measurement_with_rounds([1000.0, 950.0, 1010.0], [1.0, 1.05, 0.98])
    assert m.flags() == []
    report = Report(measurements=[m])
    table = format_table(report)
    assert "rounds" in table and "1000.0" in table and "6%" in table  # (1010 - 950) / 1000
    (row,) = csv_rows(report)
    assert (row["rounds"], row["throughput_rps_median"], row["throughput_rps_spread"]) == (3, "1000.000", "0.0600")
    assert row["flags"] == ""
    assert "1000.0 (6%)" in format_html(report)


def test_contention_names_who_took_the_cpu():
    quiet = {"capacity": 2, "machine": 1.2, "generator": 0.3, "server": 0.85, "other": 0.05}
    assert contention(quiet) is None
    neighbour = {"capacity": 2, "machine": 1.9, "generator": 0.3, "server": 0.9, "other": 0.7}
    assert contention(neighbour) == "other processes used 0.70 of 2 cores"
    tester = {"capacity": 2, "machine": 1.95, "generator": 0.6, "server": 1.3, "other": 0.05}
    assert contention(tester) == "the load tester used 0.60 of 2 cores on a saturated machine"
    assert contention({"capacity": 2, "machine": None}) is None  # no /proc: nothing to say
    # Without the server's pids, its own CPU is among "other": no claim about other processes.
    assert contention({**neighbour, "server": None}) is None
    stolen = {**quiet, "stolen": 0.3}
    assert contention(stolen) == "the hypervisor gave 0.30 of 2 cores to other virtual machines"
    flagged = _measurement_with_rounds([1000.0], [1.0], cpu=neighbour)
    assert flagged.flags() == ["round 1: other processes used 0.70 of 2 cores"]
    assert "round 1: other processes used 0.70 of 2 cores" in format_table(Report(measurements=[flagged]))


def test_usage_splits_the_machine_between_generator_server_and_the_rest():
    before = CpuSnapshot(wall=10.0, machine=100.0, servers={"t": 5.0, "u": 1.0}, stolen=7.0)
    after = CpuSnapshot(wall=12.0, machine=103.0, servers={"t": 6.5, "u": 1.9}, stolen=7.5)
    cpu = usage(before, after, "t", generator_cpu_s=0.6, capacity=2)
    # machine 3 s over 2 s; server t 1.5 s; generator 0.6 s; the rest (server u's 0.9 s included) 0.9 s;
    # 0.5 s stolen by the hypervisor.
    assert cpu == {"capacity": 2, "machine": 1.5, "generator": 0.3, "server": 0.75, "other": 0.45, "stolen": 0.25}
    gone = CpuSnapshot(wall=12.0, machine=103.0, servers={"t": None})
    assert usage(before, gone, "t", 0.6, capacity=2)["server"] is None


@LINUX_PROC
def test_process_tree_cpu_counts_descendants():
    burner = _burner(children=1)
    try:
        first = process_tree_cpu_seconds(burner.pid)
        assert first is not None
        deadline = time.monotonic() + 60
        # Two busy processes in the tree: its CPU time grows past what one process alone could use.
        while (process_tree_cpu_seconds(burner.pid) or 0) - first < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (process_tree_cpu_seconds(burner.pid) or 0) - first >= 0.5
        # Several roots (a proxy and its server) add up, each process once; roots that are gone add nothing.
        twice = process_tree_cpu_seconds([burner.pid, burner.pid, 2**22 + 1])
        assert twice is not None and twice <= (process_tree_cpu_seconds(burner.pid) or 0)
        assert process_tree_cpu_seconds([2**22 + 1]) is None
    finally:
        _stop(burner)
    assert process_tree_cpu_seconds(burner.pid) is None


@LINUX_PROC
def test_a_round_names_the_server_cpu_and_flags_a_busy_neighbour(test_set, tmp_path):
    """A burner passed as the target's server counts as server CPU; one not passed counts as 'other'."""
    oracle = Oracle(test_set.images, test_set.labels)
    burner = _burner()
    try:
        with RestServer(oracle) as rest:
            target = parse_target(f"t={rest.url}", "rest")
            settings = dict(targets=(target,), concurrency=(1,), duration_s=0.5, warmup_requests=2,
                            distinct_images=IMAGES, timeout_s=5.0)
            as_server = run(LoadTestConfig(**settings), server_pids={"t": burner.pid})
            # An idle process named as the server: the burner beside it is "other" (the fake server runs in
            # this process, whose tree holds the burner and the load tester's workers too).
            idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            try:
                as_neighbour = run(LoadTestConfig(**settings), server_pids={"t": idle.pid})
            finally:
                idle.kill()
                idle.wait()
            out = tmp_path / "cli.json"
            status = main(["run", "--rest", f"t={rest.url}", "--duration", "0.5", "--distinct-images", str(IMAGES),
                           "--repeats", "2", "--server-pid", f"t={burner.pid}", "--no-progress", "--json", str(out)])
    finally:
        _stop(burner)
    (cpu,) = [r["cpu"] for r in as_server.measurements[0].rounds]
    assert cpu["server"] is not None and cpu["server"] > 0.3  # the burner ran the whole round
    (cpu,) = [r["cpu"] for r in as_neighbour.measurements[0].rounds]
    assert cpu["server"] is not None and cpu["other"] >= 0.3
    assert any("other processes used" in flag for flag in as_neighbour.measurements[0].flags())
    assert status == 0
    rounds = Report.from_dict(json.loads(out.read_text())).measurements[0].rounds
    assert len(rounds) == 2 and all(r["cpu"]["server"] > 0.3 for r in rounds)


def test_cli_refuses_a_server_pid_for_an_unknown_target(capsys):
    status = main(["run", "--rest", "a=http://127.0.0.1:9", "--server-pid", "b=123", "--no-progress"])
    assert status == 2
    assert "--server-pid 'b=123': expected NAME=PID with NAME one of ['a']" in capsys.readouterr().err


def test_repeats_must_be_a_positive_count():
    with pytest.raises(ConfigError, match="repeats 0: expected an integer in 1..100"):
        LoadTestConfig(targets=(parse_target("http://127.0.0.1:9", "rest"),), repeats=0)
