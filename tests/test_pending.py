"""Waiting batches in segments: rows land in order, nothing is lost or mixed, large
batches are not copied, and the bounds hold."""

import numpy as np

from tidegate.pending import COPY_BELOW_BYTES, SEGMENT_ROWS, PendingBatches


def _batch(rows: int, value: float, dtype: type = np.float32) -> list[np.ndarray]:
    return [np.full((rows, 3), value, dtype=dtype), np.full((rows,), value, dtype=np.int64)]


def test_batches_of_one_shape_share_a_segment_in_arrival_order():
    pending = PendingBatches()
    for i in range(5):
        assert pending.append(_batch(i + 1, float(i)), 100, 1 << 20)
    assert len(pending) == 5
    (segment,) = pending.take()
    features, labels = segment.arrays()
    expected = np.concatenate([np.full(i + 1, float(i)) for i in range(5)])
    np.testing.assert_array_equal(features[:, 0], expected)
    np.testing.assert_array_equal(labels, expected.astype(np.int64))
    assert segment.batches == 5
    assert len(pending) == 0
    assert pending.nbytes == 0
    assert pending.take() == []


def test_another_dtype_shape_or_a_full_segment_opens_a_new_one():
    pending = PendingBatches()
    pending.append(_batch(2, 1.0), 10**6, 1 << 30)
    pending.append(_batch(2, 2.0, np.float64), 10**6, 1 << 30)
    pending.append([np.ones((2, 5), np.float32), np.ones(2, np.int64)], 10**6, 1 << 30)
    for _ in range(SEGMENT_ROWS):  # more rows than one segment holds
        pending.append(_batch(1, 3.0), 10**6, 1 << 30)
    segments = pending.take()
    assert len(segments) >= 4
    rows = [len(segment.arrays()[0]) for segment in segments]
    assert sum(rows) == 6 + SEGMENT_ROWS
    assert max(rows) <= SEGMENT_ROWS
    assert sum(segment.batches for segment in segments) == 3 + SEGMENT_ROWS
    assert segments[1].arrays()[0].dtype == np.float64


def test_a_large_batch_is_kept_without_a_copy():
    pending = PendingBatches()
    large = [np.ones((COPY_BELOW_BYTES // 12 + 1, 3), np.float32), np.ones(1, np.int64)]
    pending.append(large, 10, 1 << 30)
    (segment,) = pending.take()
    assert np.shares_memory(segment.arrays()[0], large[0])


def test_a_scalar_is_one_row():
    pending = PendingBatches()
    pending.append([np.ones((1, 3), np.float32), np.array(7, np.int64)], 10, 1 << 20)
    pending.append([np.ones((1, 3), np.float32), np.array(8, np.int64)], 10, 1 << 20)
    (segment,) = pending.take()
    np.testing.assert_array_equal(segment.arrays()[1], [7, 8])


def test_bounds_on_batches_and_bytes():
    pending = PendingBatches()
    assert pending.append(_batch(1, 0.0), 2, 1 << 20)
    assert pending.append(_batch(1, 0.0), 2, 1 << 20)
    assert not pending.append(_batch(1, 0.0), 2, 1 << 20)  # two batches wait already
    pending.take()
    one = sum(array.nbytes for array in _batch(1, 0.0))
    assert pending.append(_batch(1, 0.0), 10, 2 * one)
    assert pending.append(_batch(1, 0.0), 10, 2 * one)
    assert not pending.append(_batch(1, 0.0), 10, 2 * one)
    assert pending.nbytes == 2 * one
