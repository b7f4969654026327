"""The drift kernels against a plain numpy reference on the same data.

Integer results must match exactly; float sums within 1e-9 of the reference,
relative to the sum of the absolute terms (a relative bound on a sum that cancels
to near zero would only test luck). float32 batches are compared with numpy on
their float64 values: the kernels compare float32 values with thresholds rounded
from the float64 edges, and that rounding must never change a bin.
"""

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tidegate import kernels
from tidegate.drift import Window

DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)
STATE = ("counts", "below", "above", "nonfinite", "n", "s1", "s2", "vmin", "vmax")


def fresh_state(features: int, bins: int) -> dict[str, np.ndarray]:
    return Window.empty(features, bins).to_arrays()


def update(x, reference, state) -> None:
    kernels.update_features(x, *reference, *(state[name] for name in STATE))


def numpy_features(x, edges, lo, hi, shift) -> dict[str, Any]:
    """The reference: the same statistics with numpy, on float64 values."""
    v = x.astype(np.float64)
    features, bins = edges.shape[0], edges.shape[1] + 1
    finite = np.isfinite(v)
    which = (v[:, :, None] >= edges[None, :, :]).sum(axis=-1)
    counts = np.zeros((features, bins), np.int64)
    columns = np.broadcast_to(np.arange(features), v.shape)
    np.add.at(counts, (columns[finite], which[finite]), 1)
    d = np.where(finite, v - shift, 0.0)
    return {
        "counts": counts,
        "below": (finite & (v < lo)).sum(axis=0),
        "above": (finite & (v > hi)).sum(axis=0),
        "nonfinite": (~finite).sum(axis=0),
        "n": finite.sum(axis=0),
        "s1": d.sum(axis=0),
        "s2": (d * d).sum(axis=0),
        "vmin": np.where(finite, v, np.inf).min(axis=0, initial=np.inf),
        "vmax": np.where(finite, v, -np.inf).max(axis=0, initial=-np.inf),
        "abs_s1": np.abs(d).sum(axis=0),
    }


def assert_state_matches(state, expected) -> None:
    for name in ("counts", "below", "above", "nonfinite", "n", "vmin", "vmax"):
        np.testing.assert_array_equal(state[name], expected[name], err_msg=name)
    # float64 accumulation: each sum within 1e-9 of the sum of its absolute terms
    np.testing.assert_allclose(state["s2"], expected["s2"], rtol=1e-9, atol=1e-300)
    assert np.all(np.abs(state["s1"] - expected["s1"]) <= 1e-9 * expected["abs_s1"])


def reference_set(rng, features: int, bins: int, dtype) -> tuple[np.ndarray, ...]:
    """edges (with ties, sometimes exactly representable in dtype), lo, hi, shift."""
    edges = rng.normal(size=(features, bins - 1)) * rng.choice([0.01, 1.0, 1e4])
    if bins > 2:
        tied = rng.random(features) < 0.2
        edges[tied, 1] = edges[tied, 0]
    if rng.random() < 0.5:
        edges = edges.astype(dtype).astype(np.float64)
    edges = np.sort(edges, axis=1)
    first = edges[:, 0] if bins > 1 else np.zeros(features)
    last = edges[:, -1] if bins > 1 else np.zeros(features)
    lo = first - rng.exponential(size=features) * (rng.random(features) < 0.7)
    hi = last + rng.exponential(size=features) * (rng.random(features) < 0.7)
    shift = rng.normal(size=features)
    return edges, lo, hi, shift


def batch(rng, rows: int, reference, dtype, special: float = 0.2) -> np.ndarray:
    """Random values plus, at a `special` share of places, the values that test the
    boundaries: each feature's edges, lo and hi, their neighbours in dtype, NaN, +-inf."""
    edges, lo, hi, _ = reference
    features = lo.shape[0]
    x = (rng.normal(size=(rows, features)) * rng.choice([0.01, 1.0, 1e4])).astype(dtype)
    where = np.nonzero(rng.random(x.shape) < special)
    column = where[1]
    if edges.shape[1]:
        on_edge = edges[column, rng.integers(0, edges.shape[1], size=column.size)]
    else:
        on_edge = lo[column]
    pick = rng.integers(0, 3, size=column.size)
    near = np.choose(pick, [on_edge, lo[column], hi[column]]).astype(dtype)
    step = rng.integers(-1, 2, size=column.size)
    near = np.where(step < 0, np.nextafter(near, dtype(-np.inf)), near)
    near = np.where(step > 0, np.nextafter(near, dtype(np.inf)), near)
    bad = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype), size=column.size)
    x[where] = np.where(rng.random(column.size) < 0.25, bad, near)
    return x


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 1000),
    features=st.integers(1, 200),
    bins=st.integers(2, 32),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_features_match_numpy(rows, features, bins, dtype, seed):
    rng = np.random.default_rng(seed)
    reference = reference_set(rng, features, bins, dtype)
    x = batch(rng, rows, reference, dtype)
    state = fresh_state(features, bins)
    update(x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    features=st.integers(1, 64),
    bins=st.integers(2, 32),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_two_updates_equal_one_on_the_concatenation(rows, features, bins, dtype, seed):
    rng = np.random.default_rng(seed)
    reference = reference_set(rng, features, bins, dtype)
    first, second = (batch(rng, r, reference, dtype) for r in rows)
    state = fresh_state(features, bins)
    update(first, reference, state)
    update(second, reference, state)
    assert_state_matches(state, numpy_features(np.concatenate([first, second]), *reference))


@pytest.mark.parametrize("bins", [1, 16, 17, 33, 200])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_any_number_of_bins(bins, dtype):
    # 16 edges are compared per pass: 1 bin has none, 17 and 33 bins need a second
    # pass, 200 bins (DriftConfig allows it) thirteen.
    rng = np.random.default_rng(bins)
    reference = reference_set(rng, 7, bins, dtype)
    x = batch(rng, 500, reference, dtype)
    state = fresh_state(7, bins)
    update(x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


TINY = float(np.finfo(np.float32).smallest_subnormal)
BIG = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.1, 1.5 * TINY), (0.4 * TINY, -0.4 * TINY), (-0.6 * TINY, 0.6 * TINY), (-1e39, 1e39)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_thresholds_at_the_ends_of_the_float32_range(dtype, lo, hi):
    # Edges, lo and hi that float32 cannot hold: beyond its largest value, between
    # subnormals, next to either zero (lo > hi is allowed: both tallies still apply).
    # The values are the float32s at and around each.
    tiny, big = TINY, BIG
    inner = [-1e39, -big, -1.5 * tiny, -0.0, 0.4 * tiny, 0.6 * tiny, 1.5 * tiny, 0.1, big, 1e39]
    edges = np.array([inner])
    values = np.array([*inner[1:-1], 0.0, tiny, 2 * tiny, np.inf, -np.inf], np.float32)
    with np.errstate(over="ignore"):  # next to the largest float32 is inf: as wanted
        up = np.nextafter(values, np.float32(np.inf))
        down = np.nextafter(values, np.float32(-np.inf))
    x = np.concatenate([values, up, down]).astype(dtype)[:, None]
    reference = (edges, np.array([lo]), np.array([hi]), np.zeros(1))
    state = fresh_state(1, edges.shape[1] + 1)
    update(x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


def test_empty_batch_changes_nothing():
    rng = np.random.default_rng(0)
    reference = reference_set(rng, 3, 16, np.float32)
    state = fresh_state(3, 16)
    update(np.zeros((0, 3), np.float32), reference, state)
    assert_state_matches(state, numpy_features(np.zeros((0, 3)), *reference))


def test_a_read_only_batch_is_accepted():
    # A binary request body decodes to a read-only np.frombuffer view.
    rng = np.random.default_rng(1)
    reference = reference_set(rng, 4, 16, np.float32)
    x = batch(rng, 50, reference, np.float32)
    x.flags.writeable = False
    state = fresh_state(4, 16)
    update(x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


@pytest.mark.parametrize(
    ("name", "shape"),
    [("edges", (4, 15)), ("counts", (3, 15)), ("lo", (4,)), ("s2", (2,)), ("n", (4,))],
)
def test_mismatched_shapes_are_refused(name, shape):
    rng = np.random.default_rng(2)
    edges, lo, hi, shift = reference_set(rng, 3, 16, np.float64)
    arrays = {"edges": edges, "lo": lo, "hi": hi, "shift": shift, **fresh_state(3, 16)}
    arrays[name] = np.zeros(shape, arrays[name].dtype)
    names = ("edges", "lo", "hi", "shift", *STATE)
    with pytest.raises(ValueError, match="must"):
        kernels.update_features(np.zeros((5, 3)), *(arrays[key] for key in names))


def numpy_argmax(p) -> tuple[np.ndarray, float]:
    rows = np.isfinite(p).all(axis=1)
    kept = p[rows].astype(np.float64)
    counts = np.bincount(kept.argmax(axis=1), minlength=p.shape[1]).astype(np.int64)
    return counts, float(kept.max(axis=1).sum()) if kept.size else 0.0


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(0, 1000),
    classes=st.integers(1, 40),
    dtype=DTYPES,
    seed=SEEDS,
    ties=st.booleans(),
)
def test_argmax_matches_numpy(rows, classes, dtype, seed, ties):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes), size=rows)
    if ties:  # a coarse grid makes equal maxima common; the first one counts
        p = np.round(p * 4) / 4
    p = p.astype(dtype)
    bad = rng.random(p.shape) < 0.01
    p[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype), size=int(bad.sum()))
    counts, confidence = np.zeros(classes, np.int64), np.zeros(1)
    kernels.update_argmax(p, counts, confidence)
    kernels.update_argmax(p[: rows // 2], counts, confidence)  # and it accumulates
    once, total = numpy_argmax(p)
    half, half_total = numpy_argmax(p[: rows // 2])
    np.testing.assert_array_equal(counts, once + half)
    assert confidence[0] == pytest.approx(total + half_total, rel=1e-9, abs=1e-300)


def test_argmax_first_maximum_wins_and_bad_rows_are_skipped():
    p = np.array(
        [[0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [np.nan, 0.9, 0.1], [0.1, np.inf, 0.0], [0.3, 0.3, 0.3]],
        np.float32,
    )
    counts, confidence = np.zeros(3, np.int64), np.zeros(1)
    kernels.update_argmax(p, counts, confidence)
    assert counts.tolist() == [2, 1, 0]
    assert confidence[0] == pytest.approx(0.4 + 0.5 + 0.3, rel=1e-7)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 1000), classes=st.integers(1, 50), seed=SEEDS)
def test_classes_match_bincount(rows, classes, seed):
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, classes, size=rows)
    counts = np.ones(classes, np.int64)
    kernels.update_classes(indices, counts)
    np.testing.assert_array_equal(counts, 1 + np.bincount(indices, minlength=classes))


@pytest.mark.parametrize("bad", [-1, 3])
def test_class_outside_the_counts_is_refused_and_nothing_counted(bad):
    counts = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="outside"):
        kernels.update_classes(np.array([0, 1, bad, 2]), counts)
    assert counts.tolist() == [0, 0, 0]


def test_warm_up_compiles_every_signature_a_request_uses():
    kernels.warm_up()
    dispatchers = (kernels.update_features, kernels.update_argmax, kernels.update_classes)
    before = [len(kernel.signatures) for kernel in dispatchers]
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        for writeable in (True, False):
            reference = reference_set(rng, 5, 16, dtype)
            x = batch(rng, 20, reference, dtype)
            p = rng.random((20, 3)).astype(dtype)
            x.flags.writeable = p.flags.writeable = writeable
            update(x, reference, fresh_state(5, 16))
            kernels.update_argmax(p, np.zeros(3, np.int64), np.zeros(1))
    kernels.update_classes(np.array([0, 2, 1]), np.zeros(3, np.int64))
    assert [len(kernel.signatures) for kernel in dispatchers] == before
