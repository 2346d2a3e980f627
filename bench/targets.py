"""Issue targets as the benchmarks report them: one record per target, PASS or MISS, one table.

Each benchmark that checks targets returns them under ``"targets"`` (a list of :func:`target`
records); ``bench.run_all`` prints every benchmark's targets together at the end of ``make bench``.
"""

from __future__ import annotations

from typing import Any, Literal


def target(
    name: str, measured: float, limit: float, *, better: Literal["higher", "lower"], unit: str = "x", detail: str = ""
) -> dict[str, Any]:
    """``name`` passes when ``measured`` is at least (``better="higher"``) or at most (``"lower"``) ``limit``."""
    passed = measured >= limit if better == "higher" else measured <= limit
    return {"name": name, "measured": round(float(measured), 3), "limit": limit, "unit": unit, "better": better,
            "pass": bool(passed), "detail": detail}  # fmt: skip


def format_targets(targets: list[dict[str, Any]], title: str = "targets") -> str:
    """A table: PASS/MISS, the target, the measured value against its limit, and the figures behind it."""
    lines = [f"{title}:"]
    for t in targets:
        sign = ">=" if t["better"] == "higher" else "<="
        unit = t["unit"]
        lines.append(f"  {'PASS' if t['pass'] else 'MISS'}  {t['name']}: {t['measured']:g}{unit} "
                     f"(target {sign} {t['limit']:g}{unit})" + (f"; {t['detail']}" if t["detail"] else ""))  # fmt: skip
    return "\n".join(lines)
