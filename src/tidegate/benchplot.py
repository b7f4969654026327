"""Plots of `tidegate bench --json` results: one PNG, two panels.

Left: latency percentiles (p50, p90, p99, p99.9, in ms on a log axis) against the achieved
throughput (successful requests per second) of each load level: the "hockey stick" that
shows where a server saturates. One line style per percentile, one colour per run.

Right: the latency distribution of every level as a CCDF (the fraction of requests slower
than x, log-log), read from the level's histogram buckets, so the tail is visible down to
the last few requests. Each run gets its own colour family, darker for higher levels.

`runs` is a list of (label, levels), so a compare of two JSON files draws both in one
figure. Levels with no successful requests have no latency to show and are skipped.

This is the only module that imports matplotlib, and it does so inside `plot`: importing
`tidegate.benchplot` stays cheap. Drawing uses the Agg canvas on a bare `Figure` (no
pyplot), so it needs no display, leaves the process's pyplot backend and figure list alone
and is safe to call from threads or a server.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tidegate.histogram import LatencyHistogram

__all__ = ["DPI", "FIGSIZE", "ccdf", "plot"]

FIGSIZE = (14.0, 5.5)  # inches; with DPI, the PNG is 1400 x 550 pixels
DPI = 100
# (row key, legend label, line style) of the percentiles drawn on the left.
_PERCENTILES: tuple[tuple[str, str, Literal["-", "--", "-.", ":"]], ...] = (
    ("p50_ms", "p50", "-"),
    ("p90_ms", "p90", "--"),
    ("p99_ms", "p99", "-."),
    ("p99.9_ms", "p99.9", ":"),
)
# One colour family per run (cycled when there are more runs).
_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


def ccdf(histogram: LatencyHistogram) -> tuple[list[float], list[float]]:
    """The CCDF at the histogram's bucket boundaries: x[i] is the upper bound of the i-th
    non-empty bucket in ms, y[i] the fraction of recorded requests slower than x[i]
    (exact, since a bucket holds every value up to its upper bound). y decreases to 0.0 at
    the last bucket. Empty histogram: ([], [])."""
    total = histogram.count
    xs: list[float] = []
    ys: list[float] = []
    seen = 0
    for _low, high, n in histogram.buckets():
        seen += n
        xs.append(high / 1e6)
        ys.append((total - seen) / total)
    return xs, ys


def _latency(level: Mapping[str, Any]) -> LatencyHistogram | None:
    """The level's latency histogram, or None when it has none or it is empty."""
    raw = level.get("raw")
    data = raw.get("latency") if isinstance(raw, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    histogram = LatencyHistogram.from_dict(data)
    return histogram if histogram.count else None


def _curve(histogram: LatencyHistogram) -> tuple[list[float], list[float]]:
    """Points for a steps-post line of the CCDF on log-log axes: from (min, 1.0) through
    the bucket bounds to (max, fraction above the second-last bucket). Between bounds it is
    an upper bound of the exact CCDF; the final 0.0 (not drawable on a log axis) is left out
    and points at x = 0 are dropped."""
    xs, ys = ccdf(histogram)
    points = [(histogram.min_ns / 1e6, 1.0), *zip(xs[:-1], ys[:-1], strict=True)]
    points.append((histogram.max_ns / 1e6, points[-1][1]))
    kept = [(x, y) for x, y in points if x > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def _level_name(level: Mapping[str, Any]) -> str:
    value = level.get("level")
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def plot(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: Path) -> None:
    """One PNG with two panels: left, latency percentiles (p50, p90, p99, p99.9; log y, ms)
    against achieved throughput (ok_per_s) per level, one line style per percentile and one
    colour per run; right, the latency distribution of each level (CCDF from the histogram
    buckets: fraction of requests slower than x, log-log), labelled 'RUN level L'.

    `runs` is [(label, levels)] with levels as in the "levels" list of a `tidegate bench
    --json` file. Levels without successful requests are skipped; a panel with nothing to
    draw says so. The image is FIGSIZE * DPI pixels."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    run_handles: list[Line2D] = []
    any_left = any_right = False

    for number, (label, levels) in enumerate(runs):
        colours = colormaps[_FAMILIES[number % len(_FAMILIES)]]
        run_colour = colours(0.75)
        kept = [(level, hist) for level in levels if (hist := _latency(level)) is not None]

        # Left: one line per percentile through this run's levels, in level order.
        drawn = False
        for key, _name, style in _PERCENTILES:
            points = [
                (level["ok_per_s"], level[key])
                for level in levels
                if level.get(key) is not None and level.get("ok_per_s") is not None
            ]
            if points:
                left.plot(
                    [x for x, _ in points],
                    [y for _, y in points],
                    linestyle=style,
                    marker="o",
                    markersize=3,
                    color=run_colour,
                )
                drawn = True
        if drawn:
            run_handles.append(Line2D([], [], color=run_colour, label=label))
            any_left = True

        # Right: one CCDF per level, lighter to darker down the list (levels usually rise).
        for index, (level, hist) in enumerate(kept):
            xs, ys = _curve(hist)
            if not xs:
                continue
            shade = 0.4 + 0.55 * (index / (len(kept) - 1) if len(kept) > 1 else 1.0)
            right.plot(
                xs,
                ys,
                drawstyle="steps-post",
                marker="o",
                markersize=3,
                markevery=[len(xs) - 1],  # where the slowest requests end (and a level
                color=colours(shade),  # whose requests all fell in one bucket shows)
                label=f"{label} level {_level_name(level)}",
            )
            any_right = True

    left.set_title("Latency percentiles against throughput")
    left.set_xlabel("achieved throughput (successful requests/s)")
    left.set_ylabel("latency (ms)")
    right.set_title("Latency distribution per level")
    right.set_xlabel("latency x (ms)")
    right.set_ylabel("fraction of requests slower than x")
    if any_left:
        left.set_yscale("log")
        style_handles = [
            Line2D([], [], color="0.3", linestyle=style, marker="o", markersize=3, label=name)
            for _key, name, style in _PERCENTILES
        ]
        left.legend(handles=run_handles + style_handles, fontsize="small")
    else:
        left.text(0.5, 0.5, "no successful requests", ha="center", transform=left.transAxes)
    if any_right:
        right.set_xscale("log")
        right.set_yscale("log")
        right.grid(True, which="major", alpha=0.3)
        right.legend(fontsize="x-small", ncols=2 if len(right.lines) > 8 else 1)
    else:
        right.text(0.5, 0.5, "no successful requests", ha="center", transform=right.transAxes)
    left.grid(True, which="major", alpha=0.3)
    figure.savefig(path, format="png")
