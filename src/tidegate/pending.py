"""Served batches waiting for the drift observer, gathered into contiguous segments.

Theory of operation
-------------------
The request path hands over each served batch (its input and output arrays,
one per tensor) and the observer's thread takes everything now and then. What
the thread does with it must be cheap for the event loop, which competes with it
for the GIL: joining thousands of small arrays, or a kernel call per request,
holds the GIL for milliseconds.

So small batches are copied into the open segment: one preallocated array per
tensor with room for many batches of the same row shape and dtype. The thread
then hands each segment to the kernels whole: one extraction and one GIL-free
kernel pass over a contiguous array, however many requests it holds. A batch
whose rows do not fit the open segment (another shape, dtype or no room left)
opens a new one of `SEGMENT_BYTES` (allocated, not touched: a version that sees a
trickle of traffic holds the pages its rows fill). A large batch (an image batch,
at least `COPY_BELOW_BYTES`) is not copied: its own arrays become a segment of
their own, which costs one kernel call, small next to its size.

The copy is not made per request. A small batch is first staged by reference
(one list append: its arrays are the request's own, fresh from
decoding and from onnxruntime, and nothing writes to them afterwards), and every
`STAGE_BATCHES` staged batches are copied into the segment in one go, one
`np.concatenate` per tensor, on the request path that staged the last of them (or
by `take`). Copying each batch on its own cost a request at concurrency 1 about
11 us of its 141 us in the server: numpy's assignment machinery runs on caches
that are cold between requests. Joining on the observer's thread instead moved
that work, and the freeing of every request's arrays, into bursts that held the
GIL and raised p99 at concurrency 1 by half or more (benchmarks/RESULTS.md, issue 13).

Arrays are not tracked by the garbage collector, so waiting batches cost it
nothing. The lock is held for a copy or a swap, never for work. The bytes waiting
are counted, so that a caller can drain early and bound them.
"""

import operator
import threading
from dataclasses import dataclass

import numpy as np

COPY_BELOW_BYTES = 64 << 10  # a batch this large keeps its own arrays as a segment
SEGMENT_BYTES = 1 << 20
SEGMENT_ROWS = 4096  # about, at most: the kernels' slowest path (labels) is per row
# Small batches staged by reference before they are copied into a segment together.
STAGE_BATCHES = 32
_NBYTES = operator.attrgetter("nbytes")


def _joined(batches: list[list[np.ndarray]]) -> list[np.ndarray] | None:
    """Each tensor's arrays joined along their rows; None if their row shapes or dtypes
    differ, or one is 0-d."""
    try:
        # casting="no": a batch of another dtype fails the join rather than widen the rest.
        return [
            np.concatenate(column, dtype=column[0].dtype, casting="no")
            for column in zip(*batches, strict=True)
        ]
    except (ValueError, TypeError):
        return None


def _with_rows(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`arrays` with a 0-d array (one row of a scalar output) as one row."""
    return [array if array.ndim else array.reshape(1) for array in arrays]


@dataclass(slots=True, eq=False)
class Segment:
    """Batches of one row shape and dtype per tensor, rows along axis 0."""

    buffers: list[np.ndarray]  # one per tensor
    filled: list[int]  # rows of each buffer in use
    batches: int = 0
    shared: bool = True  # False: a large batch's own arrays, closed

    @classmethod
    def allocate(cls, arrays: list[np.ndarray]) -> "Segment":
        """An empty segment shaped like `arrays`, with room for about `SEGMENT_BYTES`."""
        rows = len(arrays[0])
        row_bytes = max(1, sum(array.nbytes for array in arrays) // rows)
        batches = max(1, min(SEGMENT_BYTES // row_bytes, SEGMENT_ROWS) // rows)
        buffers = [
            np.empty((len(array) * batches, *array.shape[1:]), dtype=array.dtype)
            for array in arrays
        ]
        return cls(buffers, [0] * len(arrays))

    @classmethod
    def borrowed(cls, arrays: list[np.ndarray]) -> "Segment":
        return cls(list(arrays), [len(array) for array in arrays], 1, shared=False)

    def add(self, arrays: list[np.ndarray], batches: int = 1) -> bool:
        """Copies `batches` batches' rows in (one array per tensor, rows joined);
        False (nothing counted) if they do not fit."""
        if not self.shared:
            return False
        filled = self.filled
        ends = []
        for buffer, used, array in zip(self.buffers, filled, arrays, strict=True):
            end = used + len(array)
            if array.dtype != buffer.dtype or array.shape[1:] != buffer.shape[1:]:
                return False
            if end > len(buffer):
                return False
            # Rows past `filled` are nobody's yet: a refusal below leaves no trace.
            buffer[used:end] = array
            ends.append(end)
        self.filled = ends
        self.batches += batches
        return True

    def arrays(self) -> list[np.ndarray]:
        """The rows in use, one array per tensor (views, no copy)."""
        return [buffer[:used] for buffer, used in zip(self.buffers, self.filled, strict=True)]


class PendingBatches:
    """One model version's served batches, waiting in segments (see the module doc)."""

    def __init__(self, tensors: int) -> None:
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._open: Segment | None = None
        self._tensors = tensors
        self._staged: list[list[np.ndarray]] = []  # whole batches, as appended
        self.batches = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return self.batches

    def append(self, arrays: list[np.ndarray], capacity: int, max_bytes: int) -> bool:
        """Adds one batch's arrays (one per tensor, rows on axis 0; a 0-d array is one
        row); False when `capacity` batches or `max_bytes` bytes would wait."""
        if len(arrays) != self._tensors:  # checked first: the staged stay aligned
            raise ValueError(f"a batch of {len(arrays)} tensors, not {self._tensors}")
        size = sum(map(_NBYTES, arrays))
        with self._lock:
            if self.batches >= capacity or self.nbytes + size > max_bytes:
                return False
            if size >= COPY_BELOW_BYTES:
                self._copy_staged()  # the staged ones first, as they came
                self._segments.append(Segment.borrowed(_with_rows(arrays)))
            else:
                staged = self._staged
                staged.append(arrays)
                if len(staged) >= STAGE_BATCHES:
                    self._copy_staged()
            self.batches += 1
            self.nbytes += size
        return True

    def _copy_staged(self) -> None:
        """Copies the staged batches into segments: joined, one copy per tensor, when
        their row shapes and dtypes agree, else one at a time. The lock is held."""
        if not self._staged:
            return
        staged, self._staged = self._staged, []
        joined = _joined(staged)
        if joined is None:  # a 0-d array, of a scalar output, joins as one row
            staged = [_with_rows(arrays) for arrays in staged]
            joined = _joined(staged)
        if joined is not None and len(joined[0]) <= SEGMENT_ROWS:
            self._add(joined, len(staged))
            return
        for batch in staged:  # in segments of about SEGMENT_ROWS
            self._add(batch, 1)

    def _add(self, arrays: list[np.ndarray], batches: int) -> None:
        if self._open is None or not self._open.add(arrays, batches):
            self._open = Segment.allocate(arrays)
            self._open.add(arrays, batches)
            self._segments.append(self._open)

    def take(self) -> list[Segment]:
        """Everything waiting, leaving nothing behind."""
        with self._lock:
            self._copy_staged()
            taken, self._segments, self._open = self._segments, [], None
            self.batches = self.nbytes = 0
        return taken
