"""The drift kernels against the same update written in vectorised numpy.

One thread, one process. For each batch shape, the fused numba kernel
(`kernels.update_features`: bins, out-of-range and NaN/inf tallies, shifted
moments, min and max, in one call) and the best numpy version found (a loop over
the 15 edges of whole-batch compares, one bincount, masked sums) update the same
state from the same float32 batch; both results are checked equal first. Edges
are the 1/16..15/16 quantiles of 100,000 standard-normal reference rows; batches
are standard normal. Times are the median of many calls, in ns per value (one
core). `update_argmax` is timed the same way against numpy's argmax + bincount.
The same kernels compiled ahead of time (kernel_backend.aot(): the extension servers
load, called through its wrappers' argument checks) are timed beside the JIT's.
Last, `warm_up()` is timed in fresh processes: with an empty NUMBA_CACHE_DIR
(compiles) and again on the cache it wrote (loads).

    python benchmarks/bench_kernels.py [--calls 20000]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from tidegate import kernel_backend, kernels
from tidegate.drift import Window

FEATURES = 64
BINS = 16
CLASSES = 10
SHAPES = [(1, FEATURES), (64, FEATURES), (256, FEATURES), (1024, FEATURES)]
STATE = ("counts", "below", "above", "nonfinite", "n", "s1", "s2", "vmin", "vmax")


def fresh_state() -> dict[str, np.ndarray]:
    return Window.empty(FEATURES, BINS).to_arrays()


def numpy_update(
    x, edges, lo, hi, shift, counts, below, above, nonfinite, n, s1, s2, vmin, vmax
) -> None:
    """`kernels.update_features` in vectorised numpy: the fastest of the variants tried.

    Also tried: `(v[:, :, None] >= edges).sum(-1)` (1.7x slower: it materialises
    rows x F x 15 booleans and reduces a short last axis) and a per-feature
    `np.searchsorted` loop (1.6x slower).
    """
    rows, features = x.shape
    bins = edges.shape[1] + 1
    v = x.astype(np.float64)
    finite = np.isfinite(v)
    index = np.repeat(np.arange(0, features * bins, bins)[None, :], rows, axis=0)
    for k in range(bins - 1):
        index += v >= edges[:, k]
    counts += np.bincount(index[finite], minlength=features * bins).reshape(features, bins)
    below += np.count_nonzero(finite & (v < lo), axis=0)
    above += np.count_nonzero(finite & (v > hi), axis=0)
    good = np.count_nonzero(finite, axis=0)
    nonfinite += rows - good
    n += good
    d = np.where(finite, v - shift, 0.0)
    s1 += d.sum(axis=0)
    s2 += np.einsum("ij,ij->j", d, d)
    np.minimum(vmin, np.where(finite, v, np.inf).min(axis=0), out=vmin)
    np.maximum(vmax, np.where(finite, v, -np.inf).max(axis=0), out=vmax)


def numpy_argmax(p: np.ndarray, class_counts: np.ndarray, confidence_sum: np.ndarray) -> None:
    kept = p[np.isfinite(p).all(axis=1)]
    class_counts += np.bincount(kept.argmax(axis=1), minlength=p.shape[1])
    confidence_sum[0] += kept.max(axis=1).sum(dtype=np.float64)


def median_ns(call: Callable[[], object], calls: int) -> float:
    for _ in range(max(10, calls // 20)):
        call()
    times = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter_ns()
        call()
        times[i] = time.perf_counter_ns() - started
    return float(np.median(times))


def check_equal(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    for name in STATE:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, err_msg=name)


def warm_up_seconds(cache: str) -> tuple[float, float]:
    """(import, warm_up()) wall seconds in a fresh process using `cache` as numba's cache."""
    code = (
        "import time; started = time.perf_counter(); from tidegate import kernels; "
        "imported = time.perf_counter(); kernels.warm_up(); "
        "print(imported - started, time.perf_counter() - imported)"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    imported, warmed = result.stdout.split()
    return float(imported), float(warmed)


def main(calls: int) -> None:
    rng = np.random.default_rng(0)
    reference_rows = rng.standard_normal((100_000, FEATURES))
    quantiles = np.arange(1, BINS) / BINS
    edges = np.ascontiguousarray(np.quantile(reference_rows, quantiles, axis=0).T)
    reference: tuple[Any, ...] = (
        edges,
        reference_rows.min(axis=0),
        reference_rows.max(axis=0),
        reference_rows.mean(axis=0),
    )
    kernels.warm_up()
    aot = kernel_backend.aot()

    print(f"numba {numba.__version__}, numpy {np.__version__}, one thread, float32 batches\n")
    print(
        "| kernel | batch | numba ns/value | numba us/call | AOT us/call | numpy ns/value "
        "| speed-up |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for rows, features in SHAPES:
        x = rng.standard_normal((rows, features)).astype(np.float32)
        ours, theirs = fresh_state(), fresh_state()
        kernels.update_features(x, *reference, *(ours[name] for name in STATE))
        numpy_update(x, *reference, *(theirs[name] for name in STATE))
        check_equal(ours, theirs)
        count = max(200, calls * 256 // max(rows, 256))
        numba_ns = median_ns(
            lambda: kernels.update_features(x, *reference, *(ours[k] for k in STATE)),  # noqa: B023
            count,
        )
        aot_ns = median_ns(
            lambda: aot.update_features(x, *reference, *(ours[k] for k in STATE)),  # noqa: B023
            count,
        )
        numpy_ns = median_ns(
            lambda: numpy_update(x, *reference, *(theirs[k] for k in STATE)),  # noqa: B023
            max(100, count // 10),
        )
        values = rows * features
        print(
            f"| update_features | {rows} x {features} | {numba_ns / values:.2f} | "
            f"{numba_ns / 1000:.2f} | {aot_ns / 1000:.2f} | {numpy_ns / values:.1f} | "
            f"{numpy_ns / numba_ns:.0f}x |"
        )

    p = rng.dirichlet(np.ones(CLASSES), size=256).astype(np.float32)
    ours_counts, theirs_counts = np.zeros(CLASSES, np.int64), np.zeros(CLASSES, np.int64)
    ours_sum, theirs_sum = np.zeros(1), np.zeros(1)
    kernels.update_argmax(p, ours_counts, ours_sum)
    numpy_argmax(p, theirs_counts, theirs_sum)
    np.testing.assert_array_equal(ours_counts, theirs_counts)
    np.testing.assert_allclose(ours_sum, theirs_sum, rtol=1e-9)
    numba_ns = median_ns(lambda: kernels.update_argmax(p, ours_counts, ours_sum), calls)
    aot_ns = median_ns(lambda: aot.update_argmax(p, ours_counts, ours_sum), calls)
    numpy_ns = median_ns(lambda: numpy_argmax(p, theirs_counts, theirs_sum), calls // 10)
    print(
        f"| update_argmax | 256 x {CLASSES} | {numba_ns / p.size:.2f} | {numba_ns / 1000:.2f} | "
        f"{aot_ns / 1000:.2f} | {numpy_ns / p.size:.1f} | {numpy_ns / numba_ns:.0f}x |"
    )

    with tempfile.TemporaryDirectory() as cache:
        cold = warm_up_seconds(cache)
        warm = warm_up_seconds(cache)
    print("\n| warm_up() in a fresh process | import s | warm_up s |")
    print("|---|---:|---:|")
    print(f"| cold: empty NUMBA_CACHE_DIR (compiles) | {cold[0]:.2f} | {cold[1]:.2f} |")
    print(f"| warm: the cache the cold run wrote | {warm[0]:.2f} | {warm[1]:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per cell (256 rows)")
    main(parser.parse_args().calls)
