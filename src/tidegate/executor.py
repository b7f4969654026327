"""A bounded thread pool for onnxruntime, so inference never blocks the event loop.

onnxruntime releases the GIL while a session runs, so a few threads give real
parallelism. The bound is on work waiting for a thread: past `max_pending`, new
work is refused with `Overloaded` (503 + Retry-After) instead of queueing without
limit, which would only turn overload into unbounded latency and memory.
"""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from tidegate.errors import Overloaded

T = TypeVar("T")


@dataclass(slots=True, frozen=True)
class Timed(Generic[T]):
    """A result with the time it waited for a thread and the time it ran, in ns."""

    value: T
    queue_ns: int
    run_ns: int


@dataclass(slots=True, frozen=True)
class ExecutorStatistics:
    threads: int
    max_pending: int
    pending: int


class InferenceExecutor:
    def __init__(self, threads: int, max_pending: int) -> None:
        self._threads = threads
        self._max_pending = max_pending
        self._pending = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tidegate-infer")

    async def run(self, fn: Callable[[], T], *, inline: bool = False) -> Timed[T]:
        """Runs `fn` on a pool thread; raises Overloaded if too much work is waiting.

        With `inline`, runs it right here instead: for work shorter than the
        thread hand-off itself, which then costs the event loop less, not more.
        """
        if inline:
            started = time.perf_counter_ns()
            value = fn()
            return Timed(value, 0, time.perf_counter_ns() - started)
        if self._pending >= self._max_pending:
            raise Overloaded(f"{self._pending} inferences are already waiting; try again")
        self._pending += 1
        submitted = time.perf_counter_ns()

        def timed() -> Timed[T]:
            started = time.perf_counter_ns()
            value = fn()
            return Timed(value, started - submitted, time.perf_counter_ns() - started)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, timed)
        finally:
            self._pending -= 1

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics(self._threads, self._max_pending, self._pending)

    def shutdown(self) -> None:
        """Waits for running inferences to finish, then stops the threads."""
        self._pool.shutdown(wait=True)
