"""The HTTP/1.1 connection: uvicorn's httptools protocol, with V2 errors and a bounded
request head.

uvicorn answers a request that httptools cannot parse with a plain-text 400 of its
own ("Invalid HTTP request received."), and llhttp bounds neither the request line nor
the headers: a client could make the server hold megabytes of them. `HttpProtocol`
answers in the V2 error format instead, `{"error": ...}` naming what is wrong, and
closes the connection, as uvicorn does:

- malformed HTTP (an unknown method, a bad version, a bad character in the target or
  a header, Content-Length with Transfer-Encoding, ...): 400 with llhttp's reason;
- a request target longer than `max_header_bytes`: 414;
- a head (target and header lines) over `max_header_bytes`, or more than
  `max_headers` header fields: 431.

The limits cost a request within them almost nothing: a few attribute writes per
read and one comparison of its field count. A head that arrives within one read no
larger than the byte limit cannot be over it; only a head that spans reads, or came in
a larger read, has its bytes summed, in `on_headers_complete`, where uvicorn has the
target and the fields in hand.

While a head is still arriving, llhttp and uvicorn hold its bytes (a header line that
never ends reaches uvicorn only when it does), so `data_received` also counts the
bytes of every read that falls wholly inside a head and refuses the head once they pass
twice the limit: memory stays bounded without a check per header (twice, since those
bytes also hold the method, separators and line ends that the exact count leaves out).

One write per response. uvicorn writes a response's status line and headers as soon
as the application sends `http.response.start`, and its body when it sends
`http.response.body`: two `send()` system calls and, with TCP_NODELAY, two segments.
On loopback the first of them also runs the receiver's network stack and wake-up, and
the pair was the largest single cost of a request at concurrency 1 (about 40 % of the
event loop's busy samples in py-spy). `_OneWriteTransport` sits between uvicorn's
request cycle and the real transport: it holds back a response head that announces a
`content-length` (the whole body is known, so it follows at once) and writes it with
the next write, the body. Anything else goes straight through: a chunked head (a
streamed body may take its time), `100 Continue`, and every write while nothing is
held. What is held is flushed when the response completes without a body write (HEAD)
and before the transport closes, so no byte is lost or reordered.
"""

import asyncio
import logging
import urllib.parse
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tidegate.busy_poll import BusyPoll
from tidegate.direct import DirectCycle, DirectInfer, response_bytes
from tidegate.eager import run_eagerly
from tidegate.errors import BadRequest, HeadersTooLarge, TidegateError, UriTooLong
from tidegate.infer import error_parts, infer_target

log = logging.getLogger("tidegate.connection")

_HEAD_PREFIX = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "
_SIZED = b"\r\ncontent-length: "


class _OneWriteTransport:
    """The connection's transport, joining a sized response head to its body."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif (
            data.startswith(_HEAD_PREFIX)
            and not data.startswith(_CONTINUE)
            and data.endswith(b"\r\n\r\n")
            and _SIZED in data
        ):
            self._held = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # Everything else (get_extra_info, pause_reading, set_protocol, ...) as is.
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the V2 error format, bounded request heads and
    infer requests answered without an ASGI cycle (see `direct`). Written against
    uvicorn 0.55's `HttpToolsProtocol`; `protocol_class` sets the limits and the
    answerer of infer requests (None: every request takes the ASGI cycle).
    """

    max_header_bytes: ClassVar[int]
    max_headers: ClassVar[int]
    direct_infer: ClassVar[DirectInfer | None]
    busy_poll: ClassVar[BusyPoll | None]

    # The size of the read being parsed; per request: whether its head is still being
    # read, whether it is known to fit (it began in a read no larger than the limit and
    # no later read added to it), and the bytes of reads that fell wholly inside it.
    _read_size = 0
    _in_head = False
    _fits = True
    _head_reads = 0
    _ready: DirectCycle | None = None  # a direct cycle to start once the read is parsed
    # When the last response left, while no request is arriving; the keep-alive timer.
    _idle_since: float | None = None
    _idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport  # a direct cycle writes whole responses: no joining
        super().connection_made(_OneWriteTransport(transport))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        """uvicorn's, but for its keep-alive timeout (see `_keep_alive_check`)."""
        transport = self.transport
        if isinstance(transport, _OneWriteTransport):
            transport.flush()  # a HEAD response, or a body-less one, wrote no body
        self.server_state.total_requests += 1
        if self._raw_transport.is_closing():  # the socket's own (uvloop's, in C)
            return
        if self.flow.read_paused:  # rarely: the only call uvicorn's resume_reading makes
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.busy_poll is not None:
            self.busy_poll.answered(self.loop)
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_check)

    def _keep_alive_check(self) -> None:
        """Closes the connection once it has been idle `timeout_keep_alive` seconds since
        its last response, as uvicorn does; else looks again when it could be.

        uvicorn arms a timer after every response and cancels it when the next request
        arrives; at concurrency 1 that pair cost 8 us of a 117 us round trip on this
        project's benchmark machine. Here a request arriving only clears `_idle_since`,
        and one timer per idle stretch does the rest."""
        self._idle_timer = None
        if self._idle_since is None:
            return  # a request is arriving or being answered: its response re-arms
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._keep_alive_check)
        else:
            self.timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def data_received(self, data: bytes) -> None:
        if self._idle_since is not None:  # no longer idle (see `_keep_alive_check`)
            self._idle_since = None
            if self.busy_poll is not None:
                self.busy_poll.request_arrived()
        self._read_size = len(data)
        in_head = self._in_head
        if in_head:
            self._fits = False  # a head that spans reads gets counted
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn: tidegate serves no WebSocket
            self._start_ready(eager=False)
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            self._start_ready(eager=False)
            self._refuse(_refusal(exc))
            return
        self._start_ready(eager=True)
        if in_head and self._in_head:  # the whole read is part of one head
            self._head_reads += len(data)
            if self._head_reads > 2 * self.max_header_bytes:
                self._refuse(self._head_error() or self._headers_too_large(""))

    def on_message_begin(self) -> None:
        # uvicorn's, less the ASGI scope, which only a request taking the ASGI cycle
        # needs: built in `on_headers_complete` once the request is known to take it.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._in_head = True
        self._fits = self._read_size <= self.max_header_bytes
        self._head_reads = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        if not self._fits or len(self.headers) > self.max_headers:
            error = self._head_error()
            if error is not None:
                raise error
        cycle = self._direct_cycle()
        if cycle is None:
            self._build_scope()
            super().on_headers_complete()
            return
        # As uvicorn starts its own cycles: at once, or after the pipelined one before.
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._ready = cycle  # started once the read is parsed, its body most likely in it
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))  # type: ignore[arg-type]

    def _build_scope(self) -> None:
        """The ASGI scope uvicorn's `on_message_begin` builds, for the request whose
        head is complete (its URL and headers kept)."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    def _start_ready(self, eager: bool) -> None:
        """Starts the direct cycle whose head this read completed, if any: at once when
        its whole body came too and no other infer request is being answered
        (`run_eagerly`), else as a task, as uvicorn would. Under load requests wait
        for their batch anyway, and a task driving a coroutine that began outside it
        costs each of them more than the loop turn it would save."""
        cycle = self._ready
        if cycle is None:
            return
        self._ready = None
        if not (eager and cycle.answer.idle) or cycle.more_body or self.config.reset_contextvars:
            self._start_asgi_task(cycle, self.app)  # type: ignore[arg-type]
            return
        task = run_eagerly(cycle.run_asgi(self.app), self.loop)
        if task is not None:
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    def _direct_cycle(self) -> DirectCycle | None:
        """A `DirectCycle` for a POST to an infer endpoint; None for what takes uvicorn's
        ASGI cycle: every other request, and one that asks for `100 Continue` or an
        upgrade (rare, and uvicorn's cycle knows how to answer them)."""
        answer = self.direct_infer
        parser = self.parser
        if (
            answer is None
            or self.expect_100_continue
            or parser.get_method() != b"POST"
            or parser.should_upgrade()
        ):
            return None
        path, target = infer_path(self.url)
        if target is None:
            return None
        return DirectCycle(
            answer,
            path,
            target,
            self.headers,
            self._raw_transport,
            self.flow,
            self.server_state.default_headers,
            parser.get_http_version() != "1.0" and parser.should_keep_alive(),
            self.on_response_complete,
        )

    def _head_error(self) -> TidegateError | None:
        """The 414 or 431 for the head read so far, if it is over the limits."""
        if len(self.headers) > self.max_headers:
            return HeadersTooLarge(
                f"more than {self.max_headers} request header fields (--max-headers)"
            )
        size = len(self.url)
        if size > self.max_header_bytes:
            return UriTooLong(
                f"the request target is longer than the limit of {self.max_header_bytes} "
                "bytes for a request's head (--max-header-size)"
            )
        for name, value in self.headers:
            size += len(name) + len(value) + 4  # ": " and the line end
            if size > self.max_header_bytes:
                return self._headers_too_large(f", at header '{_shown(name)}'")
        return None

    def _headers_too_large(self, where: str) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"request headers are larger than the limit of {self.max_header_bytes} bytes "
            f"(--max-header-size){where}"
        )

    def _refuse(self, error: TidegateError) -> None:
        """Answers `error` in the V2 format and closes the connection; written at once,
        as uvicorn writes its own 400, since no request cycle exists to answer it."""
        log.info("refused a request: %d %s", error.status, error.message)
        status, headers, body = error_parts(error)
        headers = [*self.server_state.default_headers, *headers]
        self.transport.write(response_bytes(status, headers, body, close=True))
        self.transport.close()


# The request targets seen last, and their infer paths: a client sends the same few
# again and again, and parsing one costs more than looking it up.
_KNOWN_TARGETS = 256
_infer_targets: dict[bytes, tuple[str, tuple[str, str | None] | None]] = {}


def infer_path(url: bytes) -> tuple[str, tuple[str, str | None] | None]:
    """A request target's decoded path, and (model, version) if it is an infer path;
    remembered for the last `_KNOWN_TARGETS` targets."""
    known = _infer_targets.get(url)
    if known is None:
        path = httptools.parse_url(url).path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        if len(_infer_targets) >= _KNOWN_TARGETS:
            _infer_targets.clear()
        known = _infer_targets[url] = (path, infer_target(path))
    return known


def _refusal(exc: httptools.HttpParserError) -> TidegateError:
    """The error to answer for a request httptools refused, or one of the callbacks
    did (httptools raises a callback's exception as the context of its own)."""
    cause = exc.__context__
    if isinstance(cause, TidegateError):
        return cause
    if cause is None or isinstance(cause, httptools.HttpParserError):
        return BadRequest(f"malformed HTTP request: {cause or exc}")
    log.error("unexpected error parsing a request", exc_info=cause)  # a bug, not bad input
    return TidegateError(f"internal error: {type(cause).__name__}: {cause}")


def _shown(name: bytes) -> str:
    return name[:64].decode("latin-1") + ("..." if len(name) > 64 else "")


def protocol_class(
    max_header_bytes: int,
    max_headers: int,
    direct_infer: DirectInfer | None,
    busy_poll: BusyPoll | None,
) -> type[HttpProtocol]:
    """`HttpProtocol` with the server's limits, answerer of infer requests and busy
    polling (None: off), for uvicorn's `http` option (which builds the protocol itself,
    so they travel as class attributes)."""

    class ServerHttpProtocol(HttpProtocol):
        pass

    ServerHttpProtocol.max_header_bytes = max_header_bytes
    ServerHttpProtocol.max_headers = max_headers
    ServerHttpProtocol.direct_infer = direct_infer
    ServerHttpProtocol.busy_poll = busy_poll
    return ServerHttpProtocol
