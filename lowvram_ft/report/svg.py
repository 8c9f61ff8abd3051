"""Inline SVG charts for the report pages: a line chart (values per step) and a grouped bar chart with
intervals. Strings in, markup out; every text escaped. Colours come from CSS classes (`series-N`,
`axis`), so a chart follows the page's light or dark theme and prints. No plotting library."""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 560, 240
MARGIN = {"left": 64, "right": 16, "top": 40, "bottom": 44}


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2, 2.5, 5 × a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:,.4g}"


def frame(title: str, x_label: str, y_label: str, body: list[str], legend: list[str]) -> str:
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
            f'xmlns="http://www.w3.org/2000/svg">')
    texts = [f'<title>{escape(title)}</title>',
             f'<text class="chart-title" x="{MARGIN["left"]}" y="16">{escape(title)}</text>',
             f'<text class="axis-label" x="{(WIDTH + MARGIN["left"]) / 2:.0f}" y="{HEIGHT - 6}" '
             f'text-anchor="middle">{escape(x_label)}</text>',
             f'<text class="axis-label" transform="translate(12 {(HEIGHT - MARGIN["bottom"] + MARGIN["top"]) / 2:.0f}) '
             f'rotate(-90)" text-anchor="middle">{escape(y_label)}</text>']
    return head + "".join(texts + body + legend) + "</svg>"


def legend_marks(labels: list[str]) -> list[str]:
    if len(labels) < 2:
        return []
    marks, x = [], WIDTH - MARGIN["right"]
    for i, label in reversed(list(enumerate(labels))):
        x -= 26 + 7 * len(label)
        marks.append(f'<rect class="series-{i % 6} fill" x="{x}" y="21" width="10" height="10"/>'
                     f'<text class="legend" x="{x + 14}" y="30">{escape(label)}</text>')
    return marks


def line_chart(title: str, series: list[dict], x_label: str = "step", y_label: str = "",
               reference: tuple[float, str] | None = None) -> str:
    """series: [{label, points: [(x, y), ...]}]. One polyline per series, dots where it has few points;
    `reference` (value, label): a dashed horizontal line, e.g. the planner's estimate of the peak."""
    points = [p for s in series for p in s["points"]]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([reference[0]] if reference else [])
    x_ticks = nice_ticks(min(xs), max(xs))
    y_low = min(ys) if min(ys) < 0 else 0.0
    y_ticks = nice_ticks(y_low, max(ys))
    sx, sy = scale(x_ticks[0], x_ticks[-1], "x"), scale(y_ticks[0], y_ticks[-1], "y")
    body = axes([(sx(t), tick_label(t)) for t in x_ticks], [(sy(t), tick_label(t)) for t in y_ticks])
    for i, s in enumerate(series):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
        body.append(f'<polyline class="series-{i % 6} line" points="{coords}"><title>{escape(s["label"])}</title></polyline>')
        for x, y in s["points"] if len(s["points"]) <= 60 else s["points"][-1:]:
            body.append(f'<circle class="series-{i % 6} fill" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2">'
                        f'<title>{escape(s["label"])}: {escape(tick_label(x))} → {y:.6g}</title></circle>')
    if reference:
        y = sy(reference[0])
        body.append(f'<path class="reference" d="M{MARGIN["left"]},{y:.1f}H{WIDTH - MARGIN["right"]}"/>'
                    f'<text class="legend" x="{WIDTH - MARGIN["right"] - 4}" y="{y - 4:.1f}" text-anchor="end">'
                    f'{escape(reference[1])} {reference[0]:.4g}</text>')
    return frame(title, x_label, y_label, body, legend_marks([s["label"] for s in series]))


def bar_chart(title: str, categories: list[str], series: list[dict], y_label: str = "",
              y_max: float | None = None, percent: bool = False) -> str:
    """Grouped bars: series [{label, values: [v or None per category], intervals: [(lo, hi) or None]}].
    A missing value draws no bar; an interval draws a whisker."""
    values = [v for s in series for v in s["values"] if v is not None]
    if not categories or not values:
        return ""
    tops = values + [iv[1] for s in series for iv in s.get("intervals") or [] if iv]
    y_ticks = nice_ticks(0.0, y_max if y_max is not None else max(tops + [1e-9]))
    sy = scale(y_ticks[0], y_ticks[-1], "y")
    band = (WIDTH - MARGIN["left"] - MARGIN["right"]) / len(categories)
    width = band * 0.8 / len(series)
    label = (lambda t: f"{100 * t:.0f}%") if percent else tick_label
    body = axes([(MARGIN["left"] + band * (i + 0.5), c) for i, c in enumerate(categories)],
                [(sy(t), label(t)) for t in y_ticks], tilt=len(categories) > 6)
    for k, s in enumerate(series):
        intervals = s.get("intervals") or [None] * len(categories)
        for i, (value, interval) in enumerate(zip(s["values"], intervals)):
            if value is None:
                continue
            x = MARGIN["left"] + band * i + band * 0.1 + k * width
            shown = f"{100 * value:.1f}%" if percent else f"{value:.4g}"
            body.append(f'<rect class="series-{k % 6} fill" x="{x:.1f}" y="{sy(value):.1f}" width="{width:.1f}" '
                        f'height="{max(sy(0.0) - sy(value), 0.5):.1f}"><title>{escape(s["label"])}, '
                        f'{escape(categories[i])}: {shown}</title></rect>')
            if interval:
                cx = x + width / 2
                body.append(f'<path class="whisker" d="M{cx:.1f},{sy(interval[0]):.1f}V{sy(interval[1]):.1f}'
                            f'M{cx - 3:.1f},{sy(interval[0]):.1f}h6M{cx - 3:.1f},{sy(interval[1]):.1f}h6"/>')
    return frame(title, "", y_label, body, legend_marks([s["label"] for s in series]))


def scale(low: float, high: float, axis: str):
    span = (high - low) or 1.0
    if axis == "x":
        left, right = MARGIN["left"], WIDTH - MARGIN["right"]
        return lambda v: left + (v - low) / span * (right - left)
    bottom, top = HEIGHT - MARGIN["bottom"], MARGIN["top"]
    return lambda v: bottom - (v - low) / span * (bottom - top)


def axes(x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]], tilt: bool = False) -> list[str]:
    bottom, left, right = HEIGHT - MARGIN["bottom"], MARGIN["left"], WIDTH - MARGIN["right"]
    parts = [f'<path class="axis" d="M{left},{MARGIN["top"]}V{bottom}H{right}"/>']
    for y, text in y_ticks:
        parts.append(f'<path class="grid" d="M{left},{y:.1f}H{right}"/>'
                     f'<text class="tick" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{escape(text)}</text>')
    for x, text in x_ticks:
        rotate = f' transform="rotate(-25 {x:.1f} {bottom + 14})"' if tilt else ""
        parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 14}" text-anchor="{"end" if tilt else "middle"}"'
                     f'{rotate}>{escape(text)}</text>')
    return parts
