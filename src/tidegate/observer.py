"""Feeds served batches to the drift monitors on a worker thread, never on the
request path.

Theory of operation
-------------------
After a response is handed back, the request's input and output arrays are
added to its version's `PendingBatches` (`submit`: a small batch is copied into
a contiguous segment under a lock nobody holds for long; it never blocks on
work). A worker thread wakes every `interval` seconds, takes everything pending,
and updates each version's monitor under its lock, one segment at a time: one
extraction and one GIL-free kernel pass per segment, whatever the number of
requests in it, yielding the GIL between segments. The request path never wakes
a thread, except when a version's waiting tensors pass `wake_bytes` (large
inputs such as images): then the worker is woken to drain early, which keeps the
memory they hold small. When a version has `capacity` batches or `max_bytes`
bytes waiting, the batch is dropped and counted: the request is never delayed,
and the report says how much it missed. Reports take
the monitor's lock too, so they see whole batches only.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tidegate.drift import DriftMonitor
from tidegate.pending import Segment

log = logging.getLogger("tidegate.observer")


@dataclass(slots=True, frozen=True)
class ObserverStatistics:
    capacity: int
    queued: int
    observed: int  # batches applied to a monitor
    dropped: int  # batches refused because the queue was full


class DriftObserver:
    def __init__(
        self,
        capacity: int = 65_536,
        # Seconds between drains. Each drain costs the event loop a few GIL hand-offs
        # whatever its size: 0.01 s cost 12 % of throughput at concurrency 64, 0.1 s
        # about 6 %, 0.5 s about 3 % (benchmarks/bench_drift.py); reports lag by it.
        interval: float = 0.5,
        wake_bytes: int = 4 << 20,
        max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._active: set[DriftMonitor] = set()  # monitors that may have batches pending
        self._capacity = capacity
        self._interval = interval
        self._wake_bytes = wake_bytes
        self._max_bytes = max_bytes
        self._clock = clock
        self._observed = 0
        self._dropped = 0
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set to drain before the interval is over
        self._draining = threading.Lock()  # the worker and `drain` callers take turns
        self._thread = threading.Thread(target=self._run, name="tidegate-drift", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Applies what is pending, then ends the worker thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.drain()

    def submit(
        self, monitor: DriftMonitor, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        """Offers a served batch; drops it (counted) rather than wait."""
        arrays = [
            *map(inputs.__getitem__, monitor.input_names),
            *map(outputs.__getitem__, monitor.output_names),
        ]
        if arrays[0].ndim and not len(arrays[0]):
            return  # a batch of no rows: nothing to observe
        pending = monitor.pending
        if not pending.append(arrays, self._capacity, self._max_bytes):
            self._dropped += 1
            monitor.dropped += 1
            return
        self._active.add(monitor)
        if pending.nbytes >= self._wake_bytes:
            self._wake.set()

    def statistics(self) -> ObserverStatistics:
        queued = sum(len(monitor.pending) for monitor in list(self._active))
        return ObserverStatistics(self._capacity, queued, self._observed, self._dropped)

    def drain(self) -> None:
        """Applies every batch submitted so far, now, on the calling thread."""
        with self._draining:
            for monitor in list(self._active):
                # Forgotten before its deque is emptied: a batch appended meanwhile
                # adds the monitor back (submit appends, then adds), so none is lost,
                # and an unloaded version's monitor is not kept alive here.
                self._active.discard(monitor)
                taken = monitor.pending.take()
                if taken:
                    self._apply(monitor, taken)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # a bug must not kill the thread that every version uses
                log.exception("drift observation failed")

    def _apply(self, monitor: DriftMonitor, taken: list[Segment]) -> None:
        """Observes the segments taken, yielding the GIL after each: a waiting event
        loop takes it then, not after the interpreter's 5 ms switch interval."""
        split = len(monitor.input_names)
        for segment in taken:
            arrays = segment.arrays()
            inputs = dict(zip(monitor.input_names, arrays[:split], strict=True))
            outputs = dict(zip(monitor.output_names, arrays[split:], strict=True))
            with monitor.lock:
                monitor.observe(inputs, outputs, self._clock())
            self._observed += segment.batches
            time.sleep(0)
