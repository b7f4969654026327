"""The drift kernels against a plain numpy reference on the same data, on both
backends: Numba's JIT and the extension compiled ahead of time (kernel_backend).

Integer results must match exactly; float sums within 1e-9 of the reference,
relative to the sum of the absolute terms (a relative bound on a sum that cancels
to near zero would only test luck). float32 batches are compared with numpy on
their float64 values: the kernels compare float32 values with thresholds rounded
from the float64 edges, and that rounding must never change a bin. The two backends
compile the same code for the same CPU, so they must agree to the last bit.
"""

import itertools
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tidegate import kernel_backend, kernels
from tidegate.drift import Window
from tidegate.kernel_backend import KernelSet

DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)
STATE = ("counts", "below", "above", "nonfinite", "n", "s1", "s2", "vmin", "vmax")


@pytest.fixture(scope="module", params=["jit", "aot"])
def backend(request: pytest.FixtureRequest) -> KernelSet:
    """Each backend's kernels (the AOT extension is built first if the cache has none)."""
    return kernel_backend.jit() if request.param == "jit" else kernel_backend.aot()


def fresh_state(features: int, bins: int) -> dict[str, np.ndarray]:
    return Window.empty(features, bins).to_arrays()


def update(backend: KernelSet, x, reference, state) -> None:
    backend.update_features(x, *reference, *(state[name] for name in STATE))


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
def test_features_match_numpy(backend, rows, features, bins, dtype, seed):
    rng = np.random.default_rng(seed)
    reference = reference_set(rng, features, bins, dtype)
    x = batch(rng, rows, reference, dtype)
    state = fresh_state(features, bins)
    update(backend, x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    features=st.integers(1, 64),
    bins=st.integers(2, 32),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_two_updates_equal_one_on_the_concatenation(backend, rows, features, bins, dtype, seed):
    rng = np.random.default_rng(seed)
    reference = reference_set(rng, features, bins, dtype)
    first, second = (batch(rng, r, reference, dtype) for r in rows)
    state = fresh_state(features, bins)
    update(backend, first, reference, state)
    update(backend, second, reference, state)
    assert_state_matches(state, numpy_features(np.concatenate([first, second]), *reference))


@pytest.mark.parametrize("bins", [1, 16, 17, 33, 200])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_any_number_of_bins(backend, bins, dtype):
    # 16 edges are compared per pass: 1 bin has none, 17 and 33 bins need a second
    # pass, 200 bins (DriftConfig allows it) thirteen.
    rng = np.random.default_rng(bins)
    reference = reference_set(rng, 7, bins, dtype)
    x = batch(rng, 500, reference, dtype)
    state = fresh_state(7, bins)
    update(backend, x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


TINY = float(np.finfo(np.float32).smallest_subnormal)
BIG = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.1, 1.5 * TINY), (0.4 * TINY, -0.4 * TINY), (-0.6 * TINY, 0.6 * TINY), (-1e39, 1e39)],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_thresholds_at_the_ends_of_the_float32_range(backend, dtype, lo, hi):
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
    update(backend, x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


def test_empty_batch_changes_nothing(backend):
    rng = np.random.default_rng(0)
    reference = reference_set(rng, 3, 16, np.float32)
    state = fresh_state(3, 16)
    update(backend, np.zeros((0, 3), np.float32), reference, state)
    assert_state_matches(state, numpy_features(np.zeros((0, 3)), *reference))


def test_a_read_only_batch_is_accepted(backend):
    # A binary request body decodes to a read-only np.frombuffer view.
    rng = np.random.default_rng(1)
    reference = reference_set(rng, 4, 16, np.float32)
    x = batch(rng, 50, reference, np.float32)
    x.flags.writeable = False
    state = fresh_state(4, 16)
    update(backend, x, reference, state)
    assert_state_matches(state, numpy_features(x, *reference))


@pytest.mark.parametrize(
    ("name", "shape"),
    [("edges", (4, 15)), ("counts", (3, 15)), ("lo", (4,)), ("s2", (2,)), ("n", (4,))],
)
def test_mismatched_shapes_are_refused(backend, name, shape):
    rng = np.random.default_rng(2)
    edges, lo, hi, shift = reference_set(rng, 3, 16, np.float64)
    arrays = {"edges": edges, "lo": lo, "hi": hi, "shift": shift, **fresh_state(3, 16)}
    arrays[name] = np.zeros(shape, arrays[name].dtype)
    names = ("edges", "lo", "hi", "shift", *STATE)
    with pytest.raises(ValueError, match="must"):
        backend.update_features(np.zeros((5, 3)), *(arrays[key] for key in names))


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
def test_argmax_matches_numpy(backend, rows, classes, dtype, seed, ties):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes), size=rows)
    if ties:  # a coarse grid makes equal maxima common; the first one counts
        p = np.round(p * 4) / 4
    p = p.astype(dtype)
    bad = rng.random(p.shape) < 0.01
    p[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype), size=int(bad.sum()))
    counts, confidence = np.zeros(classes, np.int64), np.zeros(1)
    backend.update_argmax(p, counts, confidence)
    backend.update_argmax(p[: rows // 2], counts, confidence)  # and it accumulates
    once, total = numpy_argmax(p)
    half, half_total = numpy_argmax(p[: rows // 2])
    np.testing.assert_array_equal(counts, once + half)
    assert confidence[0] == pytest.approx(total + half_total, rel=1e-9, abs=1e-300)


def test_argmax_first_maximum_wins_and_bad_rows_are_skipped(backend):
    p = np.array(
        [[0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [np.nan, 0.9, 0.1], [0.1, np.inf, 0.0], [0.3, 0.3, 0.3]],
        np.float32,
    )
    counts, confidence = np.zeros(3, np.int64), np.zeros(1)
    backend.update_argmax(p, counts, confidence)
    assert counts.tolist() == [2, 1, 0]
    assert confidence[0] == pytest.approx(0.4 + 0.5 + 0.3, rel=1e-7)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 1000), classes=st.integers(1, 50), seed=SEEDS)
def test_classes_match_bincount(backend, rows, classes, seed):
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, classes, size=rows)
    counts = np.ones(classes, np.int64)
    backend.update_classes(indices, counts)
    np.testing.assert_array_equal(counts, 1 + np.bincount(indices, minlength=classes))


@pytest.mark.parametrize("bad", [-1, 3])
def test_class_outside_the_counts_is_refused_and_nothing_counted(backend, bad):
    counts = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="outside"):
        backend.update_classes(np.array([0, 1, bad, 2]), counts)
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
            update(kernel_backend.jit(), x, reference, fresh_state(5, 16))
            kernels.update_argmax(p, np.zeros(3, np.int64), np.zeros(1))
    kernels.update_classes(np.array([0, 2, 1]), np.zeros(3, np.int64))
    assert [len(kernel.signatures) for kernel in dispatchers] == before


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 500),
    features=st.integers(1, 80),
    bins=st.integers(1, 40),
    dtype=DTYPES,
    seed=SEEDS,
    writeable=st.booleans(),
)
def test_the_backends_agree_to_the_last_bit(rows, features, bins, dtype, seed, writeable):
    rng = np.random.default_rng(seed)
    reference = reference_set(rng, features, bins, dtype)
    x = batch(rng, rows, reference, dtype)
    p = rng.dirichlet(np.ones(3), size=rows).astype(dtype)
    p[rng.random(p.shape) < 0.02] = np.nan
    x.flags.writeable = p.flags.writeable = writeable
    results = []
    for kernel_set in (kernel_backend.jit(), kernel_backend.aot()):
        state = fresh_state(features, bins)
        update(kernel_set, x, reference, state)
        counts, confidence = np.zeros(3, np.int64), np.zeros(1)
        kernel_set.update_argmax(p, counts, confidence)
        results.append({**state, "classes": counts, "confidence": confidence})
    jit, aot = results
    for name, array in jit.items():
        np.testing.assert_array_equal(aot[name], array, err_msg=name, strict=True)


def test_the_extension_takes_a_batch_in_any_layout():
    aot = kernel_backend.aot()
    rng = np.random.default_rng(4)
    reference = reference_set(rng, 6, 16, np.float64)
    wide = batch(rng, 40, reference, np.float64)
    for x in (np.asfortranarray(wide), wide[::-2], np.repeat(wide, 2, axis=1)[:, ::2]):
        state = fresh_state(6, 16)
        update(aot, x, reference, state)
        assert_state_matches(state, numpy_features(x, *reference))


def _state_with(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    state = fresh_state(3, 16)
    state[name] = array
    return state


@pytest.mark.parametrize(
    ("where", "bad"),
    [
        ("x", np.zeros((5, 3), np.int64)),  # a dtype it was not compiled for
        ("x", np.zeros((5, 3, 1), np.float32)),  # a rank it was not compiled for
        ("edges", np.zeros((3, 15), np.float32)),
        ("lo", np.zeros((3, 1))),
        ("counts", np.zeros((3, 16))),  # float64 where int64 is written: same item size
        ("n", np.zeros(3, np.int32)),
        ("s1", np.zeros(6)[::2]),  # strided: written as if contiguous, past its end
        ("counts", np.zeros((3, 16), np.int64, order="F")),
        ("vmin", np.frombuffer(bytes(24), np.float64)),  # read-only memory
        ("below", [0, 0, 0]),
    ],
    ids=["x-int64", "x-3d", "edges-f32", "lo-2d", "counts-f64", "n-i32", "s1-strided",
         "counts-fortran", "vmin-readonly", "below-list"],
)  # fmt: skip
def test_the_extension_refuses_arrays_it_was_not_compiled_for(where, bad):
    # numba.pycc checks only the item size: without the wrappers' checks these calls
    # would read or write the wrong memory.
    aot = kernel_backend.aot()
    rng = np.random.default_rng(5)
    edges, lo, hi, shift = reference_set(rng, 3, 16, np.float32)
    arguments = {"x": np.ones((5, 3), np.float32), "edges": edges, "lo": lo, "hi": hi}
    arguments |= {"shift": shift, **fresh_state(3, 16)}
    arguments[where] = bad
    with pytest.raises(TypeError, match=r"float32 or float64|the kernels take"):
        aot.update_features(*arguments.values())


def test_the_extension_refuses_bad_argmax_and_class_arrays():
    aot = kernel_backend.aot()
    with pytest.raises(TypeError, match="float32 or float64"):
        aot.update_argmax(np.zeros((2, 2), np.float16), np.zeros(2, np.int64), np.zeros(1))
    with pytest.raises(TypeError, match="the kernels take"):
        aot.update_argmax(np.zeros((2, 2)), np.zeros(2, np.int64), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="the kernels take"):
        aot.update_classes(np.zeros(2, np.int32), np.zeros(2, np.int64))
    counts = np.zeros(3, np.int64)
    aot.update_classes(np.array([2, 0, 2])[::-1], counts)  # any layout of indices
    assert counts.tolist() == [1, 0, 2]


def test_the_kernels_release_the_gil(backend):
    # The drift observer's thread runs them while the event loop serves: a pass over a
    # large batch must let this thread run Python meanwhile. Numba's JIT does it with
    # nogil=True; the extension's wrappers are compiled with release_gil.
    rng = np.random.default_rng(6)
    reference = reference_set(rng, 64, 200, np.float32)  # 200 bins: ~50 ms a pass
    x = rng.normal(size=(100_000, 64)).astype(np.float32)
    state = fresh_state(64, 200)
    update(backend, x[:10], reference, state)
    span: list[float] = []

    def run() -> None:
        span.append(time.perf_counter())
        update(backend, x, reference, state)
        span.append(time.perf_counter())

    worker = threading.Thread(target=run)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    started, ended = span
    # Holding the GIL, the kernel would stop this thread for its whole pass: one gap as
    # long as the pass, less the few ms the wrapper's Python code gives up the GIL.
    during = [started, *(tick for tick in ticks if started < tick < ended), ended]
    longest = max(b - a for a, b in itertools.pairwise(during))
    assert longest < 0.5 * (ended - started), f"stalled {longest:.3f} of {ended - started:.3f} s"
