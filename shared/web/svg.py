"""Line charts drawn on the server as inline SVG: no script, no chart library, nothing fetched.

Both screens need a few small charts (predicted benefit and harm against dose on the clinician's page; metric
and privacy curves on the coordinator's dashboard). A chart library in the browser would have to be vendored
with its licence and would run script in a clinical page; the charts here are a handful of polylines, so the
server draws them. Text is XML-escaped; the SVG has ``role="img"`` and a ``<title>`` for screen readers.

Colours are Okabe & Ito's colour-blind-safe palette (Okabe M., Ito K., "Color Universal Design", 2008,
https://jfly.uni-koeln.de/color/), in their order. Axis ticks are "nice" numbers (1, 2, 5 × 10ᵏ; Heckbert P.,
"Nice numbers for graph labels", Graphics Gems, 1990).

Example
-------
>>> svg = line_chart([Series("response", [10, 20, 30], [0.2, 0.4, 0.5])], title="Benefit",
...                  x_label="dose (mg/m²)", y_label="probability", marker_x=20, marker_label="chosen")
>>> svg.startswith("<svg") and "chosen" in svg
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
"""Series colours, in order (blue, vermillion, bluish green, reddish purple, orange, sky blue, yellow, black)."""


@dataclass(frozen=True)
class Series:
    """One line: ``y[i]`` at ``x[i]``; ``lower``/``upper`` (same length) draw a shaded band around it.

    A value that is ``None`` or not finite breaks the line (and the band) there rather than being drawn as 0.
    """

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    lower: Sequence[float | None] | None = None
    upper: Sequence[float | None] | None = None

    def __post_init__(self) -> None:
        for name in ("y", "lower", "upper"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.x):
                raise ValueError(f"series {self.label!r}: {name} has {len(values)} values for {len(self.x)} x values")


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]`` (steps of 1, 2 or 5 × 10ᵏ); whole steps only
    with ``integer`` (rounds, cycles: no "round 1.5")."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("tick range must be finite")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw - 1e-12 * power)
    if integer:
        step = max(step, 1.0)
    first = math.floor(low / step + 1e-9) * step
    ticks = [round(first, 12)]
    while ticks[-1] < high - step * 1e-9 or len(ticks) < 2:
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _runs(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Split points into runs of consecutive finite values (a missing value breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if _finite(x) and _finite(y):
            runs[-1].append((float(x), float(y)))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str,
               marker_x: float | None = None, marker_label: str | None = None,
               width: int = 560, height: int = 320, y_range: tuple[float, float] | None = None) -> str:
    """An inline ``<svg>`` of the series on shared axes, with a legend and an optional vertical marker.

    ``y_range`` fixes the y axis (e.g. ``(0, 1)`` for probabilities); otherwise it spans the data (bands
    included). ``marker_x`` draws a dashed vertical line labelled ``marker_label`` (e.g. the chosen dose).
    A chart with no finite point says so in its body instead of drawing empty axes.
    """
    left, right, top, bottom = 64, 16, 34, 48 + 18 * ((len(series) + 2) // 3)
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [float(x) for s in series for x in s.x if _finite(x)]
    ys = [float(v) for s in series for values in (s.y, s.lower or (), s.upper or ()) for v in values if _finite(v)]
    if marker_x is not None and _finite(marker_x):
        xs.append(float(marker_x))
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}"><title>{escape(title)}</title>',
             f'<text x="{left}" y="20" font-size="14" font-weight="600" fill="#1d232b">{escape(title)}</text>']
    if not xs or not ys:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="13" '
                     f'fill="#5b6672">no data yet</text></svg>')
        return "".join(parts)
    x_ticks = nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    y_ticks = nice_ticks(*y_range) if y_range is not None else nice_ticks(min(ys), max(ys))
    x0, x1 = (min(xs), max(xs)) if min(xs) < max(xs) else (x_ticks[0], x_ticks[-1])
    y0, y1 = y_range if y_range is not None else (y_ticks[0], y_ticks[-1])
    if y1 == y0:
        y0, y1 = y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (min(max(y, y0), y1) - y0) / (y1 - y0) * plot_h

    parts.append('<g font-size="11" fill="#5b6672" stroke="none">')
    for t in y_ticks:
        if y0 - 1e-12 <= t <= y1 + 1e-12:
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                         f'stroke="#e6eaee" stroke-width="1"/>'
                         f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{escape(_label(t))}</text>')
    for t in x_ticks:
        if x0 - 1e-12 <= t <= x1 + 1e-12:
            parts.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                         f'{escape(_label(t))}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 34}" text-anchor="middle">'
                 f'{escape(x_label)}</text>'
                 f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
                 f'{escape(y_label)}</text></g>'
                 f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#d5dbe1"/>')
    for i, s in enumerate(series):
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        if s.lower is not None and s.upper is not None:
            for run in _band_runs(s):
                upper = " ".join(f"{px(x):.1f},{py(hi):.1f}" for x, _, hi in run)
                lower = " ".join(f"{px(x):.1f},{py(lo):.1f}" for x, lo, _ in reversed(run))
                parts.append(f'<polygon points="{upper} {lower}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
        for run in _runs(list(zip(s.x, s.y, strict=True))):
            if len(run) == 1:
                (x, y), = run
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
            else:
                points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
                parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
    if marker_x is not None and _finite(marker_x):
        mx = px(float(marker_x))
        parts.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#1d232b" '
                     f'stroke-dasharray="4 3" stroke-width="1.5"/>')
        if marker_label:
            anchor = "end" if mx > left + plot_w * 0.7 else "start"
            dx = -4 if anchor == "end" else 4
            parts.append(f'<text x="{mx + dx:.1f}" y="{top + 12}" text-anchor="{anchor}" font-size="11" '
                         f'fill="#1d232b">{escape(marker_label)}</text>')
    legend_y = top + plot_h + 52
    for i, s in enumerate(series):
        col, row = i % 3, i // 3
        lx, ly = left + col * (plot_w / 3), legend_y + row * 18
        parts.append(f'<line x1="{lx:.1f}" x2="{lx + 18:.1f}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{OKABE_ITO[i % len(OKABE_ITO)]}" stroke-width="3"/>'
                     f'<text x="{lx + 24:.1f}" y="{ly}" font-size="11" fill="#1d232b">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _band_runs(s: Series) -> list[list[tuple[float, float, float]]]:
    runs: list[list[tuple[float, float, float]]] = [[]]
    for x, lo, hi in zip(s.x, s.lower or (), s.upper or (), strict=True):
        if _finite(x) and _finite(lo) and _finite(hi):
            runs[-1].append((float(x), float(lo), float(hi)))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if len(run) > 1]
