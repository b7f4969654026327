"""The client side of HTTP/2 (RFC 9113), as much as a load of unary gRPC calls needs.

Why not grpcio's client: `tidegate bench` shares the machine with the server it
measures, and grpc.aio's client took about 60 % of a core at one call in flight,
three quarters of the latency it reported against tidegate; every server looked
alike behind it. This one costs a fraction of that (benchmarks/RESULTS.md, "A raw
HTTP/2 client for `tidegate bench --protocol grpc`"), like the load generator's
HTTP/1.1 `Connection`.

A request is a header block encoded once by the caller (`http2.encode_headers`:
literals never indexed, so the same bytes serve every stream) and a body; the answer
is its headers, body and trailers. Flow control: this side advertises the largest
stream window (answers are never held back per stream) and credits the connection
window back in bulk; what it sends waits for the server's windows, per stream, in
order. Calls beyond the server's MAX_CONCURRENT_STREAMS wait for a stream to end.
"""

import asyncio
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from tidegate.http2 import (
    ACK,
    DATA,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_STREAM,
    GOAWAY,
    INITIAL_WINDOW_SIZE,
    LARGEST_WINDOW,
    MAX_CONCURRENT_STREAMS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ConnectionFault,
    ErrorCode,
    Headers,
    Http2Endpoint,
    StreamFault,
    frame,
    header_frames,
    unpad,
)

__all__ = ["Answer", "Http2Client", "StreamReset"]

CONNECTION_WINDOW = 1 << 30  # credited back once half of it has been received
REFUSALS_RETRIED = 8  # times one call is sent again after REFUSED_STREAM (see `call`)


class StreamReset(Exception):
    """The call's stream was reset with `code`: by the server, or by this side for the
    server's error on that stream alone."""

    def __init__(self, code: int) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"the stream was reset: {name}")
        self.code = code


@dataclass(slots=True)
class Answer:
    """What the server answered on one stream."""

    headers: Headers = ()
    body: list[bytes] = field(default_factory=list)
    trailers: Headers = ()


class _Call:
    __slots__ = ("answer", "body", "done", "headers_seen", "send_window")

    def __init__(self, send_window: int, body: memoryview, done: asyncio.Future[Answer]) -> None:
        self.answer = Answer()
        self.body = body  # what is still to send
        self.send_window = send_window
        self.headers_seen = False
        self.done = done


class Http2Client(Http2Endpoint[_Call]):
    """One connection to an HTTP/2 server (h2c, prior knowledge) carrying calls."""

    def __init__(self) -> None:
        super().__init__()
        self._streams = {}
        self._next_stream_id = 1
        self._peer_streams = 100  # until the server's SETTINGS say (RFC 9113 suggests >= 100)
        self._received = 0  # DATA bytes not yet credited back to the connection
        self._stream_waiters: deque[asyncio.Future[None]] = deque()
        self._lost: BaseException | None = None
        self._settled: asyncio.Future[None] = self.loop.create_future()

    @classmethod
    async def open(cls, host: str, port: int) -> "Http2Client":
        """A connection whose server has sent its SETTINGS: the first calls then know
        its stream limit and windows instead of guessing them."""
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, host, port)
        try:
            await client._settled
        except BaseException:
            client.close()
            raise
        return client

    @property
    def usable(self) -> bool:
        """Whether new calls may start (not closed, no GOAWAY received)."""
        return self._lost is None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        settings = struct.pack(">HIHI", ENABLE_PUSH, 0, INITIAL_WINDOW_SIZE, LARGEST_WINDOW)
        self._transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionResetError("the server closed the connection"))

    # -- calls -----------------------------------------------------------------------

    async def call(self, block: bytes, body: bytes) -> Answer:
        """Sends a request (its header block and body) on a new stream and returns the
        answer once its stream has ended. Cancelled, it resets the stream.

        A stream the server refused (REFUSED_STREAM: not processed, RFC 9113, 8.7)
        while others of this connection were open is sent again once one of them has
        ended, as grpcio's client does: a server may count a stream it has ended
        against its limit until it has cleaned it up (grpcio's server does).

        Raises:
            StreamReset: the server reset the stream.
            ConnectionError: the connection is closed or going away, or ends meanwhile.
        """
        refusals = 0
        while True:
            try:
                return await self._call_once(block, body)
            except StreamReset as reset:
                refusals += 1
                retry = reset.code == ErrorCode.REFUSED_STREAM and refusals <= REFUSALS_RETRIED
                if not (retry and self._streams):
                    raise
            await self._next_stream_end()

    async def _call_once(self, block: bytes, body: bytes) -> Answer:
        while self._lost is None and len(self._streams) >= self._peer_streams:
            await self._next_stream_end()
        if self._lost is not None or self._transport is None:
            raise ConnectionResetError(f"the connection is closed: {self._lost}")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        call = _Call(self._initial_send_window, memoryview(body), done)
        self._streams[stream_id] = call
        # Written at once. Queueing the calls of one turn of the loop into one write
        # measured slower at c=64 against tidegate (4.8-5.2k against 5.9-6.0k req/s).
        self._out.append(header_frames(stream_id, block, False, self._peer_frame_size))
        self._send_body(stream_id, call)
        self._flush()
        try:
            return await done
        except asyncio.CancelledError:
            if self._forget(stream_id) is not None:
                self._send(frame(RST_STREAM, 0, stream_id, struct.pack(">I", ErrorCode.CANCEL)))
            raise

    async def _next_stream_end(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._stream_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _send_body(self, stream_id: int, call: _Call) -> None:
        """As much of the call's body as the windows allow, END_STREAM with its last
        byte; queued, for the caller's `_flush` or the end of the read to write."""
        body = call.body
        while True:
            allowed = min(self._send_window, call.send_window, self._peer_frame_size)
            if len(body) <= allowed:
                self._out.append(frame(DATA, END_STREAM, stream_id, bytes(body)))
                self._spend(call, len(body))
                self._blocked.pop(stream_id, None)
                call.body = memoryview(b"")
                return
            if allowed <= 0:
                call.body = body
                self._blocked[stream_id] = call
                return
            self._out.append(frame(DATA, 0, stream_id, bytes(body[:allowed])))
            self._spend(call, allowed)
            body = body[allowed:]

    def _spend(self, call: _Call, count: int) -> None:
        self._send_window -= count
        call.send_window -= count

    def _resume(self, stream_id: int, call: _Call) -> None:
        self._send_body(stream_id, call)

    def _forget(self, stream_id: int) -> _Call | None:
        """The call leaves the connection; a call waiting for a free stream may start."""
        call = self._streams.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        while self._stream_waiters and len(self._streams) < self._peer_streams:
            waiter = self._stream_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        return call

    def _finish(self, stream_id: int) -> None:
        call = self._forget(stream_id)
        if call is not None and not call.done.done():
            call.done.set_result(call.answer)

    def _fail_call(self, stream_id: int, error: BaseException) -> _Call | None:
        """The call leaves the connection, failing with `error` (None: no such call)."""
        call = self._forget(stream_id)
        if call is not None and not call.done.done():
            call.done.set_exception(error)
        return call

    # -- frames in -------------------------------------------------------------------

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._received += len(payload)
        if self._received >= CONNECTION_WINDOW // 2:
            self._send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
            self._received = 0
        call = self._streams.get(stream_id)
        if call is None:
            self._check_known(stream_id)
            return  # a call that was cancelled: its late data is dropped
        if not call.headers_seen:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "DATA before the answer's headers")
        call.answer.body.append(unpad(flags, payload))
        if flags & END_STREAM:
            self._finish(stream_id)

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decoder.decode(block)  # always: the table must follow the server's
        call = self._streams.get(stream_id)
        if call is None:
            self._check_known(stream_id)
            return
        if not call.headers_seen:
            call.headers_seen = True
            call.answer.headers = headers
        elif flags & END_STREAM:
            call.answer.trailers = headers
        else:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM")
        if flags & END_STREAM:
            self._finish(stream_id)

    def _check_known(self, stream_id: int) -> None:
        """A frame for no current call must be for a stream this side opened."""
        if stream_id % 2 == 0 or stream_id >= self._next_stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} is idle")

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        super()._settings(flags, stream_id, payload)
        if not flags & ACK and not self._settled.done():
            self._settled.set_result(None)

    def _setting(self, key: int, value: int) -> None:
        if key == MAX_CONCURRENT_STREAMS:
            self._peer_streams = value

    def _stream_window_update(self, stream_id: int, increment: int) -> None:
        call = self._streams.get(stream_id)
        if call is None:
            self._check_known(stream_id)
            return  # a stream that just ended
        if not increment:
            raise StreamFault(stream_id, ErrorCode.PROTOCOL_ERROR)
        if call.send_window + increment > LARGEST_WINDOW:
            raise StreamFault(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
        call.send_window += increment
        if stream_id in self._blocked:
            self._send_body(stream_id, call)

    def _peer_reset(self, stream_id: int, code: int) -> None:
        if self._fail_call(stream_id, StreamReset(code)) is None:
            self._check_known(stream_id)

    def _peer_going_away(self, last_stream_id: int, code: int) -> None:
        """No new calls; those the server did not take (above its last id) fail now,
        the others finish, then the server closes the connection."""
        self._lost = ConnectionResetError(f"the server is going away (GOAWAY {code})")
        for late in [stream for stream in self._streams if stream > last_stream_id]:
            self._fail_call(late, self._lost)

    # -- frames out, the end ---------------------------------------------------------

    def _reset(self, stream_id: int, code: ErrorCode) -> None:
        """The server erred on one stream: it is reset, its call fails."""
        self._send(frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        self._fail_call(stream_id, StreamReset(code))

    def _fail(self, fault: ConnectionFault) -> None:
        """A connection error: GOAWAY, close, and every call fails."""
        self._send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, fault.code) + str(fault).encode()))
        self._flush()
        self._end(ConnectionResetError(f"HTTP/2 {fault.code.name}: {fault}"))
        if self._transport is not None:
            self._transport.close()

    def _end(self, error: BaseException) -> None:
        self._lost = self._lost or error
        if not self._settled.done():
            self._settled.set_exception(error)
        calls, self._streams = self._streams, {}
        self._blocked.clear()
        for call in calls.values():
            if not call.done.done():
                call.done.set_exception(error)
        while self._stream_waiters:
            waiter = self._stream_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
