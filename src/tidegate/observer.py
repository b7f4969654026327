"""Feeds served batches to the drift monitors on a worker thread, never on the
request path.

Theory of operation
-------------------
After a response is handed back, the request's inputs and the model's outputs
are offered to a bounded queue (`submit`, which never blocks). One worker
thread takes what is queued, joins the batches of the same model version into
one (one kernel call per version per drain, so the cost per request shrinks as
traffic grows), and updates that version's monitor under its lock. When the
queue is full the batch is dropped and counted, on the observer and on the
monitor: the request is never delayed, and the report says how much it missed.
Reports take the same lock, so they see whole batches only.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tidegate.drift import DriftMonitor

log = logging.getLogger("tidegate.observer")

Batch = tuple[DriftMonitor, dict[str, np.ndarray], dict[str, np.ndarray]]
_STOP = object()
_MAX_DRAIN = 256  # batches joined per drain at most


@dataclass(slots=True, frozen=True)
class ObserverStatistics:
    capacity: int
    queued: int
    observed: int  # batches applied to a monitor
    dropped: int  # batches refused because the queue was full


class DriftObserver:
    def __init__(self, capacity: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=capacity)
        self._capacity = capacity
        self._clock = clock
        self._observed = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="tidegate-drift", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Applies what is queued, then ends the worker thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def submit(
        self, monitor: DriftMonitor, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        """Offers a served batch; drops it (counted) rather than wait."""
        try:
            self._queue.put_nowait((monitor, inputs, outputs))
        except queue.Full:
            self._dropped += 1
            monitor.dropped += 1

    def statistics(self) -> ObserverStatistics:
        return ObserverStatistics(
            self._capacity, self._queue.qsize(), self._observed, self._dropped
        )

    def drain(self) -> None:
        """Waits until every batch submitted so far is applied (for tests and reports
        that must include the last request)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < _MAX_DRAIN:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batches = [item for item in items if item is not _STOP]
            try:
                self._apply(batches)  # type: ignore[arg-type]
            except Exception:  # a bug must not kill the thread that every version uses
                log.exception("drift observation failed")
            finally:
                for _ in items:
                    self._queue.task_done()
            if len(batches) < len(items):
                return

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
