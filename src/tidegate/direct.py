"""Infer requests answered by the HTTP connection itself, without an ASGI cycle.

uvicorn hands every request to the application through an ASGI cycle: a scope, a
`RequestResponseCycle`, `receive` and `send` with a message dict each, and checks of
every response header against two regular expressions. For `POST .../infer`, the
request served most and the one whose latency counts, that machinery is a large part
of the server's work: on this project's benchmark machine a bare uvicorn app answering
a fixed response used 62 us of server CPU per request, a bare httptools protocol 28.

`connection.HttpProtocol` gives such a request a `DirectCycle` instead, and
`DirectInfer` answers it: the access check (the inference role) and then
`InferRouter.answer`, the same answer as on the ASGI path (request log, statistics,
drift), reading the body straight from the cycle and writing the whole response in
one write. No messages; and a request that arrives alone, its body with it, is
answered at once, within the read, without a task of its own (see `eager`).

A `DirectCycle` stands where uvicorn's `RequestResponseCycle` would and has the
attributes uvicorn's protocol uses (`body`, `more_body`, `message_event`,
`response_complete`, `disconnected`, `keep_alive`, `run_asgi`), so uvicorn's own
connection handling still applies to it: pipelined requests wait their turn, reading
pauses while a large body waits to be read, a graceful shutdown closes the connection
once the response is out, a lost connection wakes a reader waiting for the body.
"""

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl

from tidegate.access import bearer, denial, required_role
from tidegate.auth import AuthFile
from tidegate.errors import TidegateError
from tidegate.infer import ClientGone, Headers, InferRouter, body_too_large

log = logging.getLogger("tidegate.direct")

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_HEADER_LINE = b"%s: %s\r\n".__mod__  # a (name, value) pair as its header line


def response_bytes(status: int, headers: Headers, body: bytes, close: bool) -> bytes:
    """A whole HTTP/1.1 response, head and body, sized by content-length."""
    return b"".join(
        (
            _STATUS_LINES[status],
            *map(_HEADER_LINE, headers),
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


def _nothing() -> None:
    pass


class _Unwatched:
    """The `message_event` of a cycle whose body nobody waits for: uvicorn's protocol
    signals every body part, the message's end and a lost connection through it, and
    a request whose body comes with its head (nearly all) is never waited for. Until
    `DirectCycle.read` must wait, those signals cost a call that does nothing instead
    of an `asyncio.Event` per request and its `set`s."""

    __slots__ = ()

    def set(self) -> None:
        pass


_UNWATCHED = _Unwatched()


class DirectCycle:
    """One infer request on a connection, answered without an ASGI cycle."""

    __slots__ = (
        "answer",
        "body",
        "default_headers",
        "disconnected",
        "flow",
        "headers",
        "keep_alive",
        "message_event",
        "more_body",
        "on_response",
        "path",
        "response_complete",
        "target",
        "transport",
    )

    def __init__(
        self,
        answer: "DirectInfer",
        path: str,
        target: tuple[str, str | None],
        headers: Headers,
        transport: asyncio.Transport,
        flow: FlowControl,
        default_headers: Headers,
        keep_alive: bool,
        on_response: Callable[[], None],
    ) -> None:
        self.answer = answer
        self.path = path
        self.target = target  # (model, version or None)
        self.headers = headers
        self.transport = transport
        self.flow = flow
        self.default_headers = default_headers
        self.keep_alive = keep_alive
        self.on_response = on_response
        # Written by the protocol's parser callbacks, as in uvicorn's cycle.
        self.body = bytearray()
        self.more_body = True
        self.message_event: asyncio.Event | _Unwatched = _UNWATCHED
        self.response_complete = False
        self.disconnected = False

    async def run_asgi(self, app: Any) -> None:
        """Answers the request. The name and signature are uvicorn's, which starts every
        cycle, pipelined ones too, through them; `app` is not needed here."""
        try:
            await self.answer(self)
        except BaseException as exc:  # as uvicorn's cycle: log it, drop the connection
            log.error("error answering POST %s", self.path, exc_info=exc)
            if not self.response_complete:
                self.transport.close()
        finally:
            self.on_response = _nothing  # the protocol may have moved on to another cycle

    async def read(self, limit: int) -> bytes:
        """The body as it came; 413 once it is over `limit` bytes."""
        while self.more_body and not self.disconnected:
            if len(self.body) > limit:
                raise body_too_large(limit)
            self.flow.resume_reading()  # the protocol pauses reading past 64 KiB unread
            arrived = self.message_event = asyncio.Event()
            await arrived.wait()
        if self.disconnected:
            raise ClientGone
        if len(self.body) > limit:
            raise body_too_large(limit)
        return bytes(self.body)

    async def write(self, status: int, headers: Headers, body: bytes) -> None:
        """Writes the whole response at once and hands the connection back."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        close = not self.keep_alive
        self.transport.write(response_bytes(status, [*self.default_headers, *headers], body, close))
        self.response_complete = True
        self.message_event.set()
        if close:
            self.transport.close()
        self.on_response()


class DirectInfer:
    """Answers a `DirectCycle`: the access check, then `InferRouter.answer`."""

    def __init__(self, router: InferRouter, auth: AuthFile | None) -> None:
        self.router = router
        self.auth = auth

    @property
    def idle(self) -> bool:
        """Whether no infer request is being answered: one arriving now is alone, and
        most likely runs without waiting for anything (see `run_eagerly`)."""
        return not self.router.in_flight

    async def __call__(self, cycle: DirectCycle) -> None:
        if self.auth is not None:
            role = required_role("POST", cycle.path)
            try:
                self.auth.authorize(bearer(cycle.headers), role, f"POST {cycle.path}")
            except TidegateError as exc:
                await cycle.write(*denial(exc))
                return
        await self.router.answer(
            "POST", cycle.path, cycle.target, cycle.headers, cycle.read, cycle.write
        )
