"""A log-bucket latency histogram for the `tidegate bench` load generator.

Why it exists
-------------
The load generator records one duration per request in the client's hot loop and then
reports percentiles (p50 ... p99.9) and the shape of the distribution. Keeping every
sample would cost memory linear in the run length; fixed-width buckets would be either
too coarse for microsecond latencies or too many for second-long ones. This histogram,
in the style of HDR histograms, has:

- bounded relative error at any magnitude: a bucket's width is less than a 2**-SUB_BITS
  fraction of its lower bound, so every reported percentile is within that fraction of
  the exact one, whether requests take 50 us or 5 s;
- constant memory: at most 2**SUB_BITS buckets per power of two (sparse, so a run only
  pays for the magnitudes it actually saw), whatever the number of requests;
- a cheap `record`: pure Python, O(1), one `int.bit_length`, a shift and a dict update;
- mergeability: counts add, so histograms from several client processes combine
  exactly (`merge`, or `to_dict` / `from_dict` across a process boundary).

Bucket scheme
-------------
Values below 2**(SUB_BITS + 1) get a bucket each (exact). A larger value v keeps its top
SUB_BITS + 1 bits: with shift = v.bit_length() - SUB_BITS - 1 and mantissa m = v >> shift
(2**SUB_BITS <= m < 2**(SUB_BITS + 1)), its bucket is [m << shift, ((m + 1) << shift) - 1]
and its index is (shift << SUB_BITS) + m. Indices are contiguous and increase with the
value, and high - low = 2**shift - 1 < 2**shift <= low * 2**-SUB_BITS.
"""

import math
from collections.abc import Mapping
from typing import ClassVar

__all__ = ["LatencyHistogram"]


class LatencyHistogram:
    """Counts of durations (integer nanoseconds) in log buckets whose width is at most
    a 2**-SUB_BITS fraction of their value, so every percentile it reports is within
    that relative error of the exact one. Mergeable by addition (several client processes).

    `count`, `min_ns`, `max_ns` and `mean_ns` are exact (kept alongside the buckets)."""

    SUB_BITS: ClassVar[int] = 7  # -> relative error <= 1/128 < 0.8 %

    __slots__ = ("_count", "_counts", "_max", "_min", "_shift_base", "_sub_bits", "_sum")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._count = 0
        self._sum = 0
        self._min = 0
        self._max = 0
        # Cached per instance so `record` does no class-attribute lookups. A value with
        # bit_length b is shifted right by b - (SUB_BITS + 1) bits.
        self._sub_bits = self.SUB_BITS
        self._shift_base = self.SUB_BITS + 1

    # -- recording ---------------------------------------------------------------------

    def record(self, ns: int) -> None:
        """Count one duration of `ns` nanoseconds (an int >= 0). Values below
        2**SUB_BITS (indeed below 2**(SUB_BITS + 1)) are kept exactly."""
        if ns < 0:
            raise ValueError(f"durations must be >= 0 ns, got {ns}")
        shift = ns.bit_length() - self._shift_base
        index = ((shift << self._sub_bits) + (ns >> shift)) if shift > 0 else ns
        counts = self._counts
        counts[index] = counts.get(index, 0) + 1
        if self._count:
            if ns < self._min:
                self._min = ns
            elif ns > self._max:
                self._max = ns
        else:
            self._min = self._max = ns
        self._count += 1
        self._sum += ns

    def merge(self, other: "LatencyHistogram") -> None:
        """Add `other`'s counts into this histogram (as if its values were recorded here)."""
        if other.SUB_BITS != self.SUB_BITS:
            raise ValueError(
                f"cannot merge a histogram with sub_bits={other.SUB_BITS} "
                f"into one with sub_bits={self.SUB_BITS}"
            )
        if not other._count:
            return
        counts = self._counts
        for index, n in list(other._counts.items()):
            counts[index] = counts.get(index, 0) + n
        if self._count:
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)
        else:
            self._min, self._max = other._min, other._max
        self._count += other._count
        self._sum += other._sum

    # -- exact summaries ---------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of recorded durations."""
        return self._count

    @property
    def min_ns(self) -> int:
        """Smallest recorded duration (exact), 0 when empty."""
        return self._min

    @property
    def max_ns(self) -> int:
        """Largest recorded duration (exact), 0 when empty."""
        return self._max

    @property
    def mean_ns(self) -> float:
        """Mean duration from the exact running sum, 0.0 when empty."""
        return self._sum / self._count if self._count else 0.0

    # -- percentiles and buckets -------------------------------------------------------

    def percentile(self, q: float) -> int:
        """The q-th percentile (q in [0, 100]) in ns, within a 2**-SUB_BITS relative error.

        The exact value is the recorded value of rank ceil(q / 100 * count) (at least 1),
        i.e. numpy.percentile(values, q, method="inverted_cdf"). This returns the upper
        bound of the bucket holding that rank, clamped to [min_ns, max_ns] (so rank 1 and
        rank count give min_ns and max_ns exactly): it is never below the exact value and
        exceeds it by less than exact * 2**-SUB_BITS."""
        if not self._count:
            raise ValueError("percentile of an empty histogram")
        if not 0.0 <= q <= 100.0:  # also rejects NaN
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        # Same float operations as numpy's inverted_cdf, so the ranks agree exactly.
        rank = min(max(math.ceil(q / 100 * self._count), 1), self._count)
        if rank == 1:
            return self._min  # the smallest value is known exactly (the largest is the clamp)
        seen = 0
        counts = self._counts
        for index in sorted(counts):
            seen += counts[index]
            if seen >= rank:
                high = self._bounds(index)[1]
                return max(self._min, min(high, self._max))
        raise AssertionError("bucket counts do not add up to count")  # pragma: no cover

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low_ns, high_ns, count) of each non-empty bucket in ascending order; a bucket
        holds the values low_ns <= v <= high_ns (both inclusive)."""
        counts = self._counts
        return [(*self._bounds(index), counts[index]) for index in sorted(counts)]

    def _bounds(self, index: int) -> tuple[int, int]:
        """Inclusive [low, high] value range of bucket `index`."""
        sub_bits = self.SUB_BITS
        shift = (index >> sub_bits) - 1
        if shift <= 0:  # exact buckets: index == value
            return index, index
        low = (index - (shift << sub_bits)) << shift
        return low, low + (1 << shift) - 1

    # -- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable snapshot: sub_bits, count, sum, min, max and the sparse
        buckets as {str(index): count}, ascending."""
        counts = self._counts
        return {
            "sub_bits": self.SUB_BITS,
            "count": self._count,
            "sum": self._sum,
            "min": self._min,
            "max": self._max,
            "buckets": {str(index): counts[index] for index in sorted(counts)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "LatencyHistogram":
        """Rebuild a histogram from `to_dict()` output (also after a JSON round trip).
        Raises ValueError on a different sub_bits or inconsistent contents."""
        sub_bits = _int_field(data, "sub_bits")
        if sub_bits != cls.SUB_BITS:
            raise ValueError(f"histogram has sub_bits={sub_bits}, expected {cls.SUB_BITS}")
        raw_buckets = data.get("buckets")
        if not isinstance(raw_buckets, Mapping):
            raise ValueError("histogram field 'buckets' must be a mapping of index to count")
        hist = cls()
        counts: dict[int, int] = {}
        for key, n in raw_buckets.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"bad bucket index {key!r}") from None
            if index < 0 or not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"bad bucket {key!r}: {n!r}")
            counts[index] = counts.get(index, 0) + n
        count = _int_field(data, "count")
        total = _int_field(data, "sum")
        low = _int_field(data, "min")
        high = _int_field(data, "max")
        if count != sum(counts.values()):
            raise ValueError(f"bucket counts add up to {sum(counts.values())}, not {count}")
        if min(count, total, low, high) < 0 or low > high:
            raise ValueError("histogram count, sum, min and max must be >= 0 with min <= max")
        hist._counts = counts
        hist._count = count
        hist._sum = total
        hist._min = low
        hist._max = high
        return hist


def _int_field(data: Mapping[str, object], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"histogram field {name!r} must be an int, got {value!r}")
    return value
