"""Shared UI pieces: progress bar, status badges, role chips, and server-rendered SVG charts.

Load with `{% load studio_ui %}`.

    {% progress_bar value total=100 running=False label="" %}
    {% status_badge state label=None tone=None %}
    {% role_chips roles %}
    {% histogram bins title="" x_label="" y_label="Count" width=640 height=240 %}
    {% line_chart series title="" x_label="Step" y_label="" width=640 height=260 log_y=False %}

    {{ seconds|duration }}   {{ 12345|compact_number }}   {{ value|pretty_json }}   {{ state|state_tone }}

Charts are plain SVG (no JavaScript): axes with tick labels, a <title> tooltip on every bar and
point, an accessible name and summary (role="img", <title>, <desc>), and the numbers in a
collapsible data table under the chart. All text goes through the template engine's autoescaping.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from django import template
from django.utils.html import format_html, format_html_join

register = template.Library()

# --- Status badges --------------------------------------------------------------------------------------

TONES = ("neutral", "info", "success", "warning", "danger")

STATE_TONES = {
    # neutral: waiting for something
    "draft": "neutral",
    "new": "neutral",
    "pending": "neutral",
    "queued": "neutral",
    "created": "neutral",
    "uploaded": "neutral",
    "inactive": "neutral",
    "archived": "neutral",
    "retired": "neutral",
    # info: work in progress (rendered with a pulsing dot)
    "running": "info",
    "validating": "info",
    "parsing": "info",
    "importing": "info",
    "scanning": "info",
    "processing": "info",
    "training": "info",
    "evaluating": "info",
    "generating": "info",
    "in_progress": "info",
    "cancelling": "info",
    # success: done and good
    "active": "success",
    "ready": "success",
    "done": "success",
    "complete": "success",
    "completed": "success",
    "succeeded": "success",
    "success": "success",
    "frozen": "success",
    "approved": "success",
    "promoted": "success",
    "production": "success",
    "passed": "success",
    "redact": "success",
    # warning: a person has to look
    "needs_review": "warning",
    "review": "warning",
    "in_review": "warning",
    "awaiting_approval": "warning",
    "paused": "warning",
    "stale": "warning",
    "retrying": "warning",
    "keep": "warning",
    # danger: failed or refused
    "failed": "danger",
    "error": "danger",
    "rejected": "danger",
    "cancelled": "danger",
    "canceled": "danger",
    "revoked": "danger",
    "lost": "danger",
    "blocked": "danger",
}
_BUSY_TONE = "info"


def _state_key(state) -> str:
    return str(getattr(state, "value", state) or "").strip().lower().replace(" ", "_").replace("-", "_")


@register.filter
def state_tone(state) -> str:
    """The badge tone for a state name: neutral, info, success, warning or danger."""
    return STATE_TONES.get(_state_key(state), "neutral")


def _state_label(state) -> str:
    label = getattr(state, "label", None)
    if label:
        return str(label)
    text = str(getattr(state, "value", state) or "").replace("_", " ").strip()
    return text[:1].upper() + text[1:]


@register.simple_tag
def status_badge(state, label=None, tone=None):
    """`{% status_badge job.state %}` or `{% status_badge job.state label=job.get_state_display %}`."""
    tone = tone if tone in TONES else state_tone(state)
    text = label if label not in (None, "") else _state_label(state)
    if tone == _BUSY_TONE:
        return format_html(
            '<span class="badge badge-{} badge-busy"><span class="badge-dot" aria-hidden="true"></span>{}</span>',
            tone,
            text,
        )
    return format_html('<span class="badge badge-{}">{}</span>', tone, text)


@register.simple_tag
def role_chips(roles):
    """Role chips for a list of role names (e.g. `roles.user_roles(user)`)."""
    return format_html_join("", '<span class="chip chip-{}">{}</span>', ((r, r) for r in roles or ()))


# --- Progress bar ---------------------------------------------------------------------------------------


@register.inclusion_tag("studio/partials/progress_bar.html")
def progress_bar(value, total=100, running=False, label=""):
    """`{% progress_bar job.progress total=1 running=job.is_running label="Epoch 2 of 3" %}`.

    `value` out of `total` (default 100: a percentage); None draws an indeterminate bar. `running`
    animates the stripes.
    """
    percent = None
    if value is not None:
        try:
            total_f = float(total) or 100.0
            percent = min(100.0, max(0.0, float(value) / total_f * 100.0))
        except (TypeError, ValueError):
            percent = None
    return {
        "percent": percent,
        "width": f"{percent:.1f}" if percent is not None else "100",
        "text": (f"{percent:.0f}%" if percent is not None else "Working…"),
        "running": bool(running),
        "label": label,
    }


# --- Filters --------------------------------------------------------------------------------------------


@register.filter
def duration(seconds) -> str:
    """Seconds as "1h 02m", "3m 05s" or "42s"; "" for None."""
    if seconds in (None, ""):
        return ""
    try:
        total = int(round(float(getattr(seconds, "total_seconds", lambda: seconds)())))
    except (TypeError, ValueError):
        return ""
    sign = "-" if total < 0 else ""
    total = abs(total)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours:02d}h"
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m {secs:02d}s"
    return f"{sign}{secs}s"


def _compact(value: float) -> str:
    """Short human number for axis labels: 0, 12, 0.25, 1.5k, 2M, 3.2e-05."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    if magnitude >= 0.001:
        return f"{value:.3g}"
    return f"{value:.2g}"


@register.filter
def compact_number(value) -> str:
    try:
        return _compact(float(value))
    except (TypeError, ValueError):
        return ""


@register.filter
def pretty_json(value) -> str:
    """Indented JSON text (still escaped by the template, like any other string)."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


# --- Chart geometry -------------------------------------------------------------------------------------

PALETTE = ("#4f46e5", "#0891b2", "#d97706", "#db2777", "#16a34a", "#7c3aed")
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 16, 48
MAX_PATH_POINTS = 1000
MAX_MARKERS = 120


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    span = hi - lo
    magnitude = 10 ** math.floor(math.log10(span / count))
    step = magnitude
    for multiple in (1, 2, 2.5, 5, 10):
        step = multiple * magnitude
        if span / step <= count:
            break
    if integer:
        step = max(1.0, math.ceil(step))
    start = math.floor(lo / step) * step
    end = math.ceil(hi / step) * step
    ticks, index = [], 0
    while True:
        value = start + index * step
        if value > end + step * 1e-9:
            break
        ticks.append(round(value, 12))
        index += 1
    return ticks if len(ticks) >= 2 else [start, start + step]


def _f(value: float) -> str:
    return f"{value:.1f}"


@dataclass
class _Frame:
    width: int
    height: int

    @property
    def left(self) -> float:
        return MARGIN_LEFT

    @property
    def right(self) -> float:
        return self.width - MARGIN_RIGHT

    @property
    def top(self) -> float:
        return MARGIN_TOP

    @property
    def bottom(self) -> float:
        return self.height - MARGIN_BOTTOM

    @property
    def plot_width(self) -> float:
        return self.right - self.left

    @property
    def plot_height(self) -> float:
        return self.bottom - self.top


def _dimension(value, default: int, minimum: int) -> int:
    try:
        return max(minimum, int(value))
    except (TypeError, ValueError):
        return default


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _axes(frame: _Frame) -> dict:
    """Positions shared by both charts' axes and axis titles."""
    return {
        "axis_x": _f(frame.left),
        "axis_y": _f(frame.bottom),
        "plot_right": _f(frame.right),
        "plot_top": _f(frame.top),
        "y_tick_label_x": _f(frame.left - 8),
        "x_tick_label_y": _f(frame.bottom + 18),
        "x_tick_mark_y": _f(frame.bottom + 5),
        "x_label_x": _f(frame.left + frame.plot_width / 2),
        "x_label_y": _f(frame.height - 8),
        "y_label_x": "14",
        "y_label_y": _f(frame.top + frame.plot_height / 2),
    }


# --- Histogram ------------------------------------------------------------------------------------------


def _edge_label(value) -> str:
    """Bin edges read exactly when they are modest whole numbers (1024, not 1.02k)."""
    number = _number(value)
    if number is None:
        return str(value) if value is not None else "∞"
    if number.is_integer() and abs(number) < 100_000:
        return str(int(number))
    return _compact(number)


@register.inclusion_tag("studio/partials/chart_histogram.html")
def histogram(bins, title="", x_label="", y_label="Count", width=640, height=240):
    """`{% histogram bins title="Tokens per example" x_label="tokens" %}` with bins = [(lo, hi, count), …].

    Bars are as wide as their range when every edge is a finite number, else equally wide.
    """
    rows = []
    for item in bins or ():
        lo, hi, count = item
        rows.append((lo, hi, max(0, int(_number(count) or 0))))
    frame = _Frame(_dimension(width, 640, 200), _dimension(height, 240, 120))
    chart_id = f"hist-{uuid.uuid4().hex[:8]}"
    context = {
        "chart_id": chart_id,
        "title": title or "Histogram",
        "x_label": x_label,
        "y_label": y_label,
        "width": frame.width,
        "height": frame.height,
        "empty": not rows,
        "rows": [{"lo": _edge_label(lo), "hi": _edge_label(hi), "count": c} for lo, hi, c in rows],
    }
    if not rows:
        return context

    top_count = max(count for _, _, count in rows)
    ticks = nice_ticks(0, max(top_count, 1), 4, integer=True)
    y_max = ticks[-1]

    def to_y(value: float) -> float:
        return frame.bottom - (value / y_max) * frame.plot_height

    edges = [(_number(lo), _number(hi)) for lo, hi, _ in rows]
    proportional = all(lo is not None and hi is not None and hi > lo for lo, hi in edges) and all(
        edges[i][1] <= edges[i + 1][0] + 1e-12 for i in range(len(edges) - 1)
    )
    if proportional:
        x_min, x_max = edges[0][0], edges[-1][1]

        def to_x(value: float) -> float:
            return frame.left + (value - x_min) / (x_max - x_min) * frame.plot_width

        spans = [(to_x(lo), to_x(hi)) for lo, hi in edges]
    else:
        slot = frame.plot_width / len(rows)
        spans = [(frame.left + i * slot, frame.left + (i + 1) * slot) for i in range(len(rows))]

    bars = []
    for (lo, hi, count), (x0, x1) in zip(rows, spans, strict=True):
        gap = 1.0 if x1 - x0 > 4 else 0.0
        y = to_y(count)
        bars.append(
            {
                "x": _f(x0 + gap / 2),
                "y": _f(y),
                "width": _f(max(0.5, x1 - x0 - gap)),
                "height": _f(frame.bottom - y),
                "tooltip": f"{_edge_label(lo)}–{_edge_label(hi)}: {count:,}",
            }
        )

    # x tick labels on the bin edges, at most ~8 of them
    every = max(1, math.ceil(len(rows) / 8))
    x_ticks = []
    for index in range(0, len(rows) + 1, every):
        x = spans[index][0] if index < len(rows) else spans[-1][1]
        value = rows[index][0] if index < len(rows) else rows[-1][1]
        x_ticks.append({"x": _f(x), "label": _edge_label(value)})
    if len(rows) % every:  # always label the last edge
        x_ticks.append({"x": _f(spans[-1][1]), "label": _edge_label(rows[-1][1])})

    total = sum(count for _, _, count in rows)
    context.update(
        {
            **_axes(frame),
            "bars": bars,
            "y_ticks": [{"y": _f(to_y(t)), "label": _compact(t)} for t in ticks],
            "x_ticks": x_ticks,
            "summary": (
                f"{len(rows)} bins from {_edge_label(rows[0][0])} to {_edge_label(rows[-1][1])}; "
                f"{total:,} items in all, at most {top_count:,} in one bin."
            ),
        }
    )
    return context


# --- Line chart -----------------------------------------------------------------------------------------


@dataclass
class _Series:
    name: str
    points: list[tuple[float, float]] = field(default_factory=list)


def _points(raw) -> list[tuple[float, float]]:
    points = []
    for index, item in enumerate(raw or ()):
        if isinstance(item, Mapping):
            x, y = item.get("x", index), item.get("y")
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            x, y = item[0], item[1]
        else:
            x, y = index, item
        x_num, y_num = _number(x), _number(y)
        if x_num is not None and y_num is not None:
            points.append((x_num, y_num))
    points.sort(key=lambda p: p[0])
    return points


def _normalise_series(series, default_name: str) -> list[_Series]:
    """Accepts {name: points}, [(name, points)], [{"name":…, "points":…}] or a bare list of points,
    where points are (x, y) pairs, {"x":…, "y":…} dicts or bare y values (x = index)."""
    if not series:
        return []
    if isinstance(series, Mapping):
        return [_Series(str(name), _points(points)) for name, points in series.items()]
    items = list(series)
    first = items[0]
    if isinstance(first, Mapping) and "points" in first:
        return [_Series(str(item.get("name", default_name)), _points(item["points"])) for item in items]
    if (
        isinstance(first, (tuple, list))
        and len(first) == 2
        and isinstance(first[0], str)
        and isinstance(first[1], Iterable)
    ):
        return [_Series(str(name), _points(points)) for name, points in items]
    return [_Series(default_name, _points(items))]


def _thin(points: list, limit: int) -> list:
    """Every k-th point so at most `limit` remain, always keeping the last one."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    thinned = points[::stride]
    if thinned[-1] is not points[-1]:
        thinned.append(points[-1])
    return thinned


@register.inclusion_tag("studio/partials/chart_line.html")
def line_chart(series, title="", x_label="Step", y_label="", width=640, height=260, log_y=False):
    """`{% line_chart curves title="Loss" y_label="loss" %}` with curves = {"train": [(step, loss), …],
    "eval": […]} (or any form `_normalise_series` accepts). `log_y` uses a log scale when every y > 0.
    """
    frame = _Frame(_dimension(width, 640, 240), _dimension(height, 260, 140))
    chart_id = f"line-{uuid.uuid4().hex[:8]}"
    all_series = [s for s in _normalise_series(series, y_label or "value") if s.points]
    context = {
        "chart_id": chart_id,
        "title": title or "Line chart",
        "x_label": x_label,
        "y_label": y_label,
        "width": frame.width,
        "height": frame.height,
        "empty": not all_series,
    }
    if not all_series:
        return context

    xs = [x for s in all_series for x, _ in s.points]
    ys = [y for s in all_series for _, y in s.points]
    use_log = bool(log_y) and min(ys) > 0
    transform = math.log10 if use_log else (lambda v: v)

    x_ticks_values = nice_ticks(min(xs), max(xs), 6)
    x_min, x_max = x_ticks_values[0], x_ticks_values[-1]
    if use_log:
        lo_exp, hi_exp = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        if hi_exp == lo_exp:
            hi_exp += 1
        y_tick_values = [10.0**e for e in range(lo_exp, hi_exp + 1)]
        y_min, y_max = float(lo_exp), float(hi_exp)
    else:
        y_lo, y_hi = min(ys), max(ys)
        if y_lo == y_hi:
            y_lo, y_hi = y_lo - (abs(y_lo) * 0.1 or 1.0), y_hi + (abs(y_hi) * 0.1 or 1.0)
        y_tick_values = nice_ticks(y_lo, y_hi, 5)
        y_min, y_max = y_tick_values[0], y_tick_values[-1]

    def to_x(value: float) -> float:
        return frame.left + (value - x_min) / ((x_max - x_min) or 1.0) * frame.plot_width

    def to_y(value: float) -> float:
        return frame.bottom - (transform(value) - y_min) / ((y_max - y_min) or 1.0) * frame.plot_height

    drawn, table = [], []
    for index, s in enumerate(all_series):
        colour = PALETTE[index % len(PALETTE)]
        path_points = _thin(s.points, MAX_PATH_POINTS)
        path = "M" + " L".join(f"{_f(to_x(x))},{_f(to_y(y))}" for x, y in path_points)
        markers = [
            {
                "cx": _f(to_x(x)),
                "cy": _f(to_y(y)),
                "tooltip": f"{s.name} — {x_label or 'x'} {_compact(x)}: {y:.4g}",
            }
            for x, y in _thin(s.points, MAX_MARKERS)
        ]
        # a one-point series has no line to draw: its marker is shown instead of only on hover
        lone = len(s.points) == 1
        drawn.append({"name": s.name, "colour": colour, "path": path, "markers": markers, "lone": lone})
        values = [y for _, y in s.points]
        table.append(
            {
                "name": s.name,
                "colour": colour,
                "count": len(s.points),
                "first": f"{values[0]:.4g}",
                "min": f"{min(values):.4g}",
                "max": f"{max(values):.4g}",
                "last": f"{values[-1]:.4g}",
                "last_x": _compact(s.points[-1][0]),
            }
        )

    summary = "; ".join(
        f"{row['name']}: {row['count']} points, from {row['first']} to {row['last']} "
        f"(min {row['min']}, max {row['max']})"
        for row in table
    )
    context.update(
        {
            "series": drawn,
            "table": table,
            "multi": len(drawn) > 1,
            "log_y": use_log,
            "x_ticks": [{"x": _f(to_x(t)), "label": _compact(t)} for t in x_ticks_values],
            "y_ticks": [{"y": _f(to_y(t)), "label": _compact(t)} for t in y_tick_values],
            **_axes(frame),
            "summary": summary + ".",
        }
    )
    return context
