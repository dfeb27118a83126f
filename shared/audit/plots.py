"""Small, dependency-free SVG line charts for the audit report (no JavaScript, no external resources)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


@dataclass(frozen=True)
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float]  # inf is drawn at the top edge with a marker
    color: str = PALETTE[0]
    dashed: bool = False


@dataclass(frozen=True)
class Rule:
    """A horizontal (budget) or vertical (run boundary) reference line with a label."""

    value: float
    label: str
    color: str = "#555555"
    dash: str = "8 4"  # horizontal rules: the budget's long dashes; a reference line uses short ones


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    hrules: Sequence[Rule] = field(default_factory=tuple)
    vrules: Sequence[Rule] = field(default_factory=tuple)
    y_min: float | None = None
    y_max: float | None = None
    x_min: float | None = None  # the x range, when several plots share one axis (else: the data's)
    x_max: float | None = None
    integer_x: bool = True  # rounds, ledger entries
    x_ticks: Sequence[tuple[float, str]] | None = None  # explicit (position, label) ticks instead of round numbers


def nice_ticks(lo: float, hi: float, count: int = 5, *, min_step: float = 0.0) -> list[float]:
    """About ``count`` round tick values covering [lo, hi], ``min_step`` apart at least (1: integers)."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if min_step >= 1 else (1, 2, 2.5, 5, 10)
    step = max(min_step, next(m * magnitude for m in steps if m * magnitude >= raw))
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _tag(name: str, text: str | None = None, **attrs: object) -> str:
    """One SVG element; attribute names use ``_`` for ``-`` (``font_size`` -> ``font-size``)."""
    rendered = " ".join(
        f'{k.rstrip("_").replace("_", "-")}="{html.escape(f"{v:.1f}" if isinstance(v, float) else str(v))}"'
        for k, v in attrs.items()
    )
    if text is None:
        return f"<{name} {rendered}/>"
    return f"<{name} {rendered}>{html.escape(text)}</{name}>"


def render_svg(chart: Chart, *, width: int = 640, height: int = 300) -> str:
    """An inline ``<svg>`` line chart: axes, ticks, one polyline and markers per series, rules, legend."""
    left, right, top, bottom = 58, 16, 30, 46
    pw, ph = width - left - right, height - top - bottom
    points = [(x, y) for s in chart.series for x, y in zip(s.xs, s.ys, strict=True)]
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    has_inf = any(math.isinf(y) for _, y in points)
    xs = [x for x, _ in finite] + [r.value for r in chart.vrules]
    ys = [y for _, y in finite] + [r.value for r in chart.hrules if math.isfinite(r.value)]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x_lo = chart.x_min if chart.x_min is not None else x_lo
    x_hi = chart.x_max if chart.x_max is not None else x_hi
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_lo = chart.y_min if chart.y_min is not None else min([0.0, *ys])
    y_hi = chart.y_max if chart.y_max is not None else (max(ys) * 1.1 if ys else 1.0)
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0
    y_ticks = nice_ticks(y_lo, y_hi)
    y_hi = max(y_hi, y_ticks[-1])

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        if math.isinf(y):
            return float(top)
        return top + ph - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * ph

    out = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(chart.title)}">',
        _tag("rect", x=0, y=0, width=width, height=height, fill="#ffffff"),
        _tag("text", chart.title, x=width / 2, y=18, text_anchor="middle", font_size=14, font_weight="bold"),
    ]
    for t in y_ticks:
        y = py(t)
        out.append(_tag("line", x1=left, y1=y, x2=left + pw, y2=y, stroke="#e6e6e6"))
        out.append(_tag("text", _fmt(t), x=left - 6, y=y + 4, text_anchor="end", font_size=11))
    if chart.x_ticks is not None:
        every = max(1, math.ceil(len(chart.x_ticks) / 24))  # at most ~24 labels fit under 640 pixels
        x_ticks = [(float(t), label) for i, (t, label) in enumerate(chart.x_ticks) if i % every == 0]
    else:
        x_ticks = [(t, _fmt(t)) for t in nice_ticks(x_lo, x_hi, count=8, min_step=1.0 if chart.integer_x else 0.0)]
    for t, label in x_ticks:
        if x_lo <= t <= x_hi:
            x = px(t)
            out.append(_tag("line", x1=x, y1=top + ph, x2=x, y2=top + ph + 4, stroke="#333333"))
            out.append(_tag("text", label, x=x, y=top + ph + 16, text_anchor="middle", font_size=11))
    out.append(_tag("rect", x=left, y=top, width=pw, height=ph, fill="none", stroke="#333333"))
    out.append(_tag("text", chart.x_label, x=left + pw / 2, y=height - 8, text_anchor="middle", font_size=12))
    mid = top + ph / 2
    out.append(
        _tag(
            "text",
            chart.y_label,
            x=14,
            y=mid,
            text_anchor="middle",
            font_size=12,
            transform=f"rotate(-90 14 {mid})",
        )
    )
    for r in chart.vrules:
        x = px(r.value)
        out.append(_tag("line", x1=x, y1=top, x2=x, y2=top + ph, stroke=r.color, stroke_dasharray="2 3"))
        out.append(_tag("text", r.label, x=x + 3, y=top + ph - 5, font_size=10, fill=r.color))
    for r in chart.hrules:
        if math.isfinite(r.value):
            y = py(r.value)
            out.append(
                _tag(
                    "line",
                    x1=left,
                    y1=y,
                    x2=left + pw,
                    y2=y,
                    stroke=r.color,
                    stroke_width=2,
                    stroke_dasharray=r.dash,
                )
            )
            out.append(_tag("text", r.label, x=left + pw - 4, y=y - 4, text_anchor="end", font_size=11, fill=r.color))
    for s in chart.series:
        drawn = [(px(x), py(y), y) for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(x) and not math.isnan(y)]
        if len(drawn) > 1:
            line = {"stroke_dasharray": "6 3"} if s.dashed else {}
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in drawn)
            out.append(_tag("polyline", points=path, fill="none", stroke=s.color, stroke_width=2.5, **line))
        for x, y, raw in drawn:
            if math.isinf(raw):  # a triangle pinned to the top edge
                d = f"M{x - 5:.1f},{y + 8:.1f} L{x:.1f},{y:.1f} L{x + 5:.1f},{y + 8:.1f} Z"
                out.append(_tag("path", d=d, fill=s.color))
            else:
                out.append(_tag("circle", cx=x, cy=y, r=3.5, fill=s.color))
    for i, s in enumerate(chart.series):
        y = top + 14 + 15 * i
        out.append(_tag("rect", x=left + 8, y=y - 8, width=12, height=4, fill=s.color))
        out.append(_tag("text", s.name, x=left + 24, y=y - 3, font_size=11))
    if has_inf:
        note = "\u25b2 at the top edge: epsilon = inf (no noise)"
        out.append(_tag("text", note, x=left + pw - 4, y=top + ph - 6, text_anchor="end", font_size=10, fill="#d62728"))
    if not finite and not has_inf:
        out.append(_tag("text", "no data", x=left + pw / 2, y=mid, text_anchor="middle", font_size=13, fill="#777777"))
    out.append("</svg>")
    return "\n".join(out)
