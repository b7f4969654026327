"""gRPC's calls over `tidegate.http2`: the server that answers the V2 protocol's gRPC
transport, and the health and reflection services, on the event loop of HTTP.

It serves grpcio's method handlers (what `grpc.method_handlers_generic_handler` and
the generated `add_..._to_server` functions register) with a context that has the
parts of `grpc.aio.ServicerContext` those servicers use, so the servicers are the
ones grpcio would run. What it does itself is the wire (RFC-style "gRPC over
HTTP2"): the call's headers and metadata, `grpc-timeout`, length-prefixed messages
(uncompressed: a compressed call is UNIMPLEMENTED, as `grpc-accept-encoding` says),
the message size limit, and the status in the trailers.
"""

import asyncio
import base64
import binascii
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NamedTuple

import grpc

from tidegate import http2
from tidegate.busy_poll import BusyPoll
from tidegate.eager import run_eagerly
from tidegate.http2 import Headers, Http2Connection

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]

# `:status 200` (the static table's 8th entry), the content type, and that messages
# come uncompressed (what a client that sent a compressed call is told).
RESPONSE_HEADERS = b"\x88" + http2.encode_headers(
    [(b"content-type", b"application/grpc"), (b"grpc-accept-encoding", b"identity")]
)
_NOT_GRPC = b"\x08\x03415"  # `:status 415` (a literal of the static table's :status)
_RESERVED = frozenset(
    (b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding")
)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_END = object()  # the end of a streaming call's requests
_CLOSED = object()  # the call was reset or lost


class Aborted(Exception):
    """`context.abort`: the call ends with this status (as grpc.aio's AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _CallDetails(NamedTuple):
    """What a generic handler looks a method up by (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: Metadata


def percent_encoded(message: str) -> bytes:
    """grpc-message's encoding: UTF-8, with bytes outside printable ASCII and '%' as %XX."""
    out = bytearray()
    for byte in message.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def length_prefixed(message: bytes) -> bytes:
    """A message as a gRPC stream carries it: not compressed (a zero byte), its 4-byte
    big-endian length, its bytes."""
    return len(message).to_bytes(5, "big") + message


def timeout_seconds(value: bytes) -> float | None:
    """grpc-timeout (`<up to 8 digits><unit>`) in seconds; None if malformed."""
    scale = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if scale is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * scale


@functools.lru_cache(maxsize=256)
def ok_trailers(metadata: Metadata) -> bytes:
    """An OK status with the method's trailing metadata (which repeats: the version and
    variant that answered), encoded once."""
    return trailers(grpc.StatusCode.OK, "", metadata)


def trailers(code: grpc.StatusCode, message: str, metadata: Iterable[tuple[str, Any]]) -> bytes:
    pairs = [(b"grpc-status", b"%d" % code.value[0])]
    if message:
        pairs.append((b"grpc-message", percent_encoded(message)))
    for name, value in metadata:
        if name.endswith("-bin"):
            value = base64.b64encode(value).rstrip(b"=")
        elif isinstance(value, str):
            value = value.encode()
        pairs.append((name.encode(), value))
    return http2.encode_headers(pairs)


def _metadata_value(name: bytes, value: bytes) -> str | bytes | None:
    """The value a servicer sees; None for a `-bin` value that is not base64."""
    if name.endswith(b"-bin"):
        try:
            return base64.b64decode(value + b"=" * (-len(value) % 4))
        except binascii.Error:
            return None
    return value.decode("latin-1")


class CallHeaders(NamedTuple):
    """What a call's request headers say."""

    path: str
    content_type: bytes
    timeout: float | None  # grpc-timeout, in seconds
    compressed: bool  # a grpc-encoding other than identity
    metadata: Metadata  # the rest, as the servicers see it
    # Why the headers alone refuse the call (status, message), whatever its method.
    problem: tuple[grpc.StatusCode, str] | None


@functools.lru_cache(maxsize=256)
def call_headers(headers: Headers) -> CallHeaders:
    """The call's headers read (a client's calls repeat theirs: read once)."""
    path = content_type = b""
    timeout: bytes | None = None
    encoding = b"identity"
    metadata: list[tuple[str, str | bytes]] = []
    malformed = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":path":
                path = value
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b"grpc-encoding":
            encoding = value
        elif name not in _RESERVED:
            entry = _metadata_value(name, value)
            if entry is None:
                malformed = name.decode("latin-1")
            else:
                metadata.append((name.decode("latin-1"), entry))
    seconds = None if timeout is None else timeout_seconds(timeout)
    size = sum(len(name) + len(value) + 32 for name, value in headers)  # as HTTP/2 counts
    problem = None
    if size > http2.HEADER_LIST_LIMIT:  # what this server advertised
        problem = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request headers of {size} bytes are over the {http2.HEADER_LIST_LIMIT} allowed",
        )
    elif malformed is not None:
        problem = grpc.StatusCode.INTERNAL, f"binary metadata {malformed!r} is not base64"
    elif timeout is not None and seconds is None:
        problem = grpc.StatusCode.INTERNAL, f"a malformed grpc-timeout: {timeout!r}"
    return CallHeaders(
        path.decode("latin-1"),
        content_type,
        seconds,
        encoding != b"identity",
        tuple(metadata),
        problem,
    )


class CallContext:
    """The parts of `grpc.aio.ServicerContext` that tidegate's, grpcio's health and
    reflection servicers use."""

    __slots__ = ("_call",)

    def __init__(self, call: "Call") -> None:
        self._call = call

    def invocation_metadata(self) -> Metadata:
        return self._call.metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        # As pairs of str and str or bytes (grpc's metadata): hashable, see `ok_trailers`.
        self._call.trailing = tuple((name, value) for name, value in metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._call.code = code

    def set_details(self, details: str) -> None:
        self._call.details = details

    async def write(self, message: Any) -> None:
        await self._call.write(message)


class _Refused:
    """The listener of a stream answered at its headers: what follows is dropped."""

    __slots__ = ()

    def data(self, chunk: bytes, end_stream: bool) -> None:
        pass

    def closed(self) -> None:
        pass


_REFUSED = _Refused()


class Call:
    """One call: its request messages in, its handler run, its answer out."""

    __slots__ = (
        "_ahead",
        "_buffer",
        "_headers_sent",
        "_messages",
        "code",
        "connection",
        "context",
        "details",
        "finished",
        "handler",
        "metadata",
        "requests",
        "server",
        "stream_id",
        "task",
        "timer",
        "trailing",
    )

    def __init__(
        self,
        server: "GrpcServer",
        connection: Http2Connection,
        stream_id: int,
        handler: Any,
        metadata: Metadata,
    ) -> None:
        self.server = server
        self.connection = connection
        self.stream_id = stream_id
        self.handler = handler
        self.metadata = metadata
        self.context = CallContext(self)
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailing: Metadata = ()
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.requests: asyncio.Queue[Any] | None = None
        self._buffer = bytearray()
        self._ahead = 0  # bytes of the message in `_buffer` already credited back
        self._messages: list[bytes] = []
        self._headers_sent = False
        if handler.request_streaming:
            self.requests = asyncio.Queue()
            self._start(self._serve())

    # -- the request -----------------------------------------------------------------

    def data(self, chunk: bytes, end_stream: bool) -> None:
        if self.finished:
            return
        buffer = self._buffer
        buffer += chunk
        limit = self.server.max_message_bytes
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big")
            if buffer[0]:
                self.finish(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted")
                return
            if length > limit:
                self.finish(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({length} vs. {limit})",
                )
                return
            if len(buffer) < 5 + length:
                break
            message = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            owed = 5 + length - min(5 + length, self._ahead)  # credited when read
            self._ahead = max(0, self._ahead - 5 - length)
            if self.requests is not None:
                self.requests.put_nowait((message, owed))
            else:
                self._messages.append(message)
        if len(buffer) > self._ahead:  # a message arriving: let the rest of it come
            self.connection.consumed(self.stream_id, len(buffer) - self._ahead)
            self._ahead = len(buffer)
        if not end_stream:
            return
        if buffer:
            self.finish(grpc.StatusCode.INTERNAL, "the request ended inside a message")
        elif self.requests is not None:
            self.requests.put_nowait(_END)
        elif len(self._messages) != 1:
            self.finish(
                grpc.StatusCode.UNIMPLEMENTED,
                f"a unary call takes one request message, not {len(self._messages)}",
            )
        else:
            self._start(self._serve())

    def closed(self) -> None:
        """Reset by the client, or its connection lost: the handler is cancelled."""
        self.finished = True
        if self.requests is not None:
            self.requests.put_nowait(_CLOSED)
        self._stop()

    async def _incoming(self) -> AsyncIterator[Any]:
        assert self.requests is not None
        parse = self.handler.request_deserializer
        while True:
            item = await self.requests.get()
            if item is _END:
                return
            if item is _CLOSED:
                raise asyncio.CancelledError
            message, owed = item
            self.connection.consumed(self.stream_id, owed)
            yield _parsed(parse, message)

    # -- the handler -----------------------------------------------------------------

    def _start(self, serving: Any) -> None:
        """A unary call with no other call in flight runs at once, within the read that
        completed it, so its answer leaves in that read's write (`eager`); under load
        calls start as tasks, which lets the batcher gather those of one read."""
        loop = self.connection.loop
        if self.server.calls or self.requests is not None:
            self.task = loop.create_task(serving)
        else:
            self.task = run_eagerly(serving, loop)
            if self.task is None:
                return
        self.server.calls.add(self.task)
        self.task.add_done_callback(self.server.calls.discard)

    def expire(self) -> None:
        self.timer = None
        if not self.finished:
            self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    async def _serve(self) -> None:
        handler = self.handler
        try:
            if handler.request_streaming:
                argument: Any = self._incoming()
                behaviour = handler.stream_stream or handler.stream_unary
            else:
                argument = _parsed(handler.request_deserializer, self._messages.pop())
                behaviour = handler.unary_stream or handler.unary_unary
            result = behaviour(argument, self.context)
            if handler.response_streaming:
                if inspect.isasyncgen(result):
                    async for message in result:
                        await self.write(message)
                else:
                    await result  # it writes through `context.write`
                self.finish(self.code, self.details)
            else:
                response = await result
                if self.code != grpc.StatusCode.OK:  # set by the method (`set_code`)
                    self.finish(self.code, self.details)
                elif response is None:
                    self.finish(grpc.StatusCode.INTERNAL, "the method returned no response")
                else:
                    self.answer(_serialized(handler.response_serializer, response))
        except Aborted as aborted:
            self.finish(aborted.code, aborted.details)
        except asyncio.CancelledError:
            pass  # reset, lost, expired or stopped: answered (or not) by whoever cancelled
        except Exception as exc:
            log.exception("gRPC method failed")
            self.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    # -- the answer ------------------------------------------------------------------

    def answer(self, message: bytes) -> None:
        """A unary call's response and its OK status, in one write."""
        if self.finished:
            return
        self.finished = True
        self._stop()
        data, block = length_prefixed(message), ok_trailers(self.trailing)
        self.connection.send_whole(self.stream_id, RESPONSE_HEADERS, data, block)

    async def write(self, message: Any) -> None:
        """One message of a streaming response."""
        if self.finished:
            raise asyncio.CancelledError  # nobody to write to any more
        if not self._headers_sent:
            self._headers_sent = True
            self.connection.send_headers(self.stream_id, RESPONSE_HEADERS, False)
        raw = _serialized(self.handler.response_serializer, message)
        self.connection.send_data(self.stream_id, length_prefixed(raw))
        await self.connection.writable(self.stream_id)

    def finish(self, code: grpc.StatusCode, message: str) -> None:
        """The call's status (after the headers, or alone as a trailers-only answer)."""
        if self.finished:
            return
        self.finished = True
        self._stop()
        block = trailers(code, message, self.trailing)
        if not self._headers_sent:
            block = RESPONSE_HEADERS + block
        self.connection.send_headers(self.stream_id, block, True)

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()


def _parsed(parse: Callable[[bytes], Any] | None, message: bytes) -> Any:
    if parse is None:
        return message
    try:
        return parse(message)
    except Exception as exc:
        raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse the request: {exc}") from exc


def _serialized(serialize: Callable[[Any], bytes] | None, message: Any) -> bytes:
    """A response's bytes; a handler without a serializer answers bytes (as in grpcio)."""
    return message if serialize is None else serialize(message)


class GrpcServer:
    """Method handlers served on a port; grpcio's server API as far as the generated
    `add_..._to_server` functions and `reflection` use it."""

    def __init__(self, max_message_bytes: int, busy_poll: BusyPoll | None) -> None:
        self.max_message_bytes = max_message_bytes
        self.busy_poll = busy_poll
        self.calls: set[asyncio.Task[None]] = set()
        self._generic: list[grpc.GenericRpcHandler] = []
        self._methods: dict[str, Any] = {}
        self._connections: set[Http2Connection] = set()
        self._listener: asyncio.Server | None = None

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    async def start(self, host: str, port: int) -> None:
        """Listens on `host:port` with SO_REUSEPORT (every worker binds it, as HTTP's)."""
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(
                lambda: Http2Connection(self.accept, self._connections, self.busy_poll),
                host,
                port,
                reuse_port=True,
            )
        except OSError as exc:
            raise OSError(f"cannot serve gRPC on {host}:{port}: {exc.strerror}") from exc

    async def stop(self, grace: float) -> None:
        """No new calls; those in flight get `grace` seconds to finish."""
        if self._listener is not None:
            self._listener.close()
        for connection in list(self._connections):
            connection.go_away()
        if self.calls:
            await asyncio.wait(list(self.calls), timeout=grace)
        for connection in list(self._connections):
            connection.abort()

    def _handler(self, path: str, metadata: Metadata) -> Any:
        handler = self._methods.get(path)
        if handler is None:
            details = _CallDetails(path, metadata)
            for generic in self._generic:
                handler = generic.service(details)  # type: ignore[arg-type]
                if handler is not None:
                    self._methods[path] = handler
                    break
        return handler

    def accept(
        self, connection: Http2Connection, stream_id: int, headers: Headers, end_stream: bool
    ) -> http2.StreamListener:
        """A new stream: a call if its headers are a gRPC call's, else answered at once."""
        asked = call_headers(headers)
        if not asked.content_type.startswith(b"application/grpc"):
            connection.send_headers(stream_id, _NOT_GRPC, True)
            return _REFUSED
        handler = self._handler(asked.path, asked.metadata)
        refusal = asked.problem
        if refusal is None:
            if handler is None:
                refusal = grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {asked.path}"
            elif asked.compressed:
                refusal = grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted"
        if refusal is not None:
            block = RESPONSE_HEADERS + trailers(*refusal, ())
            connection.send_headers(stream_id, block, True)
            return _REFUSED
        call = Call(self, connection, stream_id, handler, asked.metadata)
        if asked.timeout is not None:
            call.timer = connection.loop.call_later(asked.timeout, call.expire)
        if end_stream:
            call.data(b"", True)
        return call
