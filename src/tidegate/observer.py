"""Feeds served batches to the drift monitors on a worker thread, never on the
request path.

Theory of operation
-------------------
After a response is handed back, the request's inputs and the model's outputs
are appended to a bounded deque (`submit`: one length check and one append,
atomic under the GIL; it never blocks). A worker thread wakes every `interval`
seconds, takes everything pending, joins the batches of each model version into
one, and updates that version's monitor under its lock: one kernel call per
version per interval however many requests came in, so the cost per request
shrinks as traffic grows and the request path never wakes a thread. When the
deque is full the batch is dropped and counted, on the observer and on the
monitor; the request is never delayed, and the report says how much it missed.
Reports take the monitor's lock too, so they see whole batches only.
"""

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tidegate.drift import DriftMonitor

log = logging.getLogger("tidegate.observer")

Batch = tuple[DriftMonitor, dict[str, np.ndarray], dict[str, np.ndarray]]


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
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pending: collections.deque[Batch] = collections.deque()
        self._capacity = capacity
        self._interval = interval
        self._clock = clock
        self._observed = 0
        self._dropped = 0
        self._stopping = threading.Event()
        self._draining = threading.Lock()  # the worker and `drain` callers take turns
        self._thread = threading.Thread(target=self._run, name="tidegate-drift", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Applies what is pending, then ends the worker thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.drain()

    def submit(
        self, monitor: DriftMonitor, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        """Offers a served batch; drops it (counted) rather than wait."""
        if len(self._pending) >= self._capacity:
            self._dropped += 1
            monitor.dropped += 1
            return
        self._pending.append((monitor, inputs, outputs))

    def statistics(self) -> ObserverStatistics:
        return ObserverStatistics(self._capacity, len(self._pending), self._observed, self._dropped)

    def drain(self) -> None:
        """Applies every batch submitted so far, now, on the calling thread."""
        with self._draining:
            batches = []
            while self._pending:
                batches.append(self._pending.popleft())
            if batches:
                self._apply(batches)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.drain()
            except Exception:  # a bug must not kill the thread that every version uses
                log.exception("drift observation failed")

    def _apply(self, batches: list[Batch]) -> None:
        by_monitor: dict[int, list[Batch]] = {}
        for batch in batches:
            by_monitor.setdefault(id(batch[0]), []).append(batch)
        for group in by_monitor.values():
            monitor = group[0][0]
            inputs, outputs = _joined([b[1] for b in group]), _joined([b[2] for b in group])
            with monitor.lock:
                monitor.observe(inputs, outputs, self._clock())
            self._observed += len(group)


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
