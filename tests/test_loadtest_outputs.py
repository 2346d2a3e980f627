"""Outputs and gating through the CLI: JSON/CSV/HTML well-formed, thresholds -> exit status, merge, compare."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mnist_client.loadtest import Thresholds, load_report
from mnist_client.loadtest.cli import EXIT_ERROR, EXIT_FAILED, EXIT_OK, ProgressDisplay, main
from mnist_client.loadtest.payload import load_test_set
from mnist_client.loadtest.printers import format_table
from mnist_client.loadtest.records import RecordBatch
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.reporter import Reporter
from mnist_client.loadtest.runner import Progress
from mnist_client.loadtest.stats import LatencyHistogram, Measurement
from stack.processes import free_port
from tests.loadtest_servers import Behaviour, GrpcServer, Oracle, RestServer

IMAGES = 60


@pytest.fixture(scope="module")
def test_set(mnist_dir):
    return load_test_set(mnist_dir, limit=IMAGES)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, test_set):
    """One CLI run: REST (exact) and gRPC (wrong on every 4th image), concurrency 1 and 2, all outputs."""
    out_dir = tmp_path_factory.mktemp("outputs")
    stdout = io.StringIO()
    with RestServer(Oracle(test_set.images, test_set.labels)) as rest, \
            GrpcServer(Oracle(test_set.images, test_set.labels, wrong_every=4)) as grpc_server:
        code = main(["run", "--rest", rest.url, "--grpc", f"tfs={grpc_server.target}", "--concurrency", "1,2",
                     "--requests", "30", "--warmup", "2", "--distinct-images", str(IMAGES), "--no-progress",
                     "--json", str(out_dir / "run.json"), "--csv", str(out_dir / "run.csv"),
                     "--html", str(out_dir / "run.html"), "--max-error-rate", "0", "--min-accuracy", "0.5"],
                    out=stdout)
    return code, stdout.getvalue(), out_dir


def test_cli_run_prints_a_table_and_passes_thresholds(sweep_run):
    code, text, _ = sweep_run
    assert code == EXIT_OK
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("target"))
    for column in ("conc", "requests", "errors", "req/s", "p50", "p90", "p99", "p99.9", "max", "accuracy"):
        assert column in header.split()
    assert sum(1 for line in lines if line.startswith(("rest ", "tfs "))) == 4
    assert "served accuracy  rest: 1.0000" in text
    assert "agreement        rest vs tfs:" in text
    assert "all thresholds passed" in text


def test_json_result_file_round_trips(sweep_run):
    _, _, out_dir = sweep_run
    data = json.loads((out_dir / "run.json").read_text())
    assert data["schema"] == "mnist-loadtest-result/1"
    assert [(r["target"], r["concurrency"]) for r in data["results"]] == [
        ("rest", 1), ("tfs", 1), ("rest", 2), ("tfs", 2)]
    for entry in data["results"]:
        assert entry["requests"] == 30 and entry["errors"] == 0
        assert set(entry["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
        assert entry["histogram"]["encoding"] == "hdrhistogram-v2-base64"
    assert data["accuracy"]["rest"] == 1.0
    report = load_report(out_dir / "run.json")
    again = Report.from_dict(json.loads(report.to_json()))
    assert [m.summary() for m in again.measurements] == [m.summary() for m in report.measurements]


def test_csv_has_one_row_per_target_and_point(sweep_run):
    _, _, out_dir = sweep_run
    rows = list(csv.DictReader((out_dir / "run.csv").open()))
    assert [(r["target"], r["concurrency"]) for r in rows] == [("rest", "1"), ("tfs", "1"), ("rest", "2"), ("tfs", "2")]
    for row in rows:
        assert int(row["requests"]) == 30 and int(row["errors"]) == 0
        assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"]) <= float(row["max_ms"])
        assert float(row["throughput_rps"]) > 0


class _StrictHtml(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "circle", "line", "rect", "polyline"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") or (value or "").startswith(("http:", "https:", "//")) and name != "xmlns":
                self.external.append(f"{tag} {name}={value}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_report_is_self_contained_and_well_formed(sweep_run):
    _, _, out_dir = sweep_run
    text = (out_dir / "run.html").read_text()
    parser = _StrictHtml()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    assert parser.external == []
    assert "<script" not in text and "<link" not in text
    assert parser.tags.count("svg") == 3  # latency percentiles, throughput and p99 against concurrency
    for title in ("Latency by percentile", "Throughput", "p99 latency", "All thresholds passed"):
        assert title in text


def test_thresholds_fail_the_run_with_exit_status_1(test_set):
    out = io.StringIO()
    with RestServer(Oracle(test_set.images, test_set.labels)) as rest:
        code = main(["run", "--rest", rest.url, "--requests", "10", "--distinct-images", str(IMAGES),
                     "--no-progress", "--max-p99-ms", "0.001", "--min-accuracy", "1.0"], out=out)
    assert code == EXIT_FAILED
    assert "FAIL rest at concurrency 1: p99" in out.getvalue() and "> limit 0.001 ms" in out.getvalue()
    assert "accuracy" not in "".join(line for line in out.getvalue().splitlines() if line.startswith("FAIL rest:"))


def test_error_rate_threshold(test_set):
    out = io.StringIO()
    behaviour = Behaviour(fail_status=503, from_call=2)
    with RestServer(Oracle(test_set.images, test_set.labels), behaviour) as rest:
        code = main(["run", "--rest", rest.url, "--requests", "10", "--warmup", "0", "--distinct-images",
                     str(IMAGES), "--no-progress", "--max-error-rate", "0.05"], out=out)
    assert code == EXIT_FAILED
    assert "error rate 1.0000 > limit 0.05 ({'unavailable': 10})" in out.getvalue()
    assert "errors           rest at 1: unavailable/UNAVAILABLE: 10" in out.getvalue()


def test_unreachable_target_exits_3(capsys):
    code = main(["run", "--rest", f"http://127.0.0.1:{free_port()}", "--requests", "5", "--no-progress",
                 "--timeout", "1"], out=io.StringIO())
    assert code == EXIT_ERROR
    assert "failed its first prediction [unavailable]" in capsys.readouterr().err


# -- merge and compare ----------------------------------------------------------------------------------


def _report_from_samples(samples: list[int], errors: int, predictions: dict[int, int], window: tuple[float, float],
                         labels) -> Report:
    """A report fed through the reporter from known records (payload p = test image p, one image each)."""
    reporter = Reporter(labels)
    reporter.begin(Measurement("rest", "rest", "http://h:1", "closed", 8, 1), tuple((i,) for i in range(len(labels))))
    images = list(predictions)
    batch = RecordBatch(worker=0)
    for i, latency in enumerate(samples):
        image = images[i % len(images)]
        batch.ok_payloads.append(image)
        batch.ok_latencies_us.append(latency)
        batch.ok_classes.append(bytes([predictions[image]]))
    batch.errors.extend([("unavailable", "UNAVAILABLE", "refused")] * errors)
    reporter.add(batch)
    reporter.current.windows.append(window)
    reporter.end()
    return reporter.report({"source": "samples"})


def test_merge_equals_a_single_run_over_the_union_of_samples(tmp_path: Path, test_set):
    import random

    rng = random.Random(11)
    labels = test_set.labels
    a = [rng.randint(200, 90_000) for _ in range(4000)]
    b = [rng.randint(500, 400_000) for _ in range(2500)]
    truth = {i: int(labels[i]) for i in range(IMAGES)}
    half = {i: truth[i] for i in range(IMAGES // 2)}
    other_half = {i: truth[i] for i in range(IMAGES // 2, IMAGES)}
    report_a = _report_from_samples(a, 3, half, (1000.0, 1010.0), labels)
    report_b = _report_from_samples(b, 1, other_half, (1005.0, 1012.0), labels)
    report_a.save(tmp_path / "results" / "result-0.json")
    report_b.save(tmp_path / "results" / "result-1.json")

    out = io.StringIO()
    assert main(["merge", str(tmp_path / "results"), "--json", str(tmp_path / "merged.json")], out=out) == EXIT_OK
    merged = load_report(tmp_path / "merged.json")
    (m,) = merged.measurements

    single = LatencyHistogram()
    single.record_many(a + b)
    assert m.latency == single  # bucket for bucket
    assert m.latency_ms() == pytest.approx({**Measurement("x", "rest", "", "closed", 1, 1, latency=single).latency_ms()})
    assert (m.ok, m.requests, dict(m.errors)) == (6500, 6504, {"unavailable": 4})
    assert m.elapsed_s == pytest.approx(12.0)  # union of the two overlapping windows
    assert merged.sources == 2 and merged.accuracy("rest") == 1.0
    assert int((merged.predictions["rest"] >= 0).sum()) == IMAGES  # both halves of the images
    assert "1 result file" not in out.getvalue() and "2 result file(s)" in out.getvalue()


def test_merge_of_real_runs_adds_counts(tmp_path: Path, test_set):
    with RestServer(Oracle(test_set.images, test_set.labels)) as rest:
        for index in range(2):
            assert main(["run", "--rest", rest.url, "--requests", "20", "--concurrency", "2", "--no-progress",
                         "--distinct-images", str(IMAGES), "--json", str(tmp_path / f"r{index}.json")],
                        out=io.StringIO()) == EXIT_OK
    merged_path = tmp_path / "merged.json"
    assert main(["merge", str(tmp_path / "r0.json"), str(tmp_path / "r1.json"), "--json", str(merged_path),
                 "--max-error-rate", "0"], out=io.StringIO()) == EXIT_OK
    runs = [load_report(tmp_path / f"r{i}.json").measurements[0] for i in range(2)]
    (merged,) = load_report(merged_path).measurements
    assert merged.ok == 40 and merged.latency.count == 40
    assert merged.elapsed_s == pytest.approx(runs[0].elapsed_s + runs[1].elapsed_s)  # one after the other
    assert min(r.latency.max for r in runs) <= merged.latency.max == max(r.latency.max for r in runs)


def test_merge_rejects_files_that_are_not_results(tmp_path: Path, capsys):
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    assert main(["merge", str(tmp_path / "junk.json")], out=io.StringIO()) == EXIT_ERROR
    assert "schema None; expected a load-test result" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing.json")], out=io.StringIO()) == EXIT_ERROR
    assert "missing.json: cannot read" in capsys.readouterr().err


def test_compare_reports_ratios_and_gates_regressions(tmp_path: Path, test_set):
    labels = test_set.labels
    truth = {i: int(labels[i]) for i in range(IMAGES)}
    fast = _report_from_samples([1000] * 98 + [2000] * 2, 0, truth, (0.0, 10.0), labels)
    slow = _report_from_samples([1000] * 90 + [5000] * 10, 0, truth, (0.0, 10.0), labels)
    fast.save(tmp_path / "base.json")
    slow.save(tmp_path / "cand.json")
    out = io.StringIO()
    assert main(["compare", str(tmp_path / "base.json"), str(tmp_path / "cand.json")], out=out) == EXIT_OK
    assert "x2.50" in out.getvalue()  # p99 2 ms -> 5 ms
    out = io.StringIO()
    code = main(["compare", str(tmp_path / "base.json"), str(tmp_path / "cand.json"), "--max-p99-increase", "10",
                 "--json", str(tmp_path / "cmp.json")], out=out)
    assert code == EXIT_FAILED
    assert "FAIL rest at concurrency 8: p99_ms 2.000 -> 5.003 (+150.2% > 10%)" in out.getvalue()
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert data["passed"] is False and data["changes"][0]["ratio"]["p50_ms"] == 1.0


def test_table_of_an_empty_sweep_point_is_readable():
    report = Report(measurements=[Measurement("rest", "rest", "http://h:1", "closed", 1, 1)])
    text = format_table(report)
    assert "rest" in text and "served accuracy  rest: -" in text


def test_latency_limits_fail_when_every_request_failed():
    m = Measurement("rest", "rest", "http://h:1", "closed", 1, 1)
    m.record_error("unavailable", "UNAVAILABLE", "refused")
    failures = Report(measurements=[m]).check(Thresholds(max_p99_ms=10))
    assert failures == ["rest at concurrency 1: no successful request, so no p99 to hold to 10 ms"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress(**changes) -> Progress:
    base = dict(target="rest", mode="closed", point=4.0, phase=1, phases=2, completed=50, errors=1, elapsed_s=0.5,
                total_requests=None, duration_s=2.0)
    return Progress(**{**base, **changes})


def test_progress_bar_on_a_terminal_and_status_lines_in_logs():
    terminal = _Terminal()
    display = ProgressDisplay(terminal)
    display(_progress())
    display(_progress(completed=200, elapsed_s=2.0, finished=True))
    display.close()
    shown = terminal.getvalue()
    assert "[1/2] rest c=4" in shown and "200 req, 1 err, 100 req/s" in shown

    log = io.StringIO()
    display = ProgressDisplay(log, interval_s=60.0)
    display(_progress())  # within the first interval: quiet
    display(_progress(phase=2, target="grpc", mode="open", point=100.0, completed=300, elapsed_s=3.0,
                      total_requests=300, finished=True))
    assert log.getvalue() == "[2/2] grpc rate=100: done, 300 requests, 1 errors, 100 req/s\n"


def test_merge_refuses_to_count_a_run_twice(tmp_path: Path, test_set):
    labels = test_set.labels
    truth = {i: int(labels[i]) for i in range(IMAGES)}
    _report_from_samples([1000] * 10, 0, truth, (0.0, 1.0), labels).save(tmp_path / "results" / "result-0.json")
    _report_from_samples([2000] * 10, 0, truth, (0.0, 1.0), labels).save(tmp_path / "results" / "result-1.json")
    merged = tmp_path / "results" / "merged.json"
    for _ in range(2):  # the second time, the earlier output sits in the input directory and is left out
        assert main(["merge", str(tmp_path / "results"), "--json", str(merged)], out=io.StringIO()) == EXIT_OK
        assert load_report(merged).measurements[0].ok == 20
    code = main(["merge", str(merged), str(tmp_path / "results" / "result-0.json")], out=io.StringIO())
    assert code == EXIT_ERROR


def test_table_warns_when_the_load_generator_was_the_bottleneck():
    busy = Measurement("rest", "rest", "http://h:1", "closed", 16, 1, generator_busy=0.97, generator_cpu_s=4.0)
    calm = Measurement("grpc", "grpc", "h:2", "closed", 16, 1, generator_busy=0.3)
    text = format_table(Report(measurements=[busy, calm]))
    assert "warning          rest at 16: a load-tester process used 97% of a CPU" in text
    assert "grpc at 16: a load-tester" not in text
