"""LatencyHistogram against independent references: numpy's exact percentiles
(method="inverted_cdf"), numpy's mean, plain min/max/len, and recording everything
into one histogram as the reference for merge and serialisation."""

import ast
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tidegate.histogram import LatencyHistogram

QS = (0, 1, 50, 90, 99, 99.9, 100)
MAX_NS = 10**12
SOURCE = Path(__file__).resolve().parent.parent / "src" / "tidegate" / "histogram.py"


class CoarseHistogram(LatencyHistogram):
    """Few sub-buckets, so random values land near bucket edges often and the bound
    (1/4 here) is exercised hard; also a histogram with a different sub_bits."""

    SUB_BITS = 2


# Durations near powers of two (bucket edges) as well as anywhere in 0..10**12.
near_edges = st.builds(
    lambda k, d: min(max((1 << k) + d, 0), MAX_NS),
    st.integers(0, 39),
    st.integers(-3, 3),
)
durations = st.one_of(st.integers(0, MAX_NS), near_edges)
duration_lists = st.lists(durations, min_size=1, max_size=2000)


def _record(values: list[int], cls: type[LatencyHistogram] = LatencyHistogram) -> LatencyHistogram:
    hist = cls()
    for v in values:
        hist.record(v)
    return hist


def _check_against_numpy(values: list[int], cls: type[LatencyHistogram]) -> None:
    hist = _record(values, cls)
    arr = np.asarray(values, dtype=np.int64)
    assert hist.count == len(values)
    assert hist.min_ns == min(values)
    assert hist.max_ns == max(values)
    assert hist.mean_ns == pytest.approx(float(np.mean(arr)), rel=1e-12)
    scale = 1 << cls.SUB_BITS
    for q in QS:
        exact = int(np.percentile(arr, q, method="inverted_cdf"))
        got = hist.percentile(q)
        assert abs(got - exact) * scale <= exact, (q, got, exact)
        # The documented side: the bucket's upper bound, clamped, never undershoots.
        assert hist.min_ns <= exact <= got <= hist.max_ns, (q, got, exact)


@settings(deadline=None, max_examples=60)
@given(duration_lists)
def test_percentiles_within_relative_error_of_numpy(values: list[int]) -> None:
    _check_against_numpy(values, LatencyHistogram)


@settings(deadline=None, max_examples=60)
@given(duration_lists)
def test_coarse_histogram_keeps_its_own_bound(values: list[int]) -> None:
    _check_against_numpy(values, CoarseHistogram)


@pytest.mark.parametrize("seed", range(5))
def test_log_uniform_latencies_1us_to_10s(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = np.exp(rng.uniform(math.log(1e3), math.log(1e10), size=20_000))
    _check_against_numpy([int(v) for v in samples], LatencyHistogram)


@settings(deadline=None, max_examples=100)
@given(
    st.lists(st.integers(0, 2 * (1 << LatencyHistogram.SUB_BITS) - 1), min_size=1, max_size=300),
    st.floats(0, 100),
)
def test_small_values_are_exact_at_any_q(values: list[int], q: float) -> None:
    # Below 2**(SUB_BITS + 1) every value has its own bucket, so the percentile is exact:
    # this also pins the rank rule to numpy's for arbitrary q and counts.
    hist = _record(values)
    assert hist.percentile(q) == int(np.percentile(values, q, method="inverted_cdf"))


@settings(deadline=None, max_examples=50)
@given(st.lists(durations, max_size=300), st.lists(durations, max_size=300))
def test_merge_equals_recording_both(a: list[int], b: list[int]) -> None:
    merged = _record(a)
    merged.merge(_record(b))
    assert merged.to_dict() == _record(a + b).to_dict()


def test_merge_empty_and_self() -> None:
    values = [5, 1_000, 123_456_789]
    hist = _record(values)
    hist.merge(LatencyHistogram())
    assert hist.to_dict() == _record(values).to_dict()
    empty = LatencyHistogram()
    empty.merge(hist)
    assert empty.to_dict() == hist.to_dict()
    hist.merge(hist)
    assert hist.to_dict() == _record(values + values).to_dict()


def test_merge_rejects_other_sub_bits() -> None:
    with pytest.raises(ValueError, match="sub_bits"):
        LatencyHistogram().merge(_record([1, 2, 3], CoarseHistogram))


@settings(deadline=None, max_examples=50)
@given(st.lists(durations, max_size=500))
def test_dict_round_trip(values: list[int]) -> None:
    hist = _record(values)
    data = hist.to_dict()
    for restored in (
        LatencyHistogram.from_dict(data),
        LatencyHistogram.from_dict(json.loads(json.dumps(data))),
    ):
        assert restored.to_dict() == data
        assert restored.buckets() == hist.buckets()
        assert (restored.count, restored.min_ns, restored.max_ns, restored.mean_ns) == (
            hist.count,
            hist.min_ns,
            hist.max_ns,
            hist.mean_ns,
        )
        if values:
            assert [restored.percentile(q) for q in QS] == [hist.percentile(q) for q in QS]
        # Still a working histogram after restoring.
        restored.record(42)
        assert restored.count == len(values) + 1


def test_from_dict_rejects_other_sub_bits_and_bad_contents() -> None:
    data = _record([1, 500, 10**9]).to_dict()
    with pytest.raises(ValueError, match="sub_bits"):
        LatencyHistogram.from_dict({**data, "sub_bits": 6})
    with pytest.raises(ValueError, match="sub_bits"):
        LatencyHistogram.from_dict(_record([1, 500], CoarseHistogram).to_dict())
    with pytest.raises(ValueError, match="sub_bits"):
        CoarseHistogram.from_dict(data)
    with pytest.raises(ValueError, match="add up"):
        LatencyHistogram.from_dict({**data, "count": 4})
    with pytest.raises(ValueError, match="bucket"):
        LatencyHistogram.from_dict({**data, "buckets": {"x": 1}})
    with pytest.raises(ValueError, match="'max'"):
        LatencyHistogram.from_dict({k: v for k, v in data.items() if k != "max"})


@settings(deadline=None, max_examples=200)
@given(durations)
def test_single_value_falls_in_its_bucket(value: int) -> None:
    hist = _record([value])
    [(low, high, n)] = hist.buckets()
    assert n == 1
    assert low <= value <= high
    assert (high - low) << LatencyHistogram.SUB_BITS < max(low, 1)
    if value < 1 << LatencyHistogram.SUB_BITS:
        assert low == high == value


def test_buckets_tile_the_line_in_order() -> None:
    # Every integer recorded once: buckets must be ascending, disjoint and contiguous,
    # their counts the number of integers they span, and none too wide.
    top = 1 << 17
    hist = _record(list(range(top)))
    buckets = hist.buckets()
    assert sum(n for _, _, n in buckets) == hist.count == top
    assert buckets[0][0] == 0
    assert buckets[-1][1] >= top - 1
    for (_, prev_high, _), (low, _, _) in itertools.pairwise(buckets):
        assert low == prev_high + 1
    for low, high, n in buckets:
        assert n == min(high, top - 1) - low + 1
        assert (high - low) << LatencyHistogram.SUB_BITS < max(low, 1)
    # Constant memory: at most 2**SUB_BITS buckets per power of two above the exact range.
    in_top_octave = [b for b in buckets if b[0] >= top // 2]
    assert len(in_top_octave) <= 1 << LatencyHistogram.SUB_BITS


@settings(deadline=None, max_examples=50)
@given(duration_lists)
def test_bucket_counts_sum_to_count_ascending(values: list[int]) -> None:
    hist = _record(values)
    buckets = hist.buckets()
    assert sum(n for _, _, n in buckets) == hist.count
    assert all(low <= high for low, high, _ in buckets)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(buckets))
    # Each value lies in exactly one bucket, and each bucket counts exactly its values.
    for low, high, n in buckets:
        assert n == sum(1 for v in values if low <= v <= high)


def test_empty_histogram() -> None:
    hist = LatencyHistogram()
    assert (hist.count, hist.min_ns, hist.max_ns, hist.mean_ns) == (0, 0, 0, 0.0)
    assert hist.buckets() == []
    with pytest.raises(ValueError, match="empty"):
        hist.percentile(50)
    restored = LatencyHistogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert restored.to_dict() == hist.to_dict()


@pytest.mark.parametrize("q", [-0.001, 100.001, -1, 1000, math.nan, math.inf])
def test_q_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        _record([1, 2, 3]).percentile(q)


def test_negative_duration_rejected() -> None:
    hist = LatencyHistogram()
    with pytest.raises(ValueError, match=">= 0"):
        hist.record(-1)
    assert hist.count == 0


def test_record_stores_into_a_sparse_dict() -> None:
    # The cheapness guard (no timing): counts live in a plain dict keyed by bucket,
    # one entry per distinct bucket however many values are recorded.
    hist = LatencyHistogram()
    for _ in range(1_000):
        hist.record(1_234_567)
    counts = hist._counts
    assert type(counts) is dict
    assert len(counts) == 1
    assert next(iter(counts.values())) == 1_000


def test_module_imports_only_the_standard_library() -> None:
    tree = ast.parse(SOURCE.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            assert node.module is not None
            roots.add(node.module.split(".")[0])
    assert roots <= sys.stdlib_module_names, roots - sys.stdlib_module_names
