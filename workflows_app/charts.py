"""Charts drawn on the server as SVG: no script, no CDN, readable without
colour (one measure per chart, its name and scale written out, each bar with
its value as a tooltip) and with the figures in a table for screen readers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

WIDTH, HEIGHT = 360, 120
LEFT, BOTTOM, TOP = 34, 18, 8


@dataclasses.dataclass(frozen=True)
class Bar:
    label: str  # what the interval is, e.g. "02 Dec 14:00"
    value: int


def interval_label(start: datetime, hourly: bool) -> str:
    return start.strftime("%H:00" if hourly else "%d %b %H:00")


def nice_max(value: int) -> int:
    """A round top for the scale: 1, 2, 5, 10, 20, 50, …"""
    top = 1
    while top < value:
        for factor in (2, 5 / 2, 2):
            top = int(top * factor)
            if top >= value:
                break
    return top


def bar_chart(title: str, bars: Sequence[Bar], *, css: str) -> SafeString:
    """A bar per interval, the scale on the left, first and last interval
    named below."""
    top = nice_max(max((b.value for b in bars), default=0))
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(1, len(bars))
    rects = format_html_join(
        "",
        '<rect x="{}" y="{}" width="{}" height="{}"><title>{}: {}</title></rect>',
        (
            (
                f"{LEFT + i * slot + slot * 0.1:.1f}",
                f"{TOP + plot_h - plot_h * bar.value / top:.1f}",
                f"{slot * 0.8:.1f}",
                f"{plot_h * bar.value / top:.1f}",
                bar.label,
                bar.value,
            )
            for i, bar in enumerate(bars)
        ),
    )
    total = sum(b.value for b in bars)
    first = bars[0].label if bars else ""
    last = bars[-1].label if bars else ""
    return format_html(
        '<svg class="chart chart--{}" viewBox="0 0 {} {}" role="img" '
        'aria-label="{}: {} in all, at most {} per interval">'
        '<line class="chart__axis" x1="{}" y1="{}" x2="{}" y2="{}"/>'
        '<text class="chart__scale" x="{}" y="{}" text-anchor="end">{}</text>'
        '<text class="chart__scale" x="{}" y="{}" text-anchor="end">0</text>'
        '<g class="chart__bars">{}</g>'
        '<text class="chart__scale" x="{}" y="{}">{}</text>'
        '<text class="chart__scale" x="{}" y="{}" text-anchor="end">{}</text>'
        "</svg>",
        css,
        WIDTH,
        HEIGHT,
        title,
        total,
        max((b.value for b in bars), default=0),
        LEFT,
        TOP + plot_h,
        WIDTH - 4,
        TOP + plot_h,
        LEFT - 4,
        TOP + 8,
        top,
        LEFT - 4,
        TOP + plot_h,
        rects,
        LEFT,
        HEIGHT - 4,
        first,
        WIDTH - 4,
        HEIGHT - 4,
        last,
    )


def at_most(seconds: float | None) -> str:
    """A duration bucket's upper bound in words: "≤ 2.5 s", "> 1 day"."""
    if seconds is None:
        return "–"
    if seconds == float("inf"):
        return "> 1 day"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            amount = seconds / size
            shown = f"{amount:g}"
            return f"≤ {shown} {unit}{'s' if unit == 'day' and amount != 1 else ''}"
    return f"≤ {seconds:g} s"
