"""Stacked bar charts as inline SVG, rendered on the server.

Text and grid lines use the admin's CSS variables (``--body-quiet-color``,
``--hairline-color``), so a chart follows the light or dark theme; the series colours are
mid-tone hues that read on both. Every bar carries a ``<title>`` (its series and value: a
tooltip, and what tests read), and the chart an ``aria-label``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

__all__ = ["PALETTE", "Chart", "Series", "stacked_bars"]

# Tableau 10's first hues: distinct, and legible on white and on the dark theme's grey.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#9c755f")
WIDTH, HEIGHT = 640, 180
LEFT, BOTTOM, TOP = 56, 22, 8


@dataclass(frozen=True)
class Series:
    """One stacked series: its name and one value per bucket."""

    name: str
    values: Sequence[int]


@dataclass(frozen=True)
class Chart:
    """A rendered chart: the SVG and its legend (series names and colours)."""

    svg: SafeString
    legend: list[tuple[str, str]]
    total: int
    total_shown: str


def stacked_bars(
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    fmt: Callable[[int], str] = lambda v: f"{v:,}",
    every: int = 1,
) -> Chart:
    """Bars per bucket (``labels``), one stacked segment per series; every ``every``-th
    label is printed under its bar."""
    top = max([sum(s.values[i] for s in series) for i in range(len(labels))] + [0])
    scale = (HEIGHT - BOTTOM - TOP) / top if top else 0.0
    slot = (WIDTH - LEFT) / max(len(labels), 1)
    parts = [_axis(top, fmt)]
    for i, label in enumerate(labels):
        parts.append(_column(i, label, series, slot, scale, fmt))
        if i % every == 0:
            x = LEFT + slot * (i + 0.5)
            parts.append(
                format_html('<text x="{}" y="{}" class="tick">{}</text>', _n(x), HEIGHT - 6, label)
            )
    legend = [(s.name, PALETTE[n % len(PALETTE)]) for n, s in enumerate(series)]
    total = sum(sum(s.values) for s in series)
    svg = format_html(
        '<svg class="quota-chart" viewBox="0 0 {} {}" role="img" aria-label="{}">{}</svg>',
        WIDTH,
        HEIGHT,
        f"{title}: {fmt(total)} in all",
        mark_safe("".join(parts)),
    )
    return Chart(svg, legend, total, fmt(total))


def _axis(top: int, fmt: Callable[[int], str]) -> SafeString:
    base = HEIGHT - BOTTOM
    lines = [
        format_html(
            '<line x1="{}" x2="{}" y1="{}" y2="{}" class="grid"/>', LEFT, WIDTH, base, base
        ),
        format_html('<line x1="{}" x2="{}" y1="{}" y2="{}" class="grid"/>', LEFT, WIDTH, TOP, TOP),
        format_html('<text x="{}" y="{}" class="axis">{}</text>', LEFT - 4, TOP + 8, fmt(top)),
        format_html('<text x="{}" y="{}" class="axis">0</text>', LEFT - 4, base),
    ]
    return mark_safe("".join(lines))


def _column(
    i: int,
    label: str,
    series: Sequence[Series],
    slot: float,
    scale: float,
    fmt: Callable[[int], str],
) -> SafeString:
    # Built with f-strings (a chart has hundreds of bars): only text is escaped, once;
    # the numbers and colours are this module's own.
    y = float(HEIGHT - BOTTOM)
    x, width = _n(LEFT + slot * i + slot * 0.1), _n(slot * 0.8)
    rects = []
    for n, s in enumerate(series):
        value = s.values[i]
        if value <= 0:
            continue
        height = max(value * scale, 1.0)
        y -= height
        title = escape(f"{label} · {s.name}: {fmt(value)}")
        rects.append(
            f'<rect x="{x}" y="{_n(y)}" width="{width}" height="{_n(height)}" '
            f'fill="{PALETTE[n % len(PALETTE)]}"><title>{title}</title></rect>'
        )
    return mark_safe("".join(rects))


def _n(value: float) -> str:
    return f"{value:.1f}"
