"""The only module that imports numba: drift statistics, one fused pass per batch.

Theory of operation. Drift state is a set of additive sufficient statistics per
model version and feature (bin counts, out-of-range and NaN/inf counts, shifted
moments, min and max), so state from workers, replicas or time epochs merges by
addition. These kernels add one request batch to that state in place. They take
and return only arrays (no Python objects inside, so `nogil=True` lets a worker
thread run them while the event loop serves) and are compiled once per dtype,
cached on disk (`cache=True`) and compiled or loaded by `warm_up()` when a model
loads, never on a request.

Speed comes from the memory order: rows outer, features inner, so each inner
loop walks one contiguous row and LLVM vectorises it across features (16 float32
lanes per instruction). Each feature's sums stay in their own lane, so no fast-math
reassociation is needed and NaN/inf handling stays exact. Per batch:

1. one loop over groups of 4 rows adds the float64 moments, min/max and the
   below/above/NaN tallies, reading and writing each feature's state once per group;
2. per row, one loop counts each feature's edges at or below its value (a
   branch-free compare of 16 edges at a time) into a bin index, and a scalar loop
   adds one to each feature's bin.

LLVM does not vectorise a loop that writes many arrays (too many runtime alias
checks), which is why the work is split into these loops. For the compares, each
call lays the edges out feature-minor (edge k of every feature contiguous) in the
batch's own dtype: a float32 batch is compared with float32 thresholds, rounded so
the result is exactly that of the float64 compare, at twice the lanes of float64.
The figures and what each step gained are in benchmarks/RESULTS.md.
"""

from collections.abc import Callable
from typing import TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

from tidegate.kernel_backend import exercise

__all__ = ["update_argmax", "update_classes", "update_features", "warm_up"]

_F = TypeVar("_F", bound=Callable[..., None])

# Edges compared per pass: a constant trip count, so LLVM unrolls the compares and
# vectorises across features. Bins beyond 16 take another pass.
_CHUNK = 16
# Rows per pass of the moments and tallies: each feature's state is read and written
# once per group.
_GROUP = 4
_FloatArray = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Int64Array = npt.NDArray[np.int64]
_Float64Array = npt.NDArray[np.float64]


def _kernel(fn: _F) -> _F:
    """`numba.njit(nogil=True, cache=True)`, keeping the signature for mypy."""
    return cast(_F, numba.njit(nogil=True, cache=True)(fn))


def _inline(fn: _F) -> _F:
    """A kernel helper inlined by numba itself, so constant arguments reach LLVM."""
    return cast(_F, numba.njit(nogil=True, cache=True, inline="always")(fn))


@_kernel
def _fill_lanes(
    edges: _Float64Array,
    lo: _Float64Array,
    hi: _Float64Array,
    lanes: _FloatArray,
    width: int,
) -> None:
    """Lay out one call's per-feature constants feature-minor, in the batch dtype.

    lanes has shape (W + 4, F), W a multiple of _CHUNK. Rows 0..E-1: the edges
    rounded up (for v of the batch dtype, v >= e iff v >= up(e)); rows E..W-1: +inf,
    which no finite value reaches; row W: lo rounded up (v < lo iff v < up(lo));
    row W+1: hi rounded down (v > hi iff v > down(hi)); rows W+2 and W+3: the
    running min and max, +inf and -inf.

    Storing a float64 into a float32 lane rounds to nearest; when that lands on the
    wrong side, one step of the bit pattern moves it to the neighbouring float32.
    The pattern is sign-magnitude: towards +inf is +1 for +0.0 and positive floats
    and -1 for negative ones; towards -inf is -1 for positive floats and +1 for
    -0.0 and negative ones. (An up-rounding never needs to leave -0.0, nor a
    down-rounding +0.0.) float64 lanes never land on the wrong side.
    """
    features, inner = edges.shape
    # Transposed in float64 first (strided reads, contiguous writes), so the rounding
    # below runs on contiguous rows, branch-free: 0.35 us less per call than rounding
    # straight from the strided edges.
    exact = np.empty((width + 2, features))
    for f in range(features):
        for k in range(inner):
            exact[k, f] = edges[f, k]
        exact[width, f] = lo[f]
        exact[width + 1, f] = hi[f]
    # The int32 view is only changed where a rounding went the wrong way, which needs
    # float32 lanes, so it always matches the lanes it nudges.
    bits = lanes.view(np.int32)
    for k in range(inner):
        for f in range(features):
            lanes[k, f] = exact[k, f]
            bits[k, f] += (lanes[k, f] < exact[k, f]) * (1 - 2 * (lanes[k, f] < 0))
    lanes[inner:width] = np.inf
    for f in range(features):
        lanes[width, f] = exact[width, f]
        bits[width, f] += (lanes[width, f] < exact[width, f]) * (1 - 2 * (lanes[width, f] < 0))
        lanes[width + 1, f] = exact[width + 1, f]
        top = lanes[width + 1, f]
        bits[width + 1, f] += (top > exact[width + 1, f]) * (2 * (top <= 0) - 1)
    lanes[width + 2] = np.inf
    lanes[width + 3] = -np.inf


@_inline
def _tally_rows(
    x: _FloatArray,
    first: int,
    group: int,
    shift: _Float64Array,
    lanes: _FloatArray,
    width: int,
    tallies: _Int64Array,
    s1: _Float64Array,
    s2: _Float64Array,
) -> None:
    """Add rows first..first+group-1 to the moments, min/max and tallies.

    `group` is a constant at each call site, so the row loop unrolls and each
    feature's state is read and written once per group instead of once per row
    (about 0.2 ns per value saved at group 4). A group's terms are summed in float64,
    then added to the state.
    """
    for f in range(x.shape[1]):
        total = 0.0
        squares = 0.0
        least = lanes[width + 2, f]
        most = lanes[width + 3, f]
        n_below = 0
        n_above = 0
        n_bad = 0
        for j in range(group):
            v = x[first + j, f]
            finite = np.isfinite(v)
            d = np.float64(v) - shift[f] if finite else 0.0
            total += d
            squares += d * d
            least = v if finite & (v < least) else least
            most = v if finite & (v > most) else most
            n_below += finite & (v < lanes[width, f])
            n_above += finite & (v > lanes[width + 1, f])
            n_bad += not finite
        s1[f] += total
        s2[f] += squares
        lanes[width + 2, f] = least
        lanes[width + 3, f] = most
        tallies[0, f] += n_below
        tallies[1, f] += n_above
        tallies[2, f] += n_bad


@_kernel
def update_features(
    x: _FloatArray,
    edges: _Float64Array,
    lo: _Float64Array,
    hi: _Float64Array,
    shift: _Float64Array,
    counts: _Int64Array,
    below: _Int64Array,
    above: _Int64Array,
    nonfinite: _Int64Array,
    n: _Int64Array,
    s1: _Float64Array,
    s2: _Float64Array,
    vmin: _Float64Array,
    vmax: _Float64Array,
) -> None:
    """Add one batch `x` (rows, F) to the per-feature drift state, in place.

    Per value v = x[r, f]: NaN or +-inf only counts in nonfinite[f]. A finite v goes
    to bin `sum(v >= edges[f])` (a value on an edge goes up; the outer bins are
    open-ended), counts in below[f] if v < lo[f] and above[f] if v > hi[f], adds 1,
    v - shift[f] and (v - shift[f])**2 to n, s1 and s2 (in float64) and updates vmin
    and vmax. x is float32 or float64, C-contiguous, and may be read-only; the other
    arrays are C-contiguous and writeable, shaped (F, B-1) for edges, (F, B) for
    counts and (F,) for the rest.

    Raises:
        ValueError: an array's length does not match x's features or the bin count.
    """
    rows, features = x.shape
    inner = edges.shape[1]
    bins = inner + 1
    if edges.shape[0] != features or counts.shape[0] != features or counts.shape[1] != bins:
        raise ValueError("edges must be (F, B-1) and counts (F, B), with F = x.shape[1]")
    for size in (lo.size, hi.size, shift.size, s1.size, s2.size, vmin.size, vmax.size):
        if size != features:
            raise ValueError("lo, hi, shift, s1, s2, vmin and vmax must have F = x.shape[1] values")
    for size in (below.size, above.size, nonfinite.size, n.size):
        if size != features:
            raise ValueError("below, above, nonfinite and n must have F = x.shape[1] values")

    width = max(_CHUNK, (inner + _CHUNK - 1) // _CHUNK * _CHUNK)
    lanes = np.empty((width + 4, features), x.dtype)
    _fill_lanes(edges, lo, hi, lanes, width)
    tallies = np.zeros((3, features), np.int64)  # below, above, NaN/inf: this call's

    grouped = rows - rows % _GROUP
    for first in range(0, grouped, _GROUP):
        _tally_rows(x, first, _GROUP, shift, lanes, width, tallies, s1, s2)
    for first in range(grouped, rows):
        _tally_rows(x, first, 1, shift, lanes, width, tallies, s1, s2)

    # Bin of each feature for the current row. Unsigned, so numba adds no
    # negative-index wraparound to the scatter.
    slot = np.empty(features, np.uint32)
    flat = counts.reshape(features * bins)
    stride = np.uint64(bins)
    for r in range(rows):
        for f in range(features):
            v = x[r, f]
            b = 0
            for k in range(_CHUNK):
                b += v >= lanes[k, f]
            # NaN and -inf pass no edge and +inf passes all; all three go to bin 0
            # here and are taken out of it after the loop.
            slot[f] = b if np.isfinite(v) else 0
        for chunk in range(_CHUNK, width, _CHUNK):
            for f in range(features):
                v = x[r, f]
                b = 0
                for k in range(_CHUNK):
                    b += v >= lanes[chunk + k, f]
                slot[f] += b if np.isfinite(v) else 0
        base = np.uint64(0)
        for f in range(features):
            flat[base + slot[f]] += 1
            base += stride

    for f in range(features):
        counts[f, 0] -= tallies[2, f]
        below[f] += tallies[0, f]
        above[f] += tallies[1, f]
        nonfinite[f] += tallies[2, f]
        n[f] += rows - tallies[2, f]
        vmin[f] = min(vmin[f], np.float64(lanes[width + 2, f]))
        vmax[f] = max(vmax[f], np.float64(lanes[width + 3, f]))


@_kernel
def update_argmax(
    p: _FloatArray,
    class_counts: _Int64Array,
    confidence_sum: _Float64Array,
) -> None:
    """Count each row's predicted class (first maximum) and add its score, in place.

    A row with any NaN or inf is skipped: it has no meaningful maximum.

    Raises:
        ValueError: class_counts does not have one entry per column of p.
    """
    rows, classes = p.shape
    if class_counts.shape[0] != classes or confidence_sum.shape[0] < 1:
        raise ValueError("class_counts must have p.shape[1] entries and confidence_sum one")
    if classes == 0:
        return
    total = 0.0
    for r in range(rows):
        best = p[r, 0]
        arg = 0
        finite = np.isfinite(best)
        for c in range(1, classes):
            v = p[r, c]
            finite &= np.isfinite(v)
            if v > best:
                best = v
                arg = c
        if finite:
            class_counts[arg] += 1
            total += np.float64(best)
    confidence_sum[0] += total


@_kernel
def update_classes(indices: _Int64Array, class_counts: _Int64Array) -> None:
    """Count class indices (labels already mapped to 0..C-1 by the caller), in place.

    Raises:
        ValueError: an index is outside class_counts; nothing is counted then.
    """
    classes = class_counts.shape[0]
    for i in indices:
        if i < 0 or i >= classes:
            raise ValueError("class index outside class_counts")
    for i in indices:
        class_counts[i] += 1


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for each argument type a request
    uses (see `kernel_backend.exercise`), so that no request pays for numba's compiler."""
    exercise(update_features, update_argmax, update_classes)
