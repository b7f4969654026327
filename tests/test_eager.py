"""Coroutines run at once and handed to a task only when they wait (`tidegate.eager`),
on asyncio's own loop and on uvloop (the server's): one that never waits finishes
before `run_eagerly` returns; one that waits goes on in its task with what it awaited,
through bare yields, errors and cancellations, as if the task had run it from the
start."""

import asyncio
from collections.abc import Callable, Iterator

import pytest
import uvloop

from tidegate.eager import run_eagerly

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    opened = LOOPS[request.param]()
    yield opened
    opened.close()


def test_a_coroutine_that_never_waits_finishes_without_a_task(loop):
    steps: list[str] = []

    async def alone() -> None:
        steps.append("ran")

    async def main() -> None:
        assert run_eagerly(alone(), loop) is None
        assert steps == ["ran"]  # before anything else ran on the loop
        assert asyncio.all_tasks() == {asyncio.current_task()}

    loop.run_until_complete(main())


def test_a_coroutine_that_waits_goes_on_in_a_task_with_the_result(loop):
    steps: list[object] = []

    async def waiting(future: "asyncio.Future[int]") -> None:
        steps.append("before")
        steps.append(await future)
        await asyncio.sleep(0)  # a bare yield after resuming
        steps.append(await asyncio.sleep(0.001, "slept"))

    async def main() -> None:
        future = loop.create_future()
        task = run_eagerly(waiting(future), loop)
        assert task is not None
        assert steps == ["before"]  # it ran up to the await at once
        future.set_result(7)
        await task
        assert steps == ["before", 7, "slept"]

    loop.run_until_complete(main())


def test_a_first_wait_that_is_a_bare_yield_is_resumed(loop):
    steps: list[str] = []

    async def yielding() -> None:
        await asyncio.sleep(0)
        steps.append("resumed")

    async def main() -> None:
        task = run_eagerly(yielding(), loop)
        assert task is not None
        assert steps == []
        await task
        assert steps == ["resumed"]

    loop.run_until_complete(main())


def test_an_error_after_the_wait_is_the_tasks(loop):
    async def failing(future: "asyncio.Future[None]") -> None:
        await future
        raise ValueError("after the wait")

    async def main() -> None:
        future = loop.create_future()
        task = run_eagerly(failing(future), loop)
        assert task is not None
        future.set_result(None)
        with pytest.raises(ValueError, match="after the wait"):
            await task

    loop.run_until_complete(main())


def test_an_error_before_any_wait_is_raised_at_once(loop):
    async def failing() -> None:
        raise KeyError("at once")

    async def main() -> None:
        with pytest.raises(KeyError, match="at once"):
            run_eagerly(failing(), loop)

    loop.run_until_complete(main())


@pytest.mark.parametrize("when", ["before its first step", "while it waits"])
def test_a_cancelled_task_cancels_the_coroutine_where_it_waits(loop, when: str):
    seen: list[str] = []

    async def waiting(future: "asyncio.Future[None]") -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    async def main() -> None:
        future = loop.create_future()
        task = run_eagerly(waiting(future), loop)
        assert task is not None
        if when == "while it waits":
            await asyncio.sleep(0)  # the task's first step: it now waits on the future
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled", "cleaned up"]

    loop.run_until_complete(main())
