"""VersionStats adds up its records later, with numpy (see its docstring): the sums,
counts and histograms must be exactly what adding each record as it came gives, read
at any moment, with runs recorded from several threads at once."""

import bisect
import threading

import numpy as np

from tidegate.stats import FOLD_EVERY, LATENCY_BOUNDS_S, VersionStats

BOUNDS_NS = [round(bound * 1e9) for bound in LATENCY_BOUNDS_S]


def _durations(rng: np.random.Generator) -> tuple[int, int, int, int, int]:
    """Random times, a tenth of them exactly on a bucket bound (which counts in it)."""
    if rng.random() < 0.1:
        total = BOUNDS_NS[int(rng.integers(len(BOUNDS_NS)))]
    else:
        total = int(rng.integers(0, 20 * 10**9))
    queue, compute_input, compute_infer, compute_output = (
        int(value) for value in rng.integers(0, 10**6, 4)
    )
    return total, queue, compute_input, compute_infer, compute_output


class Reference:
    """The statistics added record by record, as the request path once did."""

    def __init__(self) -> None:
        self.sums = [0] * 5
        self.count = 0
        self.rows = 0
        self.histograms: dict[str, list[list[int]]] = {}
        self.histogram_sums: dict[str, list[int]] = {}

    def record(self, rows: int, durations: tuple[int, ...], variant: str) -> None:
        self.count += 1
        self.rows += rows
        self.sums = [a + b for a, b in zip(self.sums, durations, strict=True)]
        total, queue, *compute = durations
        histograms = self.histograms.setdefault(
            variant, [[0] * (len(BOUNDS_NS) + 1) for _ in range(3)]
        )
        sums = self.histogram_sums.setdefault(variant, [0, 0, 0])
        for index, ns in enumerate((total, queue, sum(compute))):
            histograms[index][bisect.bisect_left(BOUNDS_NS, ns)] += 1
            sums[index] += ns


def _check(stats: VersionStats, reference: Reference) -> None:
    durations = (
        stats.success,
        stats.queue,
        stats.compute_input,
        stats.compute_infer,
        stats.compute_output,
    )
    assert [d.count for d in durations] == [reference.count] * 5
    assert [d.ns for d in durations] == reference.sums
    assert stats.inference_count == reference.rows
    assert set(stats.latency) == set(reference.histograms)
    for variant, latency in stats.latency.items():
        series = (latency.total, latency.queue, latency.compute)
        assert [b.counts for b in series] == reference.histograms[variant]
        assert [b.sum_ns for b in series] == reference.histogram_sums[variant]


def test_requests_add_up_as_recorded_one_by_one_whenever_read() -> None:
    rng = np.random.default_rng(7)
    stats = VersionStats()
    reference = Reference()
    # Past several folds, and read in between (a read adds up what is there so far).
    for count in (3, FOLD_EVERY - 3, 1, 2 * FOLD_EVERY + 5, 17):
        for _ in range(count):
            rows = int(rng.integers(0, 9))
            variant = str(rng.choice(["stable", "canary", "shadow"]))
            durations = _durations(rng)
            stats.record_success(rows, durations, 12345, variant)
            reference.record(rows, durations, variant)
        _check(stats, reference)
    assert stats.last_inference_ns == 12345


def test_runs_from_several_threads_are_all_counted_by_batch_size() -> None:
    stats = VersionStats()
    threads, per_thread = 4, 3 * FOLD_EVERY + 11
    start = threading.Barrier(threads + 1)

    def record(seed: int) -> None:
        rng = np.random.default_rng(seed)
        start.wait()
        for _ in range(per_thread):
            rows = int(rng.integers(1, 6))
            stats.record_execution(rows, rows, 10 * rows, 100 * rows)

    workers = [threading.Thread(target=record, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    while any(worker.is_alive() for worker in workers):
        assert stats.execution_count <= threads * per_thread  # reads fold meanwhile
    for worker in workers:
        worker.join()

    expected: dict[int, int] = {}
    for seed in range(threads):
        rng = np.random.default_rng(seed)
        for _ in range(per_thread):
            rows = int(rng.integers(1, 6))
            expected[rows] = expected.get(rows, 0) + 1
    assert stats.execution_count == threads * per_thread
    assert {rows: b.compute_infer.count for rows, b in stats.batches.items()} == expected
    for rows, batch in stats.batches.items():
        runs = expected[rows]
        assert (batch.compute_input.ns, batch.compute_infer.ns, batch.compute_output.ns) == (
            runs * rows,
            runs * 10 * rows,
            runs * 100 * rows,
        )


def test_state_carries_records_not_yet_added_up() -> None:
    rng = np.random.default_rng(3)
    stats = VersionStats()
    for _ in range(FOLD_EVERY + 7):
        stats.record_success(1, _durations(rng), 99, "stable")
        stats.record_execution(2, 1, 2, 3)
    stats.record_failure(500, 100, "canary")
    merged = VersionStats()
    merged.merge_state(stats.to_state())
    merged.merge_state(stats.to_state())
    assert merged.success.count == 2 * (FOLD_EVERY + 7)
    assert merged.execution_count == 2 * (FOLD_EVERY + 7)
    assert merged.failures == {"canary": 2}
    assert merged.latency["stable"].total.counts == [
        2 * count for count in stats.latency["stable"].total.counts
    ]
    assert merged.last_inference_ns == 100
