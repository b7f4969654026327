"""The load generator behind `tidegate bench`: pre-encoded V2 requests over kept-alive
HTTP/1.1 connections, in a closed or an open loop, timed honestly. The loops take any
`Sender`: tidegate.loadgen_grpc runs them over gRPC channels.

Theory of operation
-------------------
A closed loop runs C workers, each with its own connection, each sending its next
request as soon as the previous answer arrives: it measures service time, and a
stalled server simply receives fewer requests, so its latency numbers exclude the
waiting that real clients would have seen (coordinated omission). The report says so.

An open loop sends at a fixed rate whatever the server does: arrival times are
laid out in advance (evenly, or with exponential gaps for Poisson arrivals), and
each request's latency is measured from its scheduled time, so time spent waiting
for a free connection or for a stalled server counts. Connections are opened on
demand up to `max_connections`; beyond that, requests wait for one (and the wait
counts). Every loop is bounded by the duration, an optional request count, and a
per-request timeout.

The client watches itself: the CPU it used (as a share of one core) and how late
its event loop wakes up (the scheduling lag of a 1 ms ticker), so that a run
where the client was the bottleneck says so instead of under-driving the server
silently.
"""

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, cast
from urllib.parse import urlsplit

from tidegate.histogram import LatencyHistogram
from tidegate.workload import PreparedRequest

_TICK_S = 0.001  # period of the lag ticker
_TIMER_SLACK_NS = 1_000_000  # how late an event-loop timer may fire (libuv: 1 ms)
OK = "ok"  # the outcome of a successful request; any other outcome is an error's kind


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client can read."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: host, port and the infer path of one model (version); or,
    with `grpc`, the host and port of a V2 gRPC server."""

    host: str
    port: int
    base_path: str  # "" or a prefix such as "/proxy"
    grpc: bool = False

    @classmethod
    def parse(cls, url: str, grpc: bool = False) -> "Target":
        """`http://host:port[/prefix]`, or `host:port`; for gRPC `[grpc://]host:port`."""
        scheme = "grpc" if grpc else "http"
        parts = urlsplit(url if "://" in url else f"{scheme}://{url}")
        if parts.scheme != scheme or not parts.hostname or (grpc and parts.path.strip("/")):
            raise ValueError(f"{url!r} is not an {scheme}://host:port address")
        port = parts.port or (8001 if grpc else 80)
        return cls(parts.hostname, port, parts.path.rstrip("/"), grpc)

    @property
    def address(self) -> str:
        """`host:port`, as gRPC takes it (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def infer_path(self, model: str, version: str | None) -> str:
        version_part = f"/versions/{version}" if version else ""
        return f"{self.base_path}/v2/models/{model}{version_part}/infer"


def request_bytes(target: Target, path: str, request: PreparedRequest) -> bytes:
    """One whole HTTP/1.1 POST, head and body, ready to write."""
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        f"Content-Type: {request.content_type}",
        f"Content-Length: {len(request.body)}",
    ]
    if request.header_length is not None:
        head.append(f"Inference-Header-Content-Length: {request.header_length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + request.body


class Sender(Protocol):
    """What the loops send requests on: an HTTP/1.1 `Connection`, or a gRPC channel."""

    async def exchange(self, data: bytes) -> str:
        """Sends one request; returns OK, or the kind of error the server answered.
        Raises OSError (or ProtocolError) when the sender is broken."""
        ...

    def close(self) -> None: ...


Opener = Callable[[], Awaitable[Sender]]


class Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: sends a request, reads its answer's status.

    A protocol object rather than a stream reader: answers are framed right in
    `data_received`, with a few bytes.find calls, and the body is skipped, not
    copied. That halves the client's CPU per request, CPU it would otherwise take
    from the server it measures when both share a machine."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # One per request written and not yet answered, in order (HTTP/1.1 pipelining).
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._lost: BaseException | None = None

    @classmethod
    async def open(cls, target: Target) -> "Connection":
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, target.host, target.port)
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports do not subclass asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the server closed the connection")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._lost)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._waiters:
            try:
                status = self._answer()
            except ProtocolError as exc:
                self._lost = exc
                self.close()  # framing is lost: every waiter fails with the connection
                return
            if status is None:
                return
            waiter = self._waiters.popleft()
            if not waiter.done():  # a timed-out request's answer is read and dropped
                waiter.set_result(status)

    def _answer(self) -> int | None:
        """The status of a complete answer at the buffer's start (then dropped), else None."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        if not buffer.startswith(b"HTTP/1.") or bytes(buffer[12:13]) not in (b" ", b"\r"):
            raise ProtocolError(f"not an HTTP/1.x status line: {bytes(buffer[:40])!r}")
        head = bytes(buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise ProtocolError("the answer has no Content-Length (chunked is not read)")
        stop = head.find(b"\r\n", at + 17)
        total = end + 4 + int(head[at + 17 : stop if stop > 0 else None])
        if len(buffer) < total:
            return None
        status = int(buffer[9:12])
        del buffer[:total]
        return status

    async def exchange(self, data: bytes) -> str:
        """Writes one request; returns OK (200) or `http STATUS` once the answer has fully
        arrived. Several may be outstanding at once: answers come back in order."""
        if self._lost is not None or self._transport is None:
            raise ConnectionResetError("the connection is closed")
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._transport.write(data)
        status = await waiter
        return OK if status == 200 else f"http {status}"

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


@dataclass(slots=True)
class Tally:
    """What one load level observed (mergeable across client processes)."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    ok: int = 0
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def sent(self) -> int:
        return self.ok + sum(self.errors.values())

    def merge(self, other: "Tally") -> None:
        self.latency.merge(other.latency)
        self.ok += other.ok
        self.rows += other.rows
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count


@dataclass(slots=True)
class ClientLoad:
    """How busy the client itself was: CPU share of one core, its event loop's lag,
    and (open loop) how late requests left against their schedule."""

    cpu: float
    lag: LatencyHistogram
    late: LatencyHistogram


@dataclass(frozen=True, slots=True)
class Plan:
    """One load level: closed loop at `concurrency`, or open loop at `rate` per second."""

    concurrency: int | None = None
    rate: float | None = None
    poisson: bool = False
    duration: float = 10.0
    warmup: float = 0.0
    max_requests: int | None = None
    timeout: float = 30.0
    max_connections: int = 1024
    pipeline: int = 1  # closed loop: requests in flight per connection (HTTP/1.1 pipelining)
    seed: int = 0

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"

    @property
    def level(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.rate or 0)


@dataclass(slots=True)
class LevelResult:
    plan: Plan
    seconds: float  # measured time (after the warm-up)
    tally: Tally
    client: ClientLoad


class _Pool:
    """Idle connections, opened on demand up to a bound; waiting for one is part of
    a request's latency in the open loop."""

    def __init__(self, opener: Opener, limit: int) -> None:
        self._opener = opener
        self._idle: list[Sender] = []
        self._opened = 0
        self._slots = asyncio.Semaphore(limit)

    async def acquire(self) -> Sender:
        await self._slots.acquire()
        if self._idle:
            return self._idle.pop()
        try:
            connection = await self._opener()
        except BaseException:
            self._slots.release()
            raise
        self._opened += 1
        return connection

    def release(self, connection: Sender | None) -> None:
        """Returns a healthy connection; None for one that was closed after a failure."""
        if connection is not None:
            self._idle.append(connection)
        self._slots.release()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


async def _one(
    pool: _Pool, data: bytes, rows: int, started_ns: int, limit_s: float, tally: Tally | None
) -> None:
    """Sends one request on a pooled connection and records it (None: warming up)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    try:
        async with asyncio.timeout_at(deadline):
            connection = await pool.acquire()
    except TimeoutError:
        _count(tally, "timeout")
        return
    except OSError:
        _count(tally, "connection")
        return
    outcome = ""
    try:
        async with asyncio.timeout_at(deadline):
            outcome = await connection.exchange(data)
    except TimeoutError:
        _count(tally, "timeout")
    except _BROKEN:
        _count(tally, "connection")
    finally:
        if outcome:
            pool.release(connection)
        else:  # its state is unknown: never reuse it
            connection.close()
            pool.release(None)
    if outcome:
        _record(tally, outcome, rows, time.perf_counter_ns() - started_ns)


_BROKEN = (OSError, ProtocolError)


def _count(tally: Tally | None, kind: str) -> None:
    if tally is not None:
        tally.error(kind)


def _record(tally: Tally | None, outcome: str, rows: int, latency_ns: int) -> None:
    if tally is None:
        return
    if outcome == OK:
        tally.ok += 1
        tally.rows += rows
        tally.latency.record(latency_ns)
    else:
        tally.error(outcome)


class _Budget:
    """The requests a level may still send (unbounded without `max_requests`)."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


class _Shared:
    """The connection a group of closed-loop workers pipelines its requests on."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._connection: Sender | None = None
        self._opening = asyncio.Lock()

    async def get(self) -> Sender:
        async with self._opening:
            if self._connection is None:
                self._connection = await self._opener()
            return self._connection

    def discard(self, connection: Sender) -> None:
        """Closes a connection whose state is unknown (its other requests fail too)."""
        connection.close()
        if self._connection is connection:
            self._connection = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


async def _closed_worker(
    shared: _Shared,
    requests: list[tuple[bytes, int]],
    offset: int,
    plan: Plan,
    measure_from: float,
    stop_at: float,
    budget: _Budget,
    tally: Tally,
) -> None:
    """Sends request after request, each when the previous answer is in, until the
    level ends; `plan.pipeline` workers share one connection."""
    loop = asyncio.get_running_loop()
    index = offset
    while loop.time() < stop_at and budget.take():
        data, rows = requests[index % len(requests)]
        index += 1
        counted = tally if loop.time() >= measure_from else None
        try:
            connection = await shared.get()
        except OSError:
            _count(counted, "connection")
            await asyncio.sleep(0.01)  # a refusing server must not spin the client
            continue
        started = time.perf_counter_ns()
        outcome = ""
        try:
            async with asyncio.timeout(plan.timeout):
                outcome = await connection.exchange(data)
        except TimeoutError:
            _count(counted, "timeout")
        except _BROKEN:
            _count(counted, "connection")
        if not outcome:
            shared.discard(connection)
            continue
        _record(counted, outcome, rows, time.perf_counter_ns() - started)


async def _closed(
    opener: Opener, requests: list[tuple[bytes, int]], plan: Plan, tally: Tally
) -> None:
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + plan.warmup
    stop_at = measure_from + plan.duration
    budget = _Budget(plan.max_requests)
    assert plan.concurrency is not None
    groups = [_Shared(opener) for _ in range(-(-plan.concurrency // plan.pipeline))]
    try:
        await asyncio.gather(
            *(
                _closed_worker(
                    groups[i // plan.pipeline],
                    requests,
                    i,
                    plan,
                    measure_from,
                    stop_at,
                    budget,
                    tally,
                )
                for i in range(plan.concurrency)
            )
        )
    finally:
        for group in groups:
            group.close()


async def _open(
    opener: Opener,
    requests: list[tuple[bytes, int]],
    plan: Plan,
    tally: Tally,
    late: LatencyHistogram,
) -> None:
    """Sends at the plan's rate; each latency counts from the request's scheduled time."""
    assert plan.rate is not None
    pool = _Pool(opener, plan.max_connections)
    rng = random.Random(plan.seed)
    budget = _Budget(plan.max_requests)
    running: set[asyncio.Task[None]] = set()
    begin = time.perf_counter_ns()
    end_s = plan.warmup + plan.duration
    offset_s = 0.0
    index = 0
    try:
        while offset_s < end_s and budget.take():
            scheduled = begin + int(offset_s * 1e9)
            wait_ns = scheduled - time.perf_counter_ns()
            if wait_ns > _TIMER_SLACK_NS:
                # The loop's timers fire up to a millisecond late: wake that much early
                # and send a little before the schedule rather than after it.
                await asyncio.sleep((wait_ns - _TIMER_SLACK_NS) / 1e9)
            now = time.perf_counter_ns()
            warm = offset_s < plan.warmup
            if not warm:
                late.record(max(0, now - scheduled))
            data, rows = requests[index % len(requests)]
            index += 1
            # From the schedule, or from the send when it left early.
            task = asyncio.create_task(
                _one(pool, data, rows, min(scheduled, now), plan.timeout, None if warm else tally)
            )
            running.add(task)
            task.add_done_callback(running.discard)
            offset_s += rng.expovariate(plan.rate) if plan.poisson else 1.0 / plan.rate
        if running:
            await asyncio.gather(*running)
    finally:
        pool.close()


async def _tick(lag: LatencyHistogram, stop: asyncio.Event) -> None:
    """Records how late a 1 ms sleep wakes up: the client's own scheduling lag."""
    while not stop.is_set():
        before = time.perf_counter_ns()
        await asyncio.sleep(_TICK_S)
        lag.record(max(0, time.perf_counter_ns() - before - int(_TICK_S * 1e9)))


async def run_level(
    target: Target,
    path: str,
    prepared: list[PreparedRequest],
    plan: Plan,
    tally: Tally | None = None,
) -> LevelResult:
    """Runs one load level against `path` and returns what it saw (counted into `tally`,
    when given, as it goes: a progress display may read it meanwhile)."""
    requests = [(request_bytes(target, path, r), r.rows) for r in prepared]
    return await run_requests(partial(Connection.open, target), requests, plan, tally)


async def run_requests(
    opener: Opener,
    requests: list[tuple[bytes, int]],
    plan: Plan,
    tally: Tally | None = None,
) -> LevelResult:
    """Runs one load level of `requests` (data to send and the rows it carries) on the
    senders `opener` makes, as `run_level` does."""
    if not requests:
        raise ValueError("no requests to send")
    tally = Tally() if tally is None else tally
    lag = LatencyHistogram()
    late = LatencyHistogram()
    stop = asyncio.Event()
    ticker = asyncio.create_task(_tick(lag, stop))
    cpu_before = time.process_time()
    started = time.perf_counter()
    try:
        if plan.mode == "closed":
            await _closed(opener, requests, plan, tally)
        else:
            await _open(opener, requests, plan, tally, late)
    finally:
        stop.set()
        await ticker
    wall = time.perf_counter() - started
    # From the end of the warm-up to the last answer: in-flight requests count.
    seconds = max(wall - plan.warmup, 1e-9)
    client = ClientLoad(cpu=(time.process_time() - cpu_before) / wall, lag=lag, late=late)
    return LevelResult(plan, seconds, tally, client)
