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
    CONTINUATION,
    DATA,
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    LARGEST_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    PING,
    PREFACE,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ConnectionFault,
    ErrorCode,
    HeaderDecoder,
    Headers,
    frame,
    header_fragment,
    header_frames,
    settings_entries,
    unpad,
    window_increment,
)

__all__ = ["Answer", "Http2Client", "StreamReset"]

CONNECTION_WINDOW = 1 << 30  # credited back once half of it has been received
HEADER_BLOCK_LIMIT = 1 << 20  # an answer's encoded header block, across CONTINUATIONs
REFUSALS_RETRIED = 8  # times one call is sent again after REFUSED_STREAM (see `call`)


class StreamReset(Exception):
    """The server reset the call's stream (RST_STREAM) with `code`."""

    def __init__(self, code: int) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"the server reset the stream: {name}")
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


class Http2Client(asyncio.Protocol):
    """One connection to an HTTP/2 server (h2c, prior knowledge) carrying calls."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._decoder = HeaderDecoder()
        self._calls: dict[int, _Call] = {}
        self._next_stream_id = 1
        self._block: tuple[int, int, bytearray] | None = None  # a header block in progress
        self._send_window = DEFAULT_WINDOW
        self._initial_send_window = DEFAULT_WINDOW
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._peer_streams = 100  # until the server's SETTINGS say (RFC 9113 suggests >= 100)
        self._received = 0  # DATA bytes not yet credited back to the connection
        self._blocked: dict[int, _Call] = {}  # calls with body bytes waiting for a window
        self._stream_waiters: deque[asyncio.Future[None]] = deque()
        self._out: list[bytes] = []
        self._lost: BaseException | None = None
        self._settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position, size = 0, len(buffer)
        try:
            while size - position >= 9:
                length = int.from_bytes(buffer[position : position + 3], "big")
                if length > DEFAULT_FRAME_SIZE:  # what this side allows (its SETTINGS)
                    raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                end = position + 9 + length
                if end > size:
                    break
                kind, flags = buffer[position + 3], buffer[position + 4]
                stream_id = int.from_bytes(buffer[position + 5 : position + 9], "big")
                payload = bytes(buffer[position + 9 : end])
                position = end
                if self._block is not None and kind != CONTINUATION:
                    raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a header block was broken")
                self._frame(kind, flags, stream_id & LARGEST_WINDOW, payload)
        except ConnectionFault as fault:
            self._fail(fault)
            return
        del buffer[:position]
        self._flush()

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
                if not (retry and self._calls):
                    raise
            await self._next_stream_end()

    async def _call_once(self, block: bytes, body: bytes) -> Answer:
        while self._lost is None and len(self._calls) >= self._peer_streams:
            await self._next_stream_end()
        if self._lost is not None or self._transport is None:
            raise ConnectionResetError(f"the connection is closed: {self._lost}")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        done: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        call = _Call(self._initial_send_window, memoryview(body), done)
        self._calls[stream_id] = call
        self._out.append(header_frames(stream_id, block, False, self._peer_frame_size))
        self._send_body(stream_id, call)
        self._flush()
        try:
            return await done
        except asyncio.CancelledError:
            if self._forget(stream_id) is not None:
                cancel = struct.pack(">I", ErrorCode.CANCEL)
                self._out.append(frame(RST_STREAM, 0, stream_id, cancel))
                self._flush()
            raise

    async def _next_stream_end(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._stream_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _send_body(self, stream_id: int, call: _Call) -> None:
        """As much of the call's body as the windows allow; END_STREAM with its last byte."""
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

    def _unblock(self) -> None:
        for stream_id, call in list(self._blocked.items()):
            self._send_body(stream_id, call)
            if self._send_window <= 0:
                return

    def _forget(self, stream_id: int) -> _Call | None:
        """The call leaves the connection; a call waiting for a free stream may start."""
        call = self._calls.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        while self._stream_waiters and len(self._calls) < self._peer_streams:
            waiter = self._stream_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        return call

    def _finish(self, stream_id: int) -> None:
        call = self._forget(stream_id)
        if call is not None and not call.done.done():
            call.done.set_result(call.answer)

    # -- frames in -------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if not stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
            fragment = header_fragment(flags, payload)
            if flags & END_HEADERS:
                self._header_block(stream_id, flags, fragment)
            else:
                self._block = (stream_id, flags, bytearray(fragment))
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a malformed PING")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            if len(payload) != 4 or not stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a malformed RST_STREAM")
            call = self._forget(stream_id)
            if call is not None and not call.done.done():
                call.done.set_exception(StreamReset(int.from_bytes(payload, "big")))
        elif kind == GOAWAY:
            self._go_away(stream_id, payload)
        elif kind == PUSH_PROMISE:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a push, which this side disabled")
        # PRIORITY and frames of unknown types change nothing here.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._received += len(payload)
        if self._received >= CONNECTION_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
            self._received = 0
        call = self._calls.get(stream_id)
        if call is None:
            self._check_known(stream_id)
            return  # a call that was cancelled: its late data is dropped
        if not call.headers_seen:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "DATA before the answer's headers")
        call.answer.body.append(unpad(flags, payload))
        if flags & END_STREAM:
            self._finish(stream_id)

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None or self._block[0] != stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "CONTINUATION out of a header block")
        _, first_flags, block = self._block
        block += payload
        if len(block) > HEADER_BLOCK_LIMIT:
            raise ConnectionFault(ErrorCode.ENHANCE_YOUR_CALM, "a header block over 1 MiB")
        if flags & END_HEADERS:
            self._block = None
            self._header_block(stream_id, first_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decoder.decode(block)  # always: the table must follow the server's
        call = self._calls.get(stream_id)
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
        entries = settings_entries(flags, stream_id, payload)
        if entries is None:
            return
        for key, value in entries:
            if key == INITIAL_WINDOW_SIZE:
                change, self._initial_send_window = value - self._initial_send_window, value
                for call in self._calls.values():
                    call.send_window += change
            elif key == MAX_FRAME_SIZE:
                self._peer_frame_size = value
            elif key == MAX_CONCURRENT_STREAMS:
                self._peer_streams = value
        self._out.append(frame(SETTINGS, ACK, 0))
        if not self._settled.done():
            self._settled.set_result(None)
        self._unblock()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        increment = window_increment(payload)
        if not stream_id:
            if not increment or self._send_window + increment > LARGEST_WINDOW:
                raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "a bad connection window")
            self._send_window += increment
            self._unblock()
            return
        call = self._calls.get(stream_id)
        if call is None:
            return  # a stream that just ended
        call.send_window += increment
        if stream_id in self._blocked:
            self._send_body(stream_id, call)

    def _go_away(self, stream_id: int, payload: bytes) -> None:
        """No new calls; those the server did not take (above its last id) fail now,
        the others finish, then the server closes the connection."""
        if stream_id or len(payload) < 8:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a malformed GOAWAY")
        last = int.from_bytes(payload[:4], "big") & LARGEST_WINDOW
        code = int.from_bytes(payload[4:8], "big")
        self._lost = ConnectionResetError(f"the server is going away (GOAWAY {code})")
        for late in [stream for stream in self._calls if stream > last]:
            call = self._forget(late)
            if call is not None and not call.done.done():
                call.done.set_exception(self._lost)

    # -- frames out, the end ---------------------------------------------------------

    def _flush(self) -> None:
        if self._out and self._transport is not None:
            out, self._out = self._out, []
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _fail(self, fault: ConnectionFault) -> None:
        """A connection error: GOAWAY, close, and every call fails."""
        debug = str(fault).encode()
        self._out.append(frame(GOAWAY, 0, 0, struct.pack(">II", 0, fault.code) + debug))
        self._flush()
        self._end(ConnectionResetError(f"HTTP/2 {fault.code.name}: {fault}"))
        if self._transport is not None:
            self._transport.close()

    def _end(self, error: BaseException) -> None:
        self._lost = self._lost or error
        if not self._settled.done():
            self._settled.set_exception(error)
        calls, self._calls = self._calls, {}
        self._blocked.clear()
        for call in calls.values():
            if not call.done.done():
                call.done.set_exception(error)
        while self._stream_waiters:
            waiter = self._stream_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
