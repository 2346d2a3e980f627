"""The one way every benchmark writes its result: JSON into the output folder, a table on stdout."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_result(output_dir: Path, name: str, result: dict[str, Any], table: str) -> Path:
    """Write ``<output_dir>/<name>.json``, print ``table`` (the benchmark's own summary) and return the path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    log.info("wrote %s", out)
    return out


# A figure whose rounds differ by more than this (max - min over the median) is flagged in the tables.
SPREAD_FLAG_PCT = 20.0


def spread_summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and spread ((max - min) / median, in %) of one figure over interleaved rounds."""
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median * 100 if median else 0.0
    return {
        "median": round(median, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread_pct": round(spread, 1),
        "flagged": spread > SPREAD_FLAG_PCT,
        "values": values,
    }


def summarise_rounds(
    rounds: list[dict[str, Any]], figures: dict[str, tuple[str, str]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per target (the keys of each round), each figure's :func:`spread_summary` over the rounds;
    ``figures`` maps a figure's name to the (run, statistic) it is read from. A statistic a run did
    not record (None) is left out of its figure."""
    return {
        target: {
            figure: spread_summary([r[target][run][stat] for r in rounds if r[target][run][stat] is not None] or [0.0])
            for figure, (run, stat) in figures.items()
        }
        for target in rounds[0]
    }
