"""Exact merge of result files: histograms and counters are added, never percentiles averaged.

Each (target, mode, sweep point) adds bucket by bucket across files, so the merged p99 is the p99 of
every request of every file, exactly as if one machine had sent them all (to the histogram's 0.1%
resolution). Elapsed time is the union of the files' measured wall-clock windows: pods that ran at
the same time give an aggregate rate, runs made one after the other add their durations. Any set of
files can be merged, from one machine or many; entries present in only some files are kept as they
are.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path

from mnist_client.loadtest.errors import ResultFileError
from mnist_client.loadtest.report import UNSEEN, Report, load_report
from mnist_client.loadtest.stats import Measurement


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and every ``*.json`` inside a given directory (sorted), e.g. a Job's results volume."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if p.is_file())
            if not found:
                raise ResultFileError(f"{path}: directory holds no *.json result file")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise ResultFileError("no result file given; expected one or more JSON files written by `mnist-loadtest run`")
    return files


def merge_reports(reports: list[Report]) -> Report:
    """One report holding the sum of ``reports`` (which are left unchanged)."""
    if not reports:
        raise ResultFileError("nothing to merge: no report given")
    seen: set[str] = set()
    for report in reports:
        repeated = seen.intersection(report.runs)
        if repeated:
            raise ResultFileError(
                f"run {sorted(repeated)[0]} is in more than one of the files (a merged file given with its own "
                "inputs?); merging it twice would count its requests twice"
            )
        seen.update(report.runs)
    merged: dict[tuple[str, str, float], Measurement] = {}
    protocols: dict[str, str] = {}
    for report in reports:
        for m in report.measurements:
            known = protocols.setdefault(m.target, m.protocol)
            if known != m.protocol:
                raise ResultFileError(
                    f"target {m.target!r} is {known} in one file and {m.protocol} in another; "
                    "rename one of them (NAME=ADDRESS) before merging"
                )
            if m.key in merged:
                merged[m.key].add(m)
            else:
                merged[m.key] = copy.deepcopy(m)

    predictions = {}
    inconsistent: dict[str, int] = {}
    for report in reports:
        for name, count in report.inconsistent_predictions.items():
            inconsistent[name] = inconsistent.get(name, 0) + count
        for name, other in report.predictions.items():
            mine = predictions.get(name)
            if mine is None:
                predictions[name] = other.copy()
                continue
            both = (mine != UNSEEN) & (other != UNSEEN)
            differing = int((mine[both] != other[both]).sum())
            if differing:
                inconsistent[name] = inconsistent.get(name, 0) + differing
            fill = mine == UNSEEN
            mine[fill] = other[fill]

    hosts = list(dict.fromkeys(h for report in reports for h in report.hosts))
    config = dict(reports[0].config)
    return Report(
        measurements=list(merged.values()),
        predictions=predictions,
        config=config,
        hosts=hosts,
        sources=sum(report.sources for report in reports),
        runs=[run for report in reports for run in report.runs],
        inconsistent_predictions=inconsistent,
    )


def merge_files(paths: Iterable[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None) -> Report:
    """Load and merge result files (directories contribute their ``*.json``), leaving out ``exclude``
    (the output file, which may sit in an input directory from an earlier merge)."""
    files = expand_paths(paths)
    if exclude is not None:
        files = [f for f in files if f.resolve() != Path(exclude).resolve()]
        if not files:
            raise ResultFileError(f"nothing to merge: the only input is the output file {exclude}")
    reports = [load_report(path) for path in files]
    try:
        return merge_reports(reports)
    except ResultFileError as exc:
        raise ResultFileError(f"{exc} (files: {', '.join(str(f) for f in files)})") from None
