"""Per-version inference statistics in the shape of Triton's statistics extension.

Triton's clients (tritonclient, perf_analyzer) read these fields, so the names
and units are Triton's: durations as `{count, ns}`, `last_inference` in
milliseconds since the epoch. The hot path records monotonic nanoseconds only;
the wall-clock time of the last inference is worked out when the stats are read.
"""

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Upper bounds of the latency histograms `/metrics` exposes, in seconds. Fixed, and the
# same on every replica, so that histograms aggregate across them (`sum by (le)`).
LATENCY_BOUNDS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BOUNDS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BOUNDS_S)


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
class Timings:
    """Where one request's time went, in nanoseconds."""

    total: int
    queue: int
    compute_input: int
    compute_infer: int
    compute_output: int


@dataclass(slots=True)
class Buckets:
    """Durations counted in the `LATENCY_BOUNDS_S` buckets (the last: above them all)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS_NS) + 1))
    sum_ns: int = 0

    def add(self, ns: int) -> None:
        # bisect_left: a duration equal to a bound counts in that bound's bucket (le).
        self.counts[bisect.bisect_left(_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns


@dataclass(slots=True)
class Latency:
    """One variant's successful requests: total time, time queued, time computing."""

    total: Buckets = field(default_factory=Buckets)
    queue: Buckets = field(default_factory=Buckets)
    compute: Buckets = field(default_factory=Buckets)


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _add(duration: Duration, count: int, ns: int) -> None:
    duration.count += count
    duration.ns += ns


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows inferred (Triton counts each batch element)
    execution_count: int = 0  # model runs: one per batch
    batches: dict[int, BatchStats] = field(default_factory=dict)
    last_inference_ns: int | None = None  # on the monotonic clock
    # By variant (stable, canary, shadow, other): the latency histograms of /metrics,
    # and the failures.
    latency: dict[str, Latency] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def record_success(
        self, rows: int, timings: Timings, now_ns: int, variant: str = "stable"
    ) -> None:
        """One request answered: its own times (a batch's run counts for each of its
        requests, as in Triton)."""
        latency = self.latency.get(variant)
        if latency is None:
            latency = self.latency[variant] = Latency()
        latency.total.add(timings.total)
        latency.queue.add(timings.queue)
        latency.compute.add(timings.compute_input + timings.compute_infer + timings.compute_output)
        self.success.add(timings.total)
        self.queue.add(timings.queue)
        self.compute_input.add(timings.compute_input)
        self.compute_infer.add(timings.compute_infer)
        self.compute_output.add(timings.compute_output)
        self.inference_count += rows
        self.last_inference_ns = now_ns

    def record_execution(self, rows: int, merge_ns: int, run_ns: int, split_ns: int) -> None:
        """One model run of `rows` rows: joining its requests' inputs, the run, and
        slicing the outputs back apart (Triton's per-batch-size statistics)."""
        self.execution_count += 1
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.compute_input.add(merge_ns)
        batch.compute_infer.add(run_ns)
        batch.compute_output.add(split_ns)

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
        self.inference_count += state["inference_count"]
        self.execution_count += state["execution_count"]
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
