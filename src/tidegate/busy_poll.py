"""Spin, then block: the event loop keeps polling for a moment after a response.

A client that sends its next request as soon as it has the answer (one caller in a
loop, a pipeline stage, a benchmark at concurrency 1) finds the server's event loop
asleep in `epoll_wait`. On a virtual machine an idle vCPU halts, and the wake-up its
request then needs (an interrupt, a VM exit and entry, caches gone cold while
halted) was 30-45 us of a 220-270 us round trip on this project's benchmark machine.
Polling for a short window after each response instead of blocking keeps the vCPU
awake for the request that is about to come, as onnxruntime's own thread pools spin
before they sleep, and as Linux's `SO_BUSY_POLL` does for sockets.

What it costs is bounded: at most `window` of one core after a response, and only
when it is likely to pay. A loop spins only after a response whose request came
within `window` of the response before it (a client that comes straight back); a
request after a longer pause turns it off until one comes quickly again. So a server
at low or bursty load, or idle, does not spin; under load the loop is busy anyway.
While it spins the loop yields its CPU at every turn (`sched_yield`): a client or an
inference thread on the same CPU runs as soon as it is ready.

One `BusyPoll` serves every connection of a process's event loop (HTTP and gRPC):
the window runs from the last response of any of them.
"""

import asyncio
import os
import time


class BusyPoll:
    """Keeps an event loop from blocking for `window_s` seconds after a response."""

    __slots__ = ("_answered_at", "_spinning", "_until", "_worth_it", "window_s")

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("a busy-poll window must be positive")
        self.window_s = window_s
        self._answered_at = float("-inf")  # when the last response left
        self._worth_it = False  # whether the last request came within the window
        self._until = 0.0  # when the current spin ends
        self._spinning = False

    def request_arrived(self) -> None:
        """A request began on a connection that was idle: it decides whether the next
        response is followed by a spin."""
        self._worth_it = time.perf_counter() - self._answered_at < self.window_s

    def answered(self, loop: asyncio.AbstractEventLoop) -> None:
        """A response has left: spin for the window if the last request came quickly."""
        now = self._answered_at = time.perf_counter()
        if not self._worth_it:
            return
        self._until = now + self.window_s
        if not self._spinning:
            self._spinning = True
            loop.call_soon(self._spin, loop)

    def _spin(self, loop: asyncio.AbstractEventLoop) -> None:
        # A callback ready to run makes the loop poll with a zero timeout instead of
        # blocking; rescheduling itself keeps it so until the window ends.
        if time.perf_counter() < self._until:
            os.sched_yield()
            loop.call_soon(self._spin, loop)
        else:
            self._spinning = False
