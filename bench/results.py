"""The one way every benchmark writes its result: JSON into the output folder, a table on stdout."""

from __future__ import annotations

import json
import logging
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
