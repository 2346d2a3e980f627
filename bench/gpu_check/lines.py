"""The GPU check's output: one line per fact, each tagged with the mode the check ran in.

On a machine without CUDA (``--allow-cpu``) every line starts with a tag that says the run was on the
CPU, so that no line of it, copied alone, can pass for a GPU figure.
"""

from __future__ import annotations

import sys
from typing import TextIO

CUDA_TAG = "[gpu-check CUDA]"
CPU_TAG = "[gpu-check CPU ONLY: no CUDA device, --allow-cpu]"


def tag_for(cuda: bool) -> str:
    return CUDA_TAG if cuda else CPU_TAG


class Lines:
    """Prints tagged lines as they come and keeps them for the result file."""

    def __init__(self, tag: str, stream: TextIO | None = None) -> None:
        self.tag = tag
        self.stream = stream
        self.printed: list[str] = []

    def say(self, text: str) -> None:
        for part in text.splitlines() or [""]:
            line = f"{self.tag} {part}"
            print(line, file=self.stream or sys.stdout, flush=True)
            self.printed.append(line)


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def figures(summary: dict) -> str:
    """A load level's figures in one phrase: req/s, latency percentiles, errors, accuracy."""
    latency = summary["latency_ms"]
    accuracy = summary.get("accuracy")
    return (f"{summary['throughput_rps']:,.0f} req/s, p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms, "
            f"p99.9 {latency['p99.9']:.2f} ms, {summary['requests']:,} requests, {summary['errors']} errors, "
            f"accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'}")
