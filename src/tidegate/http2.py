"""HTTP/2 (RFC 9113) as much as gRPC needs, on an asyncio transport: the server side,
and what both sides share (`Http2Endpoint`; the client is tidegate.http2_client).

Why not grpcio's server, or the `h2` library: with the same grpcio client, answering
recorded bytes costs grpc.aio's server about 330 us of CPU per call at concurrency 1
and 230 at 64, a prototype on `h2` 187 and 96, and this module with `grpc_wire` 73
and 21 (benchmarks/RESULTS.md, "A native gRPC front"); the issue's goals leave a
call no room for more.
HPACK is the `hpack` library's (the decoder keeps the client's dynamic table); what
this server sends is never indexed, so it needs no encoder state.

One `Http2Connection` per client connection. Streams are handed to the layer above
through `accept` (see `StreamListener`); it answers through `send_headers`,
`send_data` and `reset`. Flow control: what the client sends is credited back to the
connection at once and to a stream when the layer above says it has consumed it
(`consumed`), so a stream that is not read stops its sender; what this side sends
waits for the client's windows, per stream, in order.
"""

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Generic, Protocol, TypeVar, cast

from hpack import Decoder
from hpack.exceptions import HPACKError

from tidegate.busy_poll import BusyPoll

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings identifiers.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

DEFAULT_WINDOW = 65_535
LARGEST_WINDOW = 2**31 - 1
DEFAULT_FRAME_SIZE = 16_384
LARGEST_FRAME_SIZE = 2**24 - 1

# What this side advertises.
STREAM_WINDOW = 4 << 20  # bytes a stream may send ahead of being read
CONNECTION_WINDOW = 64 << 20
STREAMS_AT_ONCE = 1024
HEADER_LIST_LIMIT = 16 << 10  # decoded header bytes a request may carry (gRPC's 16 KiB)
HEADER_BLOCK_LIMIT = 1 << 20  # encoded, across CONTINUATION frames: more ends the connection
SEND_BUFFER_LIMIT = 1 << 20  # bytes queued on a stream before its writer waits
DECODED_BLOCKS_KEPT = 64  # header blocks of indexed fields alone, kept decoded
# The bytes of a one-byte indexed field (RFC 7541, 6.1): index 1 to 126.
_ONE_BYTE_INDEXED = bytes(range(0x81, 0xFF))


class ErrorCode(IntEnum):
    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 5
    FRAME_SIZE_ERROR = 6
    REFUSED_STREAM = 7
    CANCEL = 8
    COMPRESSION_ERROR = 9
    ENHANCE_YOUR_CALM = 11
    INADEQUATE_SECURITY = 12


class ConnectionFault(Exception):
    """A connection error: the connection ends with a GOAWAY carrying `code`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamFault(Exception):
    """A stream error: the stream ends with a RST_STREAM carrying `code`."""

    def __init__(self, stream_id: int, code: ErrorCode) -> None:
        super().__init__(f"stream {stream_id}: {code.name}")
        self.stream_id = stream_id
        self.code = code


class StreamListener(Protocol):
    """What the layer above does with one stream's events."""

    def data(self, chunk: bytes, end_stream: bool) -> None:
        """Bytes of the request body (possibly none, when `end_stream` alone arrives)."""

    def closed(self) -> None:
        """The stream ended abnormally: reset by the client, or the connection lost."""


Headers = tuple[tuple[bytes, bytes], ...]
Accept = Callable[["Http2Connection", int, Headers, bool], StreamListener]


_FRAME_HEAD = struct.Struct(">IBI")  # 24-bit length and type in one word, flags, stream


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541, 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A header block of literal fields never added to the client's dynamic table."""
    out = bytearray()
    for name, value in pairs:
        out += b"\x00" + hpack_integer(len(name), 7) + name + hpack_integer(len(value), 7) + value
    return bytes(out)


def unpad(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS frame's payload without its padding."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "padding longer than its frame")
    return payload[1 : len(payload) - payload[0]]


def header_fragment(flags: int, payload: bytes) -> bytes:
    """The header block fragment a HEADERS frame carries (padding and priority removed)."""
    block = unpad(flags, payload)
    if flags & PRIORITY_FLAG:
        if len(block) < 5:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "a short HEADERS priority")
        block = block[5:]
    return block


def header_frames(stream_id: int, block: bytes, end_stream: bool, frame_size: int) -> bytes:
    """A header block as a HEADERS frame, and CONTINUATIONs when it exceeds `frame_size`."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= frame_size:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    out = [frame(HEADERS, flags, stream_id, block[:frame_size])]
    for start in range(frame_size, len(block), frame_size):
        last = start + frame_size >= len(block)
        fragment = block[start : start + frame_size]
        out.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, fragment))
    return b"".join(out)


def settings_entries(flags: int, stream_id: int, payload: bytes) -> list[tuple[int, int]] | None:
    """A SETTINGS frame's (identifier, value) pairs, checked; None for an ACK."""
    if stream_id:
        raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & ACK:
        if payload:
            raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
        return None
    if len(payload) % 6:
        raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS of a partial entry")
    entries = [struct.unpack_from(">HI", payload, offset) for offset in range(0, len(payload), 6)]
    for key, value in entries:
        if key == INITIAL_WINDOW_SIZE and value > LARGEST_WINDOW:
            raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "a window over 2^31-1")
        if key == MAX_FRAME_SIZE and not DEFAULT_FRAME_SIZE <= value <= LARGEST_FRAME_SIZE:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a frame size out of range")
    return entries


def window_increment(payload: bytes) -> int:
    """A WINDOW_UPDATE frame's increment (zero is the caller's to judge)."""
    if len(payload) != 4:
        raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "a WINDOW_UPDATE of 4 bytes")
    return int.from_bytes(payload, "big") & LARGEST_WINDOW


class HeaderDecoder:
    """HPACK decoding of one connection's header blocks, in order (the peer's dynamic
    table). A block of one-byte indexed fields alone (a peer's repeated block, all from
    the tables) leaves the table as it was, so its decoding holds until a block of any
    other kind may have changed the table."""

    def __init__(self) -> None:
        self._decoder = Decoder(max_header_list_size=HEADER_BLOCK_LIMIT)
        self._decoded: dict[bytes, Headers] = {}

    def decode(self, block: bytes) -> Headers:
        headers = self._decoded.get(block)
        if headers is not None:
            return headers
        try:
            headers = tuple(self._decoder.decode(block, raw=True))
        except HPACKError as exc:
            raise ConnectionFault(ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}") from exc
        if block.translate(None, _ONE_BYTE_INDEXED):  # a literal, or a table size update
            self._decoded.clear()
        elif len(self._decoded) < DECODED_BLOCKS_KEPT:
            self._decoded[block] = headers
        return headers


class _SendWindow(Protocol):
    send_window: int


StreamState = TypeVar("StreamState", bound=_SendWindow)


class Http2Endpoint(asyncio.Protocol, Generic[StreamState]):
    """What either end of a connection does alike: whole frames out of what arrives,
    header blocks across CONTINUATIONs (decoded in order), the peer's SETTINGS, PINGs,
    resets and GOAWAY checked, the connection's send window; the role's methods do the
    rest (`_data`, `_header_block`, `_peer_reset`, `_peer_going_away`, ...).
    `_streams` maps a stream id to what this side keeps for it, a send window at least."""

    _streams: dict[int, StreamState]

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._decoder = HeaderDecoder()
        self._block: tuple[int, int, bytearray] | None = None  # a header block in progress
        self._send_window = DEFAULT_WINDOW
        self._initial_send_window = DEFAULT_WINDOW
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._blocked: dict[int, StreamState] = {}  # streams with DATA waiting for a window
        self._out: list[bytes] = []
        self._reading = False
        self._flush_scheduled = False
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        self._reading = True
        try:
            used = self._frames(view)
        except ConnectionFault as fault:
            self._fail(fault)
            return
        finally:
            self._reading = False
        if buffer:
            del buffer[:used]
        elif used < len(data):
            buffer += data[used:]
        self._flush()

    def _preface(self, view: bytes | bytearray) -> int | None:
        """Bytes before the first frame (None: wait for more). A client's side: none."""
        return 0

    def _frames(self, view: bytes | bytearray) -> int:
        """Handles every whole frame in `view`; how many bytes that was."""
        position = self._preface(view)
        if position is None:
            return 0
        size = len(view)
        while size - position >= 9:
            length = int.from_bytes(view[position : position + 3], "big")
            if length > DEFAULT_FRAME_SIZE:  # what this side allows (it never raises it)
                raise ConnectionFault(
                    ErrorCode.FRAME_SIZE_ERROR,
                    f"a frame of {length} bytes is over the {DEFAULT_FRAME_SIZE} allowed",
                )
            end = position + 9 + length
            if end > size:
                break
            kind, flags = view[position + 3], view[position + 4]
            stream_id = int.from_bytes(view[position + 5 : position + 9], "big") & LARGEST_WINDOW
            payload = bytes(view[position + 9 : end])
            position = end
            if self._block is not None and kind != CONTINUATION:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a header block was interrupted")
            try:
                self._frame(kind, flags, stream_id, payload)
            except StreamFault as fault:
                self._reset(fault.stream_id, fault.code)
        return position

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if not stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
            block = header_fragment(flags, payload)
            if flags & END_HEADERS:
                self._header_block(stream_id, flags, block)
            else:
                self._block = (stream_id, flags, bytearray(block))
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a malformed PING")
            if not flags & ACK:
                self._send(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise ConnectionFault(ErrorCode.FRAME_SIZE_ERROR, "a RST_STREAM of 4 bytes")
            if not stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            self._peer_reset(stream_id, int.from_bytes(payload, "big"))
        elif kind == GOAWAY:
            if stream_id or len(payload) < 8:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a malformed GOAWAY")
            last, code = struct.unpack_from(">II", payload)
            self._peer_going_away(last & LARGEST_WINDOW, code)
        elif kind == PRIORITY:
            if not stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        elif kind == PUSH_PROMISE:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE, never allowed here")
        # Frames of unknown types are ignored (RFC 9113, 4.1).

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None or self._block[0] != stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "CONTINUATION out of a header block")
        _, first_flags, block = self._block
        block += payload
        if len(block) > HEADER_BLOCK_LIMIT:
            raise ConnectionFault(ErrorCode.ENHANCE_YOUR_CALM, "a header block over 1 MiB")
        if flags & END_HEADERS:
            self._block = None  # END_STREAM is the HEADERS frame's flag
            self._header_block(stream_id, first_flags, bytes(block))

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        entries = settings_entries(flags, stream_id, payload)
        if entries is None:
            return
        for key, value in entries:
            if key == INITIAL_WINDOW_SIZE:
                change, self._initial_send_window = value - self._initial_send_window, value
                for stream in self._streams.values():
                    stream.send_window += change
            elif key == MAX_FRAME_SIZE:
                self._peer_frame_size = value
            else:
                self._setting(key, value)
        self._send(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        increment = window_increment(payload)
        if stream_id:
            self._stream_window_update(stream_id, increment)
            return
        if not increment:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
        if self._send_window + increment > LARGEST_WINDOW:
            raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "a bad connection window")
        self._send_window += increment
        self._unblock()

    def _unblock(self) -> None:
        """Sends what was waiting for a window, in order, as far as the windows now allow."""
        for stream_id, stream in list(self._blocked.items()):
            self._resume(stream_id, stream)
            if self._send_window <= 0:
                return

    def _send(self, data: bytes) -> None:
        """Queues frames: written once the frames read have been handled, or this turn
        of the loop."""
        self._out.append(data)
        if not self._reading and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Everything queued in one write (one syscall per read, or per loop turn)."""
        self._flush_scheduled = False
        if self._out and self._transport is not None:
            out, self._out = self._out, []
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    # -- the role's ------------------------------------------------------------------

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        raise NotImplementedError

    def _setting(self, key: int, value: int) -> None:
        """A setting other than the window and frame sizes (ignored unless a role
        needs it)."""

    def _stream_window_update(self, stream_id: int, increment: int) -> None:
        raise NotImplementedError

    def _resume(self, stream_id: int, stream: StreamState) -> None:
        """Sends what the stream has waiting, as far as the windows allow (it leaves
        `_blocked` once nothing waits)."""
        raise NotImplementedError

    def _peer_reset(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def _peer_going_away(self, last_stream_id: int, code: int) -> None:
        raise NotImplementedError

    def _reset(self, stream_id: int, code: ErrorCode) -> None:
        raise NotImplementedError

    def _fail(self, fault: ConnectionFault) -> None:
        raise NotImplementedError


class _Stream:
    __slots__ = (
        "drained",
        "id",
        "listener",
        "local_closed",
        "queue",
        "queued",
        "receive_window",
        "remote_closed",
        "send_window",
        "unacked",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.listener: StreamListener | None = None
        self.queue: deque[tuple[int, memoryview | bytes, bool]] = deque()  # (kind, bytes, end)
        self.queued = 0  # DATA bytes waiting for a window
        self.send_window = send_window
        self.receive_window = STREAM_WINDOW
        self.unacked = 0  # consumed bytes not yet credited back
        self.remote_closed = False
        self.local_closed = False
        self.drained: asyncio.Future[None] | None = None


class Http2Connection(Http2Endpoint[_Stream]):
    """One client connection: frames in, frames out, streams handed to `accept`."""

    def __init__(
        self, accept: Accept, connections: set["Http2Connection"], busy_poll: BusyPoll | None
    ) -> None:
        super().__init__()
        self._accept = accept
        self._connections = connections
        self._busy_poll = busy_poll
        self._preface_seen = False
        self._streams = {}
        self._last_stream_id = 0
        self._receive_window = CONNECTION_WINDOW
        self._going_away = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        self._connections.add(self)
        settings = struct.pack(
            ">HIHIHIHI",
            ENABLE_PUSH,
            0,
            MAX_CONCURRENT_STREAMS,
            STREAMS_AT_ONCE,
            INITIAL_WINDOW_SIZE,
            STREAM_WINDOW,
            MAX_HEADER_LIST_SIZE,
            HEADER_LIST_LIMIT,
        )
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._wake(stream)
            if stream.listener is not None:
                stream.listener.closed()

    def pause_writing(self) -> None:
        """A client that does not read stops being read (its pings, its requests)."""
        assert self._transport is not None
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    # -- frames in -------------------------------------------------------------------

    def _preface(self, view: bytes | bytearray) -> int | None:
        if self._preface_seen:
            return 0
        if len(view) < len(PREFACE):
            if PREFACE.startswith(bytes(view)):
                return None
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
        if view[: len(PREFACE)] != PREFACE:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
        self._preface_seen = True
        return len(PREFACE)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        if length > self._receive_window:
            raise ConnectionFault(ErrorCode.FLOW_CONTROL_ERROR, "DATA past the connection window")
        self._receive_window -= length
        if self._receive_window < CONNECTION_WINDOW // 2:
            self._send(
                frame(
                    WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW - self._receive_window)
                )
            )
            self._receive_window = CONNECTION_WINDOW
        stream = self._open_stream(stream_id)
        if stream is None:
            return
        if length > stream.receive_window:
            raise StreamFault(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
        stream.receive_window -= length
        body = unpad(flags, payload)
        padding = length - len(body)
        if padding:
            self.consumed(stream_id, padding)
        if flags & END_STREAM:
            stream.remote_closed = True
        assert stream.listener is not None
        stream.listener.data(body, bool(flags & END_STREAM))
        self._forget_if_done(stream)

    def _open_stream(self, stream_id: int) -> _Stream | None:
        """The stream a DATA or trailing HEADERS frame is for, still open on its side;
        None for one this side has closed (frames the client sent before it learnt
        that are dropped, RFC 9113, 5.4.2)."""
        if not stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} is idle")
            return None
        if stream.remote_closed:
            raise StreamFault(stream_id, ErrorCode.STREAM_CLOSED)
        return stream

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decoder.decode(block)
        end_stream = bool(flags & END_STREAM)
        if stream_id % 2 == 0:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "a client's stream id must be odd")
        if stream_id <= self._last_stream_id:  # trailers of a request (gRPC sends none)
            stream = self._open_stream(stream_id)
            if stream is None:
                return
            if not end_stream:
                raise StreamFault(stream_id, ErrorCode.PROTOCOL_ERROR)
            stream.remote_closed = True
            assert stream.listener is not None
            stream.listener.data(b"", True)
            self._forget_if_done(stream)
            return
        self._last_stream_id = stream_id
        if self._going_away or len(self._streams) >= STREAMS_AT_ONCE:
            raise StreamFault(stream_id, ErrorCode.REFUSED_STREAM)
        if self._busy_poll is not None and not self._streams:
            self._busy_poll.request_arrived()  # a call on a connection that was idle
        stream = _Stream(stream_id, self._initial_send_window)
        stream.remote_closed = end_stream
        self._streams[stream_id] = stream
        stream.listener = self._accept(self, stream_id, headers, end_stream)
        self._forget_if_done(stream)

    def _stream_window_update(self, stream_id: int, increment: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, f"stream {stream_id} is idle")
            return  # a stream just closed: its late update changes nothing
        if not increment:
            raise StreamFault(stream_id, ErrorCode.PROTOCOL_ERROR)
        if stream.send_window + increment > LARGEST_WINDOW:
            raise StreamFault(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
        stream.send_window += increment
        self._drain(stream)

    def _peer_reset(self, stream_id: int, code: int) -> None:
        if stream_id > self._last_stream_id:
            raise ConnectionFault(ErrorCode.PROTOCOL_ERROR, "RST_STREAM of an idle stream")
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._blocked.pop(stream_id, None)
            self._wake(stream)
            if stream.listener is not None:
                stream.listener.closed()
        self._close_when_done()

    def _peer_going_away(self, last_stream_id: int, code: int) -> None:
        self._going_away = True
        self._close_when_done()

    # -- frames out ------------------------------------------------------------------

    def send_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """A header block (from `encode_headers`), in order after DATA still waiting."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return  # reset by the client meanwhile: nobody to answer
        stream.queue.append((HEADERS, block, end_stream))
        self._drain(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        stream.queue.append((DATA, memoryview(data), end_stream))
        stream.queued += len(data)
        self._drain(stream)

    def send_whole(self, stream_id: int, headers: bytes, data: bytes, trailers: bytes) -> None:
        """A whole answer: headers, one body, trailers (a unary gRPC call's). When the
        windows take the body at once (the common case), it is built as one piece."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        frame_size = self._peer_frame_size
        window = min(self._send_window, stream.send_window)
        if (
            stream.queue
            or len(data) > min(window, frame_size)
            or max(len(headers), len(trailers)) > frame_size  # CONTINUATIONs: `_send_block`
        ):
            self.send_headers(stream_id, headers, False)
            self.send_data(stream_id, data)
            self.send_headers(stream_id, trailers, True)
            return
        self._send(
            frame(HEADERS, END_HEADERS, stream_id, headers)
            + frame(DATA, 0, stream_id, data)
            + frame(HEADERS, END_STREAM | END_HEADERS, stream_id, trailers)
        )
        self._send_window -= len(data)
        stream.send_window -= len(data)
        stream.local_closed = True
        self._forget_if_done(stream)

    async def writable(self, stream_id: int) -> None:
        """Returns once the stream has less than SEND_BUFFER_LIMIT bytes waiting to go
        (at once if it is closed): a writer of many messages waits for a slow reader."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.queued < SEND_BUFFER_LIMIT:
            return
        stream.drained = self.loop.create_future()
        await stream.drained

    def consumed(self, stream_id: int, count: int) -> None:
        """`count` bytes of the stream's body were read: the client may send as many more."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.unacked += count
        if stream.unacked >= STREAM_WINDOW // 2:
            self._send(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", stream.unacked)))
            stream.receive_window += stream.unacked
            stream.unacked = 0

    def reset(self, stream_id: int, code: ErrorCode) -> None:
        """Ends the stream at once (what was queued for it is dropped)."""
        self._reset(stream_id, code)

    def _reset(self, stream_id: int, code: ErrorCode) -> None:
        self._send(frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._blocked.pop(stream_id, None)
            self._wake(stream)
            if stream.listener is not None:
                stream.listener.closed()
        self._close_when_done()

    def _drain(self, stream: _Stream) -> None:
        """Sends what the stream has queued, as far as the windows allow."""
        queue = stream.queue
        while queue:
            kind, payload, end = queue[0]
            if kind == HEADERS:
                self._send_block(stream.id, payload, end)  # type: ignore[arg-type]
            else:
                allowed = min(self._send_window, stream.send_window, self._peer_frame_size)
                if len(payload) > allowed:
                    if allowed <= 0:
                        self._blocked[stream.id] = stream
                        return
                    self._send(frame(DATA, 0, stream.id, bytes(payload[:allowed])))
                    queue[0] = (DATA, payload[allowed:], end)
                    self._spent(stream, allowed)
                    continue  # more frames while the windows allow
                self._send(frame(DATA, END_STREAM if end else 0, stream.id, bytes(payload)))
                self._spent(stream, len(payload))
            queue.popleft()
            if end:
                stream.local_closed = True
        self._blocked.pop(stream.id, None)
        self._wake(stream)
        self._forget_if_done(stream)

    def _spent(self, stream: _Stream, count: int) -> None:
        self._send_window -= count
        stream.send_window -= count
        stream.queued -= count

    def _send_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        self._send(header_frames(stream_id, block, end_stream, self._peer_frame_size))

    def _resume(self, stream_id: int, stream: _Stream) -> None:
        self._drain(stream)

    @staticmethod
    def _wake(stream: _Stream) -> None:
        if stream.drained is not None and stream.queued < SEND_BUFFER_LIMIT:
            if not stream.drained.done():
                stream.drained.set_result(None)
            stream.drained = None

    def _forget_if_done(self, stream: _Stream) -> None:
        """A stream both sides have ended is closed; one this side ended first is reset
        with NO_ERROR, so that the client stops sending (RFC 9113, 8.1)."""
        if not stream.local_closed or self._streams.get(stream.id) is not stream:
            return
        if not stream.remote_closed:
            self._send(frame(RST_STREAM, 0, stream.id, struct.pack(">I", ErrorCode.NO_ERROR)))
        del self._streams[stream.id]
        if self._busy_poll is not None:
            self._busy_poll.answered(self.loop)
        self._close_when_done()

    # -- the connection's end --------------------------------------------------------

    def go_away(self) -> None:
        """No new streams; those open finish, then the connection closes."""
        if not self._going_away:
            self._going_away = True
            self._send(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream_id, 0)))
        self._close_when_done()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close_when_done(self) -> None:
        if self._going_away and not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()

    def _fail(self, fault: ConnectionFault) -> None:
        self._going_away = True
        debug = str(fault).encode()
        self._send(
            frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream_id, fault.code) + debug)
        )
        self._flush()
        if self._transport is not None:
            self._transport.close()
