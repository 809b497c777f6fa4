"""Small inline SVG bar charts (no JavaScript, no external files): the dashboard's histograms.

Example:
    >>> svg = bar_chart([3, 1, 0, 2], [0.0, 0.5, 1.0, 1.5, 2.0], label="activation")
    >>> svg.startswith("<svg") and svg.count("<rect") == 3
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

__all__ = ["bar_chart", "number"]


def number(x: float | int | None) -> str:
    """The dashboard's one number format: 4 significant digits, '–' for a missing value."""
    if x is None or x != x:
        return "–"
    return f"{x:.4g}"


def bar_chart(
    counts: Sequence[int | float],
    edges: Sequence[float],
    *,
    label: str,
    ends: tuple[str, str] | None = None,
    width: int = 300,
    height: int = 96,
    color: str = "#e07b00",
) -> str:
    """A histogram as an SVG string: one bar per bin, the x range and the tallest count labelled.

    Args:
        counts: Bar heights (``len(edges) - 1`` of them).
        edges: Bin edges.
        label: What the x axis measures.
        ends: Labels of the x axis' two ends (default: the first and last edge).
        width: Width in pixels.
        height: Height of the plotting area in pixels.
        color: Bar colour.
    """
    if len(edges) != len(counts) + 1:
        raise ValueError(f"need len(edges) == len(counts) + 1 (got {len(edges)} edges, {len(counts)} counts)")
    top = max(counts) if len(counts) and max(counts) > 0 else 1
    step = width / max(len(counts), 1)
    low, high = ends or (number(edges[0]), number(edges[-1]))
    bar_width = f"{max(step - 1, 1):.3g}"
    base = height + 14  # 14 px above the bars for the "max" label
    bars = []
    for j, c in enumerate(counts):
        if c > 0:
            h = max(1, round(c / top * height))
            bars.append(f'<rect x="{j * step:.4g}" y="{base - h}" width="{bar_width}" height="{h}"/>')
    return (
        f'<svg class="wsd-chart" width="{width}" height="{base + 28}" viewBox="0 0 {width} {base + 28}" '
        f'role="img" aria-label="{escape(label)} histogram"><g fill="{color}">{"".join(bars)}</g>'
        f'<line x1="0" y1="{base + 0.5}" x2="{width}" y2="{base + 0.5}" stroke="#888"/>'
        f'<text x="0" y="{base + 12}">{escape(low)}</text>'
        f'<text x="{width}" y="{base + 12}" text-anchor="end">{escape(high)}</text>'
        f'<text x="{width / 2}" y="{base + 25}" text-anchor="middle">{escape(label)}</text>'
        f'<text x="0" y="10">tallest bar: {number(top)}</text></svg>'
    )
