"""Per-version inference statistics in the shape of Triton's statistics extension.

Triton's clients (tritonclient, perf_analyzer) read these fields, so the names
and units are Triton's: durations as `{count, ns}`, `last_inference` in
milliseconds since the epoch. The hot path records monotonic nanoseconds only;
the wall-clock time of the last inference is worked out when the stats are read.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import numpy as np

# Upper bounds of the latency histograms `/metrics` exposes, in seconds. Fixed, and the
# same on every replica, so that histograms aggregate across them (`sum by (le)`).
LATENCY_BOUNDS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_T = TypeVar("_T")
_BOUNDS_NS_ARRAY = np.array([round(bound * 1e9) for bound in LATENCY_BOUNDS_S], dtype=np.int64)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    """Compute times of the executions (model runs) of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class Buckets:
    """Durations counted in the `LATENCY_BOUNDS_S` buckets (the last: above them all)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_S) + 1))
    sum_ns: int = 0

    def add(self, durations_ns: np.ndarray) -> None:
        # side="left": a duration equal to a bound counts in that bound's bucket (le).
        buckets = np.searchsorted(_BOUNDS_NS_ARRAY, durations_ns, side="left")
        added = np.bincount(buckets, minlength=len(self.counts)).tolist()
        self.counts = [mine + new for mine, new in zip(self.counts, added, strict=True)]
        self.sum_ns += int(durations_ns.sum())


@dataclass(slots=True)
class Latency:
    """One variant's successful requests: total time, time queued, time computing."""

    total: Buckets = field(default_factory=Buckets)
    queue: Buckets = field(default_factory=Buckets)
    compute: Buckets = field(default_factory=Buckets)


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
# Records kept before they are added up (they are also added up whenever read).
FOLD_EVERY = 256


def _add(duration: Duration, count: int, ns: int) -> None:
    duration.count += count
    duration.ns += ns


def _taken(records: list[tuple[int, ...]]) -> np.ndarray | None:
    """The records so far, removed from `records`, as an int64 array (one row each);
    None if there are none. Safe against appends from another thread meanwhile."""
    count = len(records)
    if not count:
        return None
    taken = np.array(records[:count], dtype=np.int64)
    del records[:count]
    return taken


class _Folded(Generic[_T]):
    """A figure of `VersionStats` read up to date: its records added up (`fold`), then
    the attribute of the same name with a leading underscore."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._stored = "_" + name

    @overload
    def __get__(self, stats: None, owner: type) -> "_Folded[_T]": ...

    @overload
    def __get__(self, stats: "VersionStats", owner: type) -> _T: ...

    def __get__(self, stats: "VersionStats | None", owner: type) -> "_T | _Folded[_T]":
        if stats is None:
            return self
        stats.fold()
        value: _T = getattr(stats, self._stored)
        return value


class VersionStats:
    """One version's statistics: what Triton's extension reports, and per variant the
    latency histograms and failures of /metrics.

    The request path only appends what it measured: a tuple per answered request
    (`record_success`) and per model run (`record_execution`). The sums, counts and
    histograms are added up from them, with numpy, every `FOLD_EVERY` records and
    whenever they are read (`_Folded`). Adding field by field cost each request
    eleven calls and about 350 bytecodes, an eighth of the Python it ran on its way
    through the server; an append costs a few. Requests are recorded on the event
    loop, runs on pool threads too: the adding up takes a lock, the appends need none.
    """

    # Read up to date (`_Folded`); per batch size (rows of a run) the runs' times, per
    # variant the latency histograms of its successful requests.
    success: "_Folded[Duration]" = _Folded()
    queue: "_Folded[Duration]" = _Folded()
    compute_input: "_Folded[Duration]" = _Folded()
    compute_infer: "_Folded[Duration]" = _Folded()
    compute_output: "_Folded[Duration]" = _Folded()
    inference_count: "_Folded[int]" = _Folded()
    execution_count: "_Folded[int]" = _Folded()
    batches: "_Folded[dict[int, BatchStats]]" = _Folded()
    latency: "_Folded[dict[str, Latency]]" = _Folded()

    __slots__ = (
        "_answered",
        "_batches",
        "_compute_infer",
        "_compute_input",
        "_compute_output",
        "_execution_count",
        "_folding",
        "_inference_count",
        "_latency",
        "_queue",
        "_runs",
        "_success",
        "fail",
        "failures",
        "last_inference_ns",
    )

    def __init__(self) -> None:
        self.fail = Duration()
        self.failures: dict[str, int] = {}  # by variant
        self.last_inference_ns: int | None = None  # on the monotonic clock
        self._success = Duration()
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._inference_count = 0  # rows inferred (Triton counts each batch element)
        self._execution_count = 0  # model runs: one per batch
        self._batches: dict[int, BatchStats] = {}
        self._latency: dict[str, Latency] = {}  # by variant (stable, canary, shadow, other)
        # Not yet added up: per variant, (rows, total, queue, compute_input,
        # compute_infer, compute_output) of each request; (rows, merge, run, split) of
        # each run. In nanoseconds.
        self._answered: dict[str, list[tuple[int, ...]]] = {}
        self._runs: list[tuple[int, ...]] = []
        self._folding = threading.Lock()

    def record_success(
        self,
        rows: int,
        durations: tuple[int, int, int, int, int],
        now_ns: int,
        variant: str = "stable",
    ) -> None:
        """One request answered: its times, (total, queue, compute_input, compute_infer,
        compute_output) in ns (a batch's run counts for each of its requests, as in
        Triton)."""
        answered = self._answered.get(variant)
        if answered is None:
            answered = self._answered[variant] = []
        answered.append((rows, *durations))
        self.last_inference_ns = now_ns
        if len(answered) >= FOLD_EVERY:
            self.fold()

    def record_execution(self, rows: int, merge_ns: int, run_ns: int, split_ns: int) -> None:
        """One model run of `rows` rows: joining its requests' inputs, the run, and
        slicing the outputs back apart (Triton's per-batch-size statistics)."""
        runs = self._runs
        runs.append((rows, merge_ns, run_ns, split_ns))
        if len(runs) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Adds up the records appended so far."""
        with self._folding:
            # A copy: the event loop may add a variant while a reader's thread folds.
            for variant, records in list(self._answered.items()):
                answered = _taken(records)
                if answered is not None:
                    self._fold_answered(variant, answered)
            runs = _taken(self._runs)
            if runs is not None:
                self._fold_runs(runs)

    def _fold_answered(self, variant: str, answered: np.ndarray) -> None:
        count = len(answered)
        rows, *sums = answered.sum(axis=0).tolist()
        self._inference_count += rows
        durations = (
            self._success,
            self._queue,
            self._compute_input,
            self._compute_infer,
            self._compute_output,
        )
        for duration, ns in zip(durations, sums, strict=True):
            _add(duration, count, ns)
        latency = self._latency.get(variant)
        if latency is None:
            latency = self._latency[variant] = Latency()
        latency.total.add(answered[:, 1])
        latency.queue.add(answered[:, 2])
        latency.compute.add(answered[:, 3:].sum(axis=1))

    def _fold_runs(self, runs: np.ndarray) -> None:
        self._execution_count += len(runs)
        runs = runs[np.argsort(runs[:, 0], kind="stable")]
        sizes, starts = np.unique(runs[:, 0], return_index=True)
        counts = np.diff(np.append(starts, len(runs))).tolist()
        sums = np.add.reduceat(runs[:, 1:], starts, axis=0).tolist()
        for rows, count, (merge, run, split) in zip(sizes.tolist(), counts, sums, strict=True):
            batch = self._batches.get(rows)
            if batch is None:
                batch = self._batches[rows] = BatchStats()
            _add(batch.compute_input, count, merge)
            _add(batch.compute_infer, count, run)
            _add(batch.compute_output, count, split)

    def record_failure(self, total_ns: int, now_ns: int, variant: str = "stable") -> None:
        self.failures[variant] = self.failures.get(variant, 0) + 1
        self.fail.add(total_ns)
        self.last_inference_ns = now_ns

    def to_state(self) -> dict[str, Any]:
        """Every count and sum, for another worker to add into its own (`merge_state`)."""
        return {
            "durations": {
                name: [getattr(self, name).count, getattr(self, name).ns] for name in _DURATIONS
            },
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "batches": {
                str(size): [
                    [d.count, d.ns] for d in (b.compute_input, b.compute_infer, b.compute_output)
                ]
                for size, b in self.batches.items()
            },
            "last_inference_ns": self.last_inference_ns,
            "latency": {
                variant: [[bk.counts, bk.sum_ns] for bk in (lat.total, lat.queue, lat.compute)]
                for variant, lat in self.latency.items()
            },
            "failures": dict(self.failures),
        }

    def merge_state(self, state: dict[str, Any]) -> None:
        """Adds another worker's `to_state` into these statistics (the monotonic clock
        is the machine's, so the later last inference wins)."""
        for name, (count, ns) in state["durations"].items():
            _add(getattr(self, name), count, ns)
        self._inference_count += state["inference_count"]
        self._execution_count += state["execution_count"]
        for size, durations in state["batches"].items():
            batch = self.batches.setdefault(int(size), BatchStats())
            for duration, (count, ns) in zip(
                (batch.compute_input, batch.compute_infer, batch.compute_output),
                durations,
                strict=True,
            ):
                _add(duration, count, ns)
        last = state["last_inference_ns"]
        if last is not None and (self.last_inference_ns is None or last > self.last_inference_ns):
            self.last_inference_ns = last
        for variant, buckets in state["latency"].items():
            latency = self.latency.setdefault(variant, Latency())
            for mine, (counts, sum_ns) in zip(
                (latency.total, latency.queue, latency.compute), buckets, strict=True
            ):
                mine.counts = [a + b for a, b in zip(mine.counts, counts, strict=True)]
                mine.sum_ns += sum_ns
        for variant, count in state["failures"].items():
            self.failures[variant] = self.failures.get(variant, 0) + count

    def to_triton(
        self,
        name: str,
        version: str,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> dict[str, object]:
        """The `model_stats` entry Triton's statistics extension returns for one version."""
        last = 0
        if self.last_inference_ns is not None:
            last = (wall_ns() - (monotonic_ns() - self.last_inference_ns)) // 1_000_000
        empty = Duration().to_json()
        return {
            "name": name,
            "version": version,
            "last_inference": last,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": empty,
                "cache_miss": empty,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": batch.compute_input.to_json(),
                    "compute_infer": batch.compute_infer.to_json(),
                    "compute_output": batch.compute_output.to_json(),
                }
                for size, batch in sorted(self.batches.items())
            ],
        }


def whole_server(
    local: list[tuple[str, int, VersionStats]], others: list[list[Any]]
) -> list[VersionStats]:
    """Each local version's statistics plus what other workers report for the same
    version (`[name, version, to_state()]` triples); versions only others serve (a
    moment of a swap) are left out, as the local list decides what is shown."""
    totals: dict[tuple[str, int], VersionStats] = {}
    for name, version, stats in local:
        totals[name, version] = VersionStats()
        totals[name, version].merge_state(stats.to_state())
    for name, version, state in others:
        other = totals.get((name, int(version)))
        if other is not None:
            other.merge_state(state)
    return list(totals.values())
