"""Running a coroutine at once, and handing it to a task only if it has to wait.

A task per request costs a loop turn before the request starts (the task's first
step is scheduled, not run) and a task object, a weak reference and a done callback.
A lone infer request at low load never waits for anything (its body came with its
head, its run is inline, its response is written at once), so for it that is pure
overhead: about 8 us of a 130 us round trip at concurrency 1 on this project's
benchmark machine. Python 3.12 starts such tasks eagerly itself
(`asyncio.eager_task_factory`); tidegate runs on 3.11, so `run_eagerly` does the
same for the one coroutine that matters: it steps the coroutine until it first
suspends, and only then gives it a task, which carries on as if it had run it from
the start.

While it runs eagerly the coroutine has no task of its own (`asyncio.current_task()`
is None, so `asyncio.timeout` cannot be used in it) and runs in the caller's context.
"""

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


class _Continued(Coroutine[Any, Any, None]):
    """A coroutine that began outside any task and suspended, driven on by a task.

    The task's first step passes up what the coroutine is waiting for (the future it
    yielded, or None for a bare yield), as if the task had run it from the start; every
    later step, and anything the task throws into it (a cancellation), goes to the
    coroutine itself."""

    __slots__ = ("_awaited", "_coro", "_handed")

    def __init__(self, coro: Coroutine[Any, Any, None], awaited: Any) -> None:
        self._coro = coro
        self._awaited = awaited
        self._handed = False

    def send(self, value: Any) -> Any:
        if self._handed:
            return self._coro.send(value)
        self._handed = True
        return self._awaited

    def throw(self, *exc_info: Any) -> Any:
        self._handed = True
        return self._coro.throw(*exc_info)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a continued coroutine is driven by its task, not awaited")


def run_eagerly(
    coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop
) -> "asyncio.Task[None] | None":
    """Runs `coro` now, up to its first suspension: None if it finished, else the task
    that goes on with it. An exception it raises before suspending is raised here."""
    try:
        awaited = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_Continued(coro, awaited))
