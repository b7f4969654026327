"""The drift observer: off-path updates, joined batches, drops under overload."""

import time

import numpy as np

from tidegate.config import DriftConfig
from tidegate.drift import DriftMonitor, FeatureMap
from tidegate.observer import DriftObserver
from tidegate.pending import COPY_BELOW_BYTES, SEGMENT_ROWS
from tidegate.protocol import DATATYPES, TensorSpec

SPEC = TensorSpec("x", DATATYPES["FP32"], (-1, 4))


def _monitor(reference: np.ndarray) -> DriftMonitor:
    inputs = FeatureMap.for_tensors((SPEC,), {"x": reference})
    monitor = DriftMonitor(DriftConfig(), inputs, FeatureMap((), ()), (), 0.0)
    monitor.set_reference({"x": reference}, {}, "reference.npz")
    return monitor


def test_observed_batches_equal_direct_updates():
    rng = np.random.default_rng(11)
    reference = rng.normal(size=(300, 4)).astype(np.float32)
    # More rows than a segment holds, float64 rows among the float32 ones (each change of
    # dtype opens a segment), and a batch large enough to be kept as it is.
    sizes = rng.integers(1, 40, 3 * SEGMENT_ROWS // 20)
    batches = [rng.normal(size=(int(n), 4)).astype(np.float32) for n in sizes]
    batches[10] = batches[10].astype(np.float64)
    batches[11] = batches[11].astype(np.float64)
    batches[20] = rng.normal(size=(COPY_BELOW_BYTES // 16 + 1, 4)).astype(np.float32)
    assert sum(len(batch) for batch in batches) > 2 * SEGMENT_ROWS
    observed, direct = _monitor(reference), _monitor(reference)
    observer = DriftObserver(clock=lambda: 0.0)
    observer.start()
    for batch in batches:
        observer.submit(observed, {"x": batch}, {})
    observer.drain()
    observer.stop()
    for batch in batches:
        direct.observe({"x": batch}, {}, 0.0)
    got, want = observed.windows()["inputs"], direct.windows()["inputs"]
    for name, array in want.to_arrays().items():
        np.testing.assert_allclose(got.to_arrays()[name], array, rtol=1e-12, err_msg=name)
    statistics = observer.statistics()
    assert statistics.observed == len(batches)
    assert statistics.dropped == 0


def test_a_full_queue_drops_and_counts_instead_of_waiting():
    monitor = _monitor(np.zeros((100, 4), dtype=np.float32))
    observer = DriftObserver(capacity=3)  # not started: nothing drains the queue
    batch = {"x": np.ones((2, 4), dtype=np.float32)}
    for _ in range(5):
        observer.submit(monitor, batch, {})
    assert observer.statistics().dropped == 2
    assert observer.statistics().queued == 3
    assert monitor.dropped == 2
    observer.start()
    observer.drain()
    observer.stop()
    assert monitor.windows()["inputs"].n.tolist() == [6, 6, 6, 6]


def test_waiting_bytes_are_bounded_too():
    monitor = _monitor(np.zeros((100, 4), dtype=np.float32))
    observer = DriftObserver(max_bytes=100)  # not started; each batch below is 32 bytes
    for _ in range(5):
        observer.submit(monitor, {"x": np.ones((2, 4), dtype=np.float32)}, {})
    assert observer.statistics().queued == 3
    assert observer.statistics().dropped == 2


def test_large_waiting_tensors_are_drained_before_the_interval():
    monitor = _monitor(np.zeros((100, 4), dtype=np.float32))
    observer = DriftObserver(interval=600, wake_bytes=64)
    observer.start()
    try:
        observer.submit(monitor, {"x": np.ones((2, 4), dtype=np.float32)}, {})
        time.sleep(0.2)
        assert observer.statistics().observed == 0  # 32 bytes: waits for the interval
        observer.submit(monitor, {"x": np.ones((2, 4), dtype=np.float32)}, {})
        deadline = time.monotonic() + 5
        while observer.statistics().observed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert observer.statistics().observed == 2  # 64 bytes woke the worker
    finally:
        observer.stop()
