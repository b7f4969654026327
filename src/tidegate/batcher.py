"""Dynamic batching: one version's queued requests run together in one session run.

Theory of operation
-------------------
A request's decoded inputs join its version's queue, which is bounded: past
`max_queue_size` waiting requests, new ones get `Overloaded` (503, Retry-After).
The first arrival on an idle queue schedules a dispatch with `loop.call_soon`, so
every request the event loop parses in the same iteration joins the same batch
and none waits for requests that have not arrived (with `max_queue_delay_us` set,
the dispatch waits that long for more rows instead, unless a full batch is
queued sooner). A dispatch takes queued requests in arrival order while their
rows fit in `max_batch_size` and their non-batch dimensions agree, joins their
inputs along axis 0 and runs the model once: on the event loop when the cost
model predicts a run shorter than a thread hand-off, else on the pool, with at
most one batch per pool thread in flight. While batches run, arrivals queue, and
each finished batch dispatches the next: batches grow with the load and shrink
back when it falls.

A request whose run is predicted that short, and which finds nothing queued,
runs at once instead, inline, sparing the two loop turns that queueing costs,
unless requests have lately been arriving together: batching must cost a lone
request nothing, and under load it pays many times over (at concurrency 64 a
tabular model served twice the requests with them joined). Which of the two
holds is learned from the dispatches: every `PROBE_EVERY`-th lone request is
queued anyway, and a dispatch that finds company switches joining on, until
`SINGLES_TO_STOP` dispatches in a row find none. A queue delay always joins.
When nothing runs on the pool either, a lone request may run inline up to
`IDLE_INLINE_FACTOR` times longer: the loop has no other inference to hold up,
and the hand-off would cost the request more than the run. This keeps a version
that gets little traffic (a 10 % canary at concurrency 1) on the loop, though
its runs on cold caches cost it about twice its warm time.

Each request gets views of its own rows of the outputs. If a joined run fails
(one request holds data the graph refuses) or its outputs do not split by row,
its requests run one by one, so only the culprit gets the error. A request may
carry a deadline (the V2 `timeout` parameter, in microseconds); if it is still
queued then, it gets 503 without running. A request of zero rows never queues: its
empty outputs come from the model's metadata (`OnnxModel.empty_outputs`).
"""

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from tidegate.config import BatchingConfig
from tidegate.errors import Overloaded, TidegateError, TimedOut
from tidegate.executor import InferenceExecutor
from tidegate.runtime import OnnxModel
from tidegate.stats import VersionStats

Tensors = dict[str, np.ndarray]
PROBE_EVERY = 16  # while requests run at once, queue one in this many to look for company
SINGLES_TO_STOP = 4  # dispatches in a row that find a request alone: stop joining
IDLE_INLINE_FACTOR = 4  # how much longer a lone run may be inline while the pool is idle


@dataclass(slots=True)  # not frozen: see `codec.InferRequest`
class BatchResult:
    """One request's share of a batch run."""

    outputs: Tensors  # views of this request's rows
    queue_ns: int  # from joining the queue to the start of the run
    run_ns: int  # the batch's session run
    # The batch's whole inputs and outputs, given to one request of the batch, whose
    # handler feeds them to the drift statistics once; None for the others.
    observed: tuple[Tensors, Tensors] | None


@dataclass(slots=True, eq=False)
class _Waiting:
    inputs: Tensors
    rows: int
    future: "asyncio.Future[BatchResult]"
    queued_ns: int
    expiry: asyncio.TimerHandle | None = None

    def shape_key(self) -> tuple[tuple[int, ...], ...]:
        """The non-batch dimensions of every input: only requests with equal keys join."""
        return tuple(array.shape[1:] for array in self.inputs.values())


@dataclass(slots=True, eq=False)
class _Batch:
    members: list[_Waiting]
    rows: int
    results: list[BatchResult | BaseException] = field(default_factory=list)


class _Unsplittable(Exception):
    """A joined run's outputs do not have one row per input row."""


class Batcher:
    """The queue and dispatcher of one model version."""

    def __init__(
        self,
        model: OnnxModel,
        config: BatchingConfig,
        executor: InferenceExecutor,
        stats: VersionStats,
        inline_below_ns: int,
    ) -> None:
        self._model = model
        self._join = config.dynamic and config.max_batch_size > 0 and model.meta.batched
        self._max_rows = config.max_batch_size
        self._delay_s = config.max_queue_delay_us / 1e6
        self._max_queue = config.max_queue_size
        self._executor = executor
        self._stats = stats
        self._inline_below_ns = inline_below_ns
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._dispatch: asyncio.TimerHandle | asyncio.Handle | None = None
        self._running = 0  # batches on pool threads
        self._joining = bool(self._delay_s)
        self._lone = 0  # requests run at once since the last probe
        self._singles = 0  # dispatches in a row that took one request

    @property
    def depth(self) -> int:
        """Requests waiting for a run."""
        return len(self._queue)

    @property
    def joining(self) -> bool:
        """Whether cheap requests wait a loop turn for company (see the module doc)."""
        return self._joining

    async def infer(self, inputs: Tensors, rows: int, timeout_us: int | None) -> BatchResult:
        """Queues a request and returns its outputs once its batch has run.

        Raises:
            Overloaded: the queue is full, or `timeout_us` passed before it ran.
            BadRequest: the model refused this request's data.
        """
        if not rows:  # an empty batch: answered from the metadata, nothing to run or observe
            return BatchResult(self._model.empty_outputs(), 0, 0, None)
        if len(self._queue) >= self._max_queue:
            raise Overloaded(
                f"{len(self._queue)} requests are already waiting for this model version; try again"
            )
        if (
            not self._joining
            and self._dispatch is None
            and not self._queue
            and self._lone < PROBE_EVERY - 1
            and self._model.predicted_ns(rows) < self._inline_budget_ns()
        ):
            # Alone, and a run shorter than a thread hand-off: run it now.
            self._lone += 1
            result = self._run_alone(inputs, rows, time.perf_counter_ns())
            if isinstance(result, BaseException):
                raise result
            return result
        loop = asyncio.get_running_loop()
        waiting = _Waiting(inputs, rows, loop.create_future(), time.perf_counter_ns())
        if timeout_us:
            waiting.expiry = loop.call_later(timeout_us / 1e6, _expire, waiting, timeout_us)
        self._queue.append(waiting)
        self._queued_rows += rows
        self._schedule(loop)
        return await waiting.future

    def _inline_budget_ns(self) -> int:
        """The longest predicted run a lone request may make on the event loop."""
        if self._executor.running:
            return self._inline_below_ns
        return self._inline_below_ns * IDLE_INLINE_FACTOR

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._running >= self._executor.threads or not self._queue:
            return
        if self._delay_s and self._queued_rows < self._max_rows:
            if self._dispatch is None:
                self._dispatch = loop.call_later(self._delay_s, self._run_next, loop)
            return
        if isinstance(self._dispatch, asyncio.TimerHandle):
            self._dispatch.cancel()  # a full batch is queued: no reason to wait longer
        elif self._dispatch is not None:
            return
        self._dispatch = loop.call_soon(self._run_next, loop)

    def _run_next(self, loop: asyncio.AbstractEventLoop) -> None:
        self._dispatch = None
        batch = self._take()
        if batch is not None:
            if self._model.predicted_ns(batch.rows) < self._inline_below_ns:
                self._execute(batch)
                self._deliver(batch)
            else:
                self._running += 1
                future = self._executor.submit(partial(self._execute, batch))
                future.add_done_callback(partial(self._finished, batch, loop))
        self._schedule(loop)  # what did not fit may go to another thread now

    def _take(self) -> _Batch | None:
        """The longest run of queued requests, in arrival order, that may join."""
        members: list[_Waiting] = []
        rows = 0
        key = None
        while self._queue:
            waiting = self._queue[0]
            if not waiting.future.done():  # not expired, its request not cancelled
                if members and not (
                    self._join
                    and rows + waiting.rows <= self._max_rows
                    and waiting.shape_key() == key
                ):
                    break
                if not members:
                    key = waiting.shape_key() if self._join else None
                if waiting.expiry is not None:
                    waiting.expiry.cancel()
                members.append(waiting)
                rows += waiting.rows
            self._queue.popleft()
            self._queued_rows -= waiting.rows
        if not members:
            return None
        self._lone = 0
        if len(members) > 1:
            self._joining, self._singles = True, 0
        elif self._joining and not self._delay_s:
            self._singles += 1
            self._joining = self._singles < SINGLES_TO_STOP
        return _Batch(members, rows)

    def _execute(self, batch: _Batch) -> None:
        """Runs a batch and fills in each member's result (on a pool thread or the loop)."""
        members = batch.members
        if len(members) == 1:
            (member,) = members
            batch.results = [self._run_alone(member.inputs, member.rows, member.queued_ns)]
            return
        started = time.perf_counter_ns()
        try:
            inputs = {
                name: np.concatenate([m.inputs[name] for m in members])
                for name in members[0].inputs
            }
            joined = time.perf_counter_ns()
            outputs = self._model.run(inputs, batch.rows)
            ran = time.perf_counter_ns()
            shares = _split(outputs, [m.rows for m in members], batch.rows)
            split = time.perf_counter_ns()
        except (TidegateError, _Unsplittable):
            batch.results = [self._run_alone(m.inputs, m.rows, m.queued_ns) for m in members]
            return
        except Exception as exc:  # a bug: the handlers answer 500, the queue goes on
            batch.results = [exc] * len(members)
            return
        self._stats.record_execution(batch.rows, joined - started, ran - joined, split - ran)
        observed: tuple[Tensors, Tensors] | None = (inputs, outputs)
        for member, share in zip(members, shares, strict=True):
            batch.results.append(
                BatchResult(share, started - member.queued_ns, ran - joined, observed)
            )
            observed = None

    def _run_alone(self, inputs: Tensors, rows: int, queued_ns: int) -> BatchResult | Exception:
        started = time.perf_counter_ns()
        try:
            outputs = self._model.run(inputs, rows)
        except Exception as exc:  # BadRequest for this request's data, or a bug
            return exc
        run_ns = time.perf_counter_ns() - started
        self._stats.record_execution(rows, 0, run_ns, 0)
        return BatchResult(outputs, started - queued_ns, run_ns, (inputs, outputs))

    def _finished(
        self, batch: _Batch, loop: asyncio.AbstractEventLoop, future: "asyncio.Future[None]"
    ) -> None:
        self._running -= 1
        if future.cancelled():
            batch.results = [Overloaded("the server is shutting down")] * len(batch.members)
        self._deliver(batch)
        self._schedule(loop)

    @staticmethod
    def _deliver(batch: _Batch) -> None:
        for member, result in zip(batch.members, batch.results, strict=True):
            if member.future.done():  # its request was cancelled while the batch ran
                continue
            if isinstance(result, BaseException):
                member.future.set_exception(result)
            else:
                member.future.set_result(result)


def _split(outputs: Tensors, sizes: list[int], rows: int) -> list[Tensors]:
    """Each request's rows of the outputs, as views."""
    if any(array.shape[:1] != (rows,) for array in outputs.values()):
        raise _Unsplittable
    shares = []
    start = 0
    for size in sizes:
        end = start + size
        shares.append({name: array[start:end] for name, array in outputs.items()})
        start = end
    return shares


def _expire(waiting: _Waiting, timeout_us: int) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(
            TimedOut(f"the request waited its timeout of {timeout_us} us without running")
        )
