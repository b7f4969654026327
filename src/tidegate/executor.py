"""The thread pool that runs onnxruntime, so long inferences never block the event loop.

onnxruntime releases the GIL while a session runs, so a few threads give real
parallelism. Nothing queues here for long: each version's `Batcher` hands over at
most one batch per thread, and bounds what waits in its own queue.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class InferenceExecutor:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.running = 0  # submitted and not yet finished: 0 when the pool is idle
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tidegate-infer")

    def submit(self, fn: Callable[[], T]) -> "asyncio.Future[T]":
        """Runs `fn` on a pool thread; the future resolves on the running event loop."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        self.running += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: "asyncio.Future[Any]") -> None:
        self.running -= 1

    def shutdown(self) -> None:
        """Waits for running inferences to finish, then stops the threads."""
        self._pool.shutdown(wait=True)
