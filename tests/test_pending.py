"""Waiting batches in segments: rows land in order, nothing is lost or mixed, small
batches are staged by reference and copied together, large batches are not copied,
and the bounds hold."""

import numpy as np
import pytest

from tidegate.pending import COPY_BELOW_BYTES, SEGMENT_ROWS, STAGE_BATCHES, PendingBatches


def _batch(rows: int, value: float, dtype: type = np.float32) -> list[np.ndarray]:
    return [np.full((rows, 3), value, dtype=dtype), np.full((rows,), value, dtype=np.int64)]


def test_batches_of_one_shape_share_a_segment_in_arrival_order():
    pending = PendingBatches(2)
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
    pending = PendingBatches(2)
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
    pending = PendingBatches(2)
    large = [np.ones((COPY_BELOW_BYTES // 12 + 1, 3), np.float32), np.ones(1, np.int64)]
    pending.append(large, 10, 1 << 30)
    (segment,) = pending.take()
    assert np.shares_memory(segment.arrays()[0], large[0])


def test_a_scalar_is_one_row():
    pending = PendingBatches(2)
    pending.append([np.ones((1, 3), np.float32), np.array(7, np.int64)], 10, 1 << 20)
    pending.append([np.ones((1, 3), np.float32), np.array(8, np.int64)], 10, 1 << 20)
    (segment,) = pending.take()
    np.testing.assert_array_equal(segment.arrays()[1], [7, 8])


def test_bounds_on_batches_and_bytes():
    pending = PendingBatches(2)
    assert pending.append(_batch(1, 0.0), 2, 1 << 20)
    assert pending.append(_batch(1, 0.0), 2, 1 << 20)
    assert not pending.append(_batch(1, 0.0), 2, 1 << 20)  # two batches wait already
    pending.take()
    one = sum(array.nbytes for array in _batch(1, 0.0))
    assert pending.append(_batch(1, 0.0), 10, 2 * one)
    assert pending.append(_batch(1, 0.0), 10, 2 * one)
    assert not pending.append(_batch(1, 0.0), 10, 2 * one)
    assert pending.nbytes == 2 * one


def test_staged_batches_are_copied_together_in_arrival_order():
    pending = PendingBatches(2)
    count = 3 * STAGE_BATCHES + 5  # three joined copies, and five staged at take
    batches = [_batch(i % 3 + 1, float(i)) for i in range(count)]
    for batch in batches:
        assert pending.append(batch, 10**6, 1 << 30)
    assert len(pending) == count
    (segment,) = pending.take()
    assert segment.batches == count
    features, labels = segment.arrays()
    expected = np.concatenate([batch[0] for batch in batches])
    np.testing.assert_array_equal(features, expected)
    np.testing.assert_array_equal(labels, np.concatenate([batch[1] for batch in batches]))
    assert not np.shares_memory(features, batches[-1][0])  # copies: the requests' go free


def test_small_batches_around_a_large_one_share_the_open_segment():
    pending = PendingBatches(2)
    large = [np.ones((COPY_BELOW_BYTES // 12 + 1, 3), np.float32), np.ones(1, np.int64)]
    pending.append(_batch(1, 1.0), 10, 1 << 30)
    pending.append(large, 10, 1 << 30)
    pending.append(_batch(1, 2.0), 10, 1 << 30)
    small, alone = pending.take()
    assert small.arrays()[0][:, 0].tolist() == [1.0, 2.0]
    assert small.batches == 2
    assert np.shares_memory(alone.arrays()[0], large[0])


def test_a_batch_with_the_wrong_number_of_tensors_is_refused_whole():
    pending = PendingBatches(2)
    pending.append(_batch(1, 1.0), 10, 1 << 20)
    with pytest.raises(ValueError, match="3 tensors, not 2"):
        pending.append([*_batch(1, 2.0), np.ones(1)], 10, 1 << 20)
    assert len(pending) == 1
    (segment,) = pending.take()
    assert [len(array) for array in segment.arrays()] == [1, 1]


def test_staged_batches_too_many_rows_together_fill_segments_one_at_a_time():
    pending = PendingBatches(2)
    rows = SEGMENT_ROWS // 8  # STAGE_BATCHES of them are four times SEGMENT_ROWS
    for i in range(STAGE_BATCHES):
        pending.append(_batch(rows, float(i)), 10**6, 1 << 30)
    segments = pending.take()
    assert max(len(segment.arrays()[0]) for segment in segments) <= SEGMENT_ROWS
    assert sum(segment.batches for segment in segments) == STAGE_BATCHES
    joined = np.concatenate([segment.arrays()[0][:, 0] for segment in segments])
    np.testing.assert_array_equal(joined, np.repeat(np.arange(STAGE_BATCHES), rows))
