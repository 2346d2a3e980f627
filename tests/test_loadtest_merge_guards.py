"""Result files and their merge: what is refused, what a damaged file raises, and what survives the file.

Reports are built here from known counts (no server needed), written with ``Report.save`` and read back
through ``load_report`` and the ``mnist-loadtest merge`` command, as a user's files would be.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mnist_client.loadtest import load_report
from mnist_client.loadtest.cli import EXIT_ERROR, EXIT_OK, main
from mnist_client.loadtest.errors import ResultFileError
from mnist_client.loadtest.merge import merge_files
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import HIGHEST_US, Measurement

OVER_THE_TOP_US = HIGHEST_US * 2  # slower than the histogram's range: recorded as clamped


def measurement(images_per_request: int = 1, point: float = 4.0, protocol: str = "rest") -> Measurement:
    """Three answered requests, one of them past the histogram's range, and three late sends, one clamped."""
    m = Measurement("tfs", protocol, "http://h:1", "open", point, images_per_request)
    m.latency.record_many([1_000, 2_000, OVER_THE_TOP_US])
    m.send_lag.record_many([10, 250, OVER_THE_TOP_US])
    m.ok, m.scheduled, m.images, m.correct = 3, 3, 3 * images_per_request, 3 * images_per_request
    m.windows.append((1_000.0, 1_002.0))
    return m


def saved(tmp_path: Path, name: str, *measurements: Measurement) -> Path:
    return Report(measurements=list(measurements), runs=[name]).save(tmp_path / f"{name}.json")


def test_clamped_counts_and_the_send_lag_histogram_survive_the_file(tmp_path: Path) -> None:
    original = measurement()
    (back,) = load_report(saved(tmp_path, "a", original)).measurements
    assert back.latency.clamped == 1 and back.send_lag.clamped == 1
    assert back.latency == original.latency and back.send_lag == original.send_lag  # bucket by bucket
    assert back.send_lag.count == 3 and back.send_lag.min == 10


def test_merged_files_add_clamped_counts_and_send_lag(tmp_path: Path) -> None:
    paths = [saved(tmp_path, "a", measurement()), saved(tmp_path, "b", measurement())]
    merged_path = tmp_path / "merged.json"
    assert main(["merge", *map(str, paths), "--json", str(merged_path)], out=io.StringIO()) == EXIT_OK
    (m,) = load_report(merged_path).measurements
    assert (m.latency.count, m.latency.clamped) == (6, 2)
    assert (m.send_lag.count, m.send_lag.clamped) == (6, 2)
    assert m.ok == 6 and m.scheduled == 6


def test_merging_results_of_different_payloads_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one = saved(tmp_path, "one-image", measurement(images_per_request=1))
    eight = saved(tmp_path, "eight-images", measurement(images_per_request=8))
    with pytest.raises(ResultFileError, match="one file sent 1 images per request, another 8; results of "
                                              "different payloads cannot be merged"):
        merge_files([one, eight])
    assert main(["merge", str(one), str(eight)], out=io.StringIO()) == EXIT_ERROR
    assert "different payloads cannot be merged" in capsys.readouterr().err


def test_a_target_name_used_for_two_protocols_is_refused(tmp_path: Path) -> None:
    rest = saved(tmp_path, "rest", measurement(protocol="rest"))
    grpc = saved(tmp_path, "grpc", measurement(protocol="grpc"))
    with pytest.raises(ResultFileError, match="target 'tfs' is rest in one file and grpc in another"):
        merge_files([rest, grpc])


def test_adding_a_measurement_of_another_key_is_refused() -> None:
    with pytest.raises(ResultFileError, match=r"cannot add measurement \('tfs', 'open', 8.0\) to \('tfs', 'open', 4.0\)"):
        measurement(point=4.0).add(measurement(point=8.0))


def _damage(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data["results"][0])
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: path.write_text(path.read_text()[:200]), "not JSON"),
        (lambda path: _damage(path, lambda entry: entry["histogram"].update(data="bm90IGEgaGlzdG9ncmFt")),
         "not an encoded HDR histogram"),
        (lambda path: _damage(path, lambda entry: entry["send_lag_histogram"].update(data="")),
         "not an encoded HDR histogram"),
        (lambda path: _damage(path, lambda entry: entry.pop("ok")), "lacks or mangles 'ok'"),
        (lambda path: _damage(path, lambda entry: entry.update(windows="yesterday")), "lacks or mangles"),
        (lambda path: path.write_text(json.dumps({"schema": "something-else/1"})), "schema 'something-else/1'"),
    ],
    ids=["truncated", "latency-histogram", "send-lag-histogram", "missing-field", "mangled-field", "schema"],
)
def test_a_damaged_result_file_raises_result_file_error_naming_it(tmp_path: Path, damage, message: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    path = saved(tmp_path, "a", measurement())
    damage(path)
    with pytest.raises(ResultFileError) as caught:
        load_report(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)
    assert main(["merge", str(path)], out=io.StringIO()) == EXIT_ERROR
    assert message in capsys.readouterr().err
