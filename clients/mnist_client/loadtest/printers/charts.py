"""Small inline SVG line charts (no plotting library, no external assets)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 760, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 36, 52

Series = tuple[str, Sequence[tuple[float, float]]]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < high - step * 1e-9:  # the last tick is at or above ``high``: nothing is drawn outside
        ticks.append(round(start + len(ticks) * step, 10))
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.0f}"
    return f"{value:.3g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_ticks: Sequence[tuple[float, str]] | None = None,
    x_transform: Callable[[float], float] = lambda x: x,
) -> str:
    """An SVG chart with one line (and point markers with tooltips) per series."""
    points = [(x_transform(x), y) for _, data in series for x, y in data]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">',
        f'<text x="{WIDTH / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT / 2:.0f}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if x_ticks is not None:
        tick_positions = [(x_transform(v), label) for v, label in x_ticks]
        x_low = min(min(xs), *(t for t, _ in tick_positions))
        x_high = max(max(xs), *(t for t, _ in tick_positions))
    else:
        ticks = nice_ticks(min(xs), max(xs))
        tick_positions = [(t, _fmt(t)) for t in ticks]
        x_low, x_high = min(ticks), max(ticks)
    if x_high <= x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_ticks = nice_ticks(0.0, max(ys) * 1.05 if max(ys) > 0 else 1.0)
    y_high = max(y_ticks)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - (y / y_high) * plot_h

    for y in y_ticks:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x, label in tick_positions:
        if x_low <= x <= x_high:
            parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#f0f0f0"/>')
            parts.append(f'<text x="{sx(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(16,{TOP + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>'
    )
    for i, (name, data) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        coords = [(sx(x_transform(x)), sy(y), x, y) for x, y in data]
        if len(coords) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in coords)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for px, py, x, y in coords[:: max(1, len(coords) // 40)]:
            parts.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"><title>{escape(name)}: '
                f"{_fmt(x)} → {y:.3f}</title></circle>"
            )
        ly = TOP + 14 + i * 18
        parts.append(f'<rect x="{LEFT + plot_w + 12}" y="{ly - 9}" width="12" height="12" fill="{color}"/>')
        parts.append(f'<text x="{LEFT + plot_w + 30}" y="{ly + 1}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# HDR-style percentile axis: 0%, 90%, 99%, 99.9%... equally spaced.
PERCENTILE_TICKS = ((0.0, "0%"), (90.0, "90%"), (99.0, "99%"), (99.9, "99.9%"), (99.99, "99.99%"))
_MAX_NINES = 5.0


def percentile_position(percentile: float) -> float:
    """-log10(1 - p): 0 for 0%, 1 for 90%, 2 for 99%... (capped for 100%)."""
    remaining = 1.0 - percentile / 100.0
    return _MAX_NINES if remaining <= 10**-_MAX_NINES else -math.log10(remaining)
