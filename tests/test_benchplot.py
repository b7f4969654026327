"""`tidegate.benchplot`: the CCDF points against numpy on recorded values, and the PNG
(magic bytes, pixel size, one run vs two, levels without successful requests skipped),
drawn from level dicts made the way `tidegate bench --json` writes them."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from tidegate import bench as runner
from tidegate.benchplot import DPI, FIGSIZE, ccdf, plot
from tidegate.histogram import LatencyHistogram
from tidegate.loadgen import ClientLoad, LevelResult, Plan, Tally

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEIGHT, WIDTH = round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI)


def histogram(values: Any) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values:
        hist.record(int(value))
    return hist


def latencies(seed: int, n: int, median_ms: float) -> np.ndarray:
    """Log-normal latencies in ns with a heavy-ish tail."""
    rng = np.random.default_rng(seed)
    return np.rint(rng.lognormal(np.log(median_ms * 1e6), 0.6, n)).astype(np.int64)


def document(tmp_path: Path, name: str, levels: list[tuple[Plan, Any, float]]) -> list[dict]:
    """The "levels" of a `tidegate bench --json` file from (plan, latencies in ns, measured
    seconds): real LevelResults through `summary`, `write_json` and `read_json`, as
    `tidegate bench` itself writes and reads them."""
    rows = []
    for plan, values, seconds in levels:
        hist = histogram(values)
        errors = {} if hist.count else {"http 503": 10}
        tally = Tally(hist, hist.count, hist.count * 3, errors)
        result = LevelResult(plan, seconds, tally, ClientLoad(0.5, histogram([]), histogram([])))
        rows.append((result, runner.summary(result, None)))
    path = tmp_path / f"{name}.json"
    runner.write_json(path, {"model": "diabetes"}, rows)
    return runner.read_json(path)["levels"]


def closed_loop(tmp_path: Path, name: str, seed: int, speed: float) -> list[dict]:
    """Closed-loop levels that saturate: throughput levels off while latency climbs."""
    levels = []
    for concurrency, per_s, median_ms in [
        (1, 2000, 0.5),
        (4, 7000, 0.57),
        (16, 12000, 1.3),
        (64, 13000, 4.9),
    ]:
        values = latencies(seed + concurrency, 2000, median_ms / speed)
        levels.append((Plan(concurrency=concurrency), values, 2000 / (per_s * speed)))
    return document(tmp_path, name, levels)


@pytest.fixture
def baseline(tmp_path: Path) -> list[dict]:
    return closed_loop(tmp_path, "baseline", seed=0, speed=1.0)


@pytest.fixture
def candidate(tmp_path: Path) -> list[dict]:
    return closed_loop(tmp_path, "candidate", seed=100, speed=1.25)


def draw(runs: list[tuple[str, list[dict]]], path: Path) -> np.ndarray:
    plot(runs, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape == (HEIGHT, WIDTH, 4)
    return image


# -- ccdf ------------------------------------------------------------------------------


def test_ccdf_by_hand():
    # 1000 ns is in bucket [1000, 1003], 2000 in [2000, 2007], 3000 in [2992, 3007].
    xs, ys = ccdf(histogram([1000, 1000, 2000, 3000]))
    assert xs == [1003 / 1e6, 2007 / 1e6, 3007 / 1e6]
    assert ys == [0.5, 0.25, 0.0]


def test_ccdf_of_an_empty_histogram():
    assert ccdf(LatencyHistogram()) == ([], [])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ccdf_matches_numpy_on_the_recorded_values(seed: int):
    # Exact small values (< 256 ns) and log buckets from microseconds to seconds.
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [rng.integers(0, 256, 50), latencies(seed, 5000, median_ms=2.0), [3_000_000_000]]
    )
    hist = histogram(values)
    xs, ys = ccdf(hist)

    highs = np.array([high for _low, high, _n in hist.buckets()])
    np.testing.assert_array_equal(xs, highs / 1e6)
    # Every recorded value lies in a bucket: the bounds step through all distinct values.
    assert len(xs) <= len(np.unique(values))
    assert np.all(np.diff(xs) > 0)
    assert xs[-1] * 1e6 >= values.max()
    assert xs[-1] * 1e6 <= values.max() * (1 + 2.0**-LatencyHistogram.SUB_BITS)
    # y is the fraction of recorded values strictly above x, exactly.
    expected = (values[:, None] > highs[None, :]).mean(axis=0)
    np.testing.assert_allclose(ys, expected, rtol=0, atol=1e-15)
    # ...which is numpy's empirical CCDF evaluated at the bucket bounds.
    ranks = np.searchsorted(np.sort(values), highs, side="right")
    np.testing.assert_allclose(ys, 1 - ranks / len(values), rtol=0, atol=1e-15)
    assert ys[-1] == 0.0


# -- plot ------------------------------------------------------------------------------


def test_plot_writes_a_png_of_the_expected_size(tmp_path: Path, baseline: list[dict]):
    image = draw([("baseline", baseline)], tmp_path / "one.png")
    assert image.std() > 0  # something was drawn


def test_two_runs_draw_a_different_figure_than_one(
    tmp_path: Path, baseline: list[dict], candidate: list[dict]
):
    one = draw([("baseline", baseline)], tmp_path / "one.png")
    two = draw([("baseline", baseline), ("candidate", candidate)], tmp_path / "two.png")
    assert not np.array_equal(one, two)
    # Drawing is deterministic: the same runs give the same pixels.
    again = draw([("baseline", baseline), ("candidate", candidate)], tmp_path / "again.png")
    np.testing.assert_array_equal(two, again)


def test_a_level_without_successful_requests_is_skipped(tmp_path: Path, baseline: list[dict]):
    empty = document(tmp_path, "empty", [(Plan(concurrency=256), [], 2.0)])[0]
    assert empty["ok"] == 0
    assert empty["p50_ms"] is None
    assert empty["raw"]["latency"]["count"] == 0
    without = draw([("baseline", baseline)], tmp_path / "without.png")
    # Anywhere in the list, including first: no crash, nothing drawn for it.
    with_empty = draw([("baseline", [empty, *baseline, empty])], tmp_path / "with.png")
    np.testing.assert_array_equal(without, with_empty)


def test_runs_with_nothing_to_draw_still_give_a_png(tmp_path: Path):
    empty = document(
        tmp_path, "empty", [(Plan(concurrency=1), [], 2.0), (Plan(rate=50.0), [], 2.0)]
    )
    draw([("down", empty)], tmp_path / "empty.png")
    draw([], tmp_path / "none.png")


def test_open_loop_levels_and_single_value_levels(tmp_path: Path, baseline: list[dict]):
    # Open-loop rates, a level where every request took the same time (one bucket) and
    # one with a 0 ns request (not drawable on a log axis): all plot without warnings.
    levels = document(
        tmp_path,
        "open",
        [
            (Plan(rate=100.0), latencies(7, 500, median_ms=1.0), 5.0),
            (Plan(rate=250.5), [2_000_000] * 1250, 5.0),
            (Plan(rate=400.0), [0, *latencies(8, 1999, median_ms=3.0)], 5.0),
        ],
    )
    assert [level["mode"] for level in levels] == ["open"] * 3
    draw([("baseline", baseline), ("open", levels)], tmp_path / "open.png")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, tidegate.benchplot; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
