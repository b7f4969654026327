"""tidegate's HTTP/2 client (tidegate.http2_client, `tidegate bench --protocol grpc`'s
transport) against independent servers: grpcio's own server for calls, statuses, large
messages both ways (frames split, windows waited for), a stream limit and cancellation;
and a server scripted with the `h2` library for what grpcio will not do on request
(resets, GOAWAY, pings, an HTTP error status, malformed frames)."""

import asyncio
import os
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import free_port
from tidegate.grpc_wire import length_prefixed
from tidegate.http2 import GOAWAY, WINDOW_UPDATE, ErrorCode, frame
from tidegate.http2_client import Answer, Http2Client, StreamReset
from tidegate.loadgen import OK
from tidegate.loadgen_grpc import call_outcome, request_headers

ECHO = "/test.Echo/Unary"
TIMEOUT = 10.0


def _headers(path: str, address: str) -> bytes:
    return request_headers(address, path.encode())


def _start(client: Http2Client, block: bytes, messages: list[bytes]) -> list[asyncio.Task]:
    """Calls started at once, one per message, to be awaited later."""
    return [asyncio.ensure_future(client.call(block, length_prefixed(m))) for m in messages]


def _body(answer: Answer) -> bytes:
    return b"".join(answer.body)


# -- against grpcio's server ---------------------------------------------------------------


class EchoServer:
    """grpcio's (threaded) server with one method answering its request's bytes; a
    request starting `status:N` is refused with code N, one starting `slow` waits until
    cancelled (and says so)."""

    def __init__(self, max_streams: int) -> None:
        self.cancelled = threading.Event()
        handler = grpc.method_handlers_generic_handler(
            "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(self._answer)}
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            handlers=[handler],
            options=[
                ("grpc.max_concurrent_streams", max_streams),
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20),
            ],
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request.startswith(b"status:"):
            context.abort(grpc.StatusCode(_code(int(request[7:]))), "as asked")
        if request.startswith(b"slow"):
            context.add_callback(self.cancelled.set)
            while context.is_active():
                self.cancelled.wait(0.01)
        return request


def _code(number: int) -> tuple[int, str]:
    return next(code.value for code in grpc.StatusCode if code.value[0] == number)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer(max_streams=4)
    yield server
    server.server.stop(None)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))


def test_calls_of_every_size_come_back_whole(echo: EchoServer):
    # Over 16 KiB a body is split into frames; over 64 KiB it waits for the server's windows.
    sizes = [0, 1, 16_384, 16_385, 70_000, 3 << 20]
    messages = [os.urandom(size) for size in sizes]

    async def scenario() -> None:
        client = await Http2Client.open(*echo.address.split(":"))
        block = _headers(ECHO, echo.address)
        for message in messages:
            answer = await client.call(block, length_prefixed(message))
            assert call_outcome(answer) == OK
            assert _body(answer) == length_prefixed(message)
        client.close()

    _run(scenario)


def test_calls_beyond_the_servers_stream_limit_wait_their_turn(echo: EchoServer):
    # The server allows 4 streams at once; 60 calls at once all complete, in any order.
    messages = [os.urandom(100 + i) for i in range(60)]

    async def scenario() -> None:
        client = await Http2Client.open(*echo.address.split(":"))
        block = _headers(ECHO, echo.address)
        answers = await asyncio.gather(*(client.call(block, length_prefixed(m)) for m in messages))
        assert [_body(a) for a in answers] == [length_prefixed(m) for m in messages]
        client.close()

    _run(scenario)


def test_a_refused_call_names_its_status(echo: EchoServer):
    async def scenario() -> None:
        client = await Http2Client.open(*echo.address.split(":"))
        block = _headers(ECHO, echo.address)
        for code in (5, 3, 8, 14):
            answer = await client.call(block, length_prefixed(b"status:%d" % code))
            assert call_outcome(answer) == grpc.StatusCode(_code(code)).name
        # An unknown method: UNIMPLEMENTED, and the connection serves on.
        unknown = await client.call(_headers("/test.Echo/Nope", echo.address), length_prefixed(b""))
        assert call_outcome(unknown) == "UNIMPLEMENTED"
        after = await client.call(block, length_prefixed(b"after"))
        assert _body(after) == length_prefixed(b"after")
        client.close()

    _run(scenario)


def test_a_cancelled_call_resets_its_stream_and_the_connection_serves_on(echo: EchoServer):
    echo.cancelled.clear()

    async def scenario() -> None:
        client = await Http2Client.open(*echo.address.split(":"))
        block = _headers(ECHO, echo.address)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.call(block, length_prefixed(b"slow")), 0.2)
        assert await asyncio.to_thread(echo.cancelled.wait, 5)
        assert _body(await client.call(block, length_prefixed(b"next"))) == length_prefixed(b"next")
        assert client.usable
        client.close()

    _run(scenario)


def test_a_connection_that_cannot_be_made_is_an_os_error():
    async def scenario() -> None:
        with pytest.raises(ConnectionRefusedError):
            await Http2Client.open("127.0.0.1", free_port())

    _run(scenario)


# -- against a server scripted with h2 -----------------------------------------------------


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        self.writer.write(self.h2.data_to_send())

    async def until(self, done: Callable[[list[h2.events.Event]], bool]) -> None:
        """Reads until the events so far satisfy `done`."""
        while not done(self.events):
            data = await self.reader.read(65_536)
            assert data, "the client closed the connection"
            self.events += self.h2.receive_data(data)
            self.flush()

    async def requests(self, count: int) -> list[int]:
        """The stream ids of the first `count` requests, once each has ended."""

        def ended(events: list[h2.events.Event]) -> list[int]:
            return [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)]

        await self.until(lambda events: len(ended(events)) >= count)
        return ended(self.events)[:count]

    def answer(self, stream_id: int, status: int = 0, body: bytes = b"") -> None:
        self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        self.h2.send_data(stream_id, length_prefixed(body))
        self.h2.send_headers(stream_id, [("grpc-status", str(status))], end_stream=True)
        self.flush()


def _any(events: list[h2.events.Event], kind: type) -> bool:
    return any(isinstance(event, kind) for event in events)


@asynccontextmanager
async def _scripted() -> AsyncIterator[tuple[Peer, str, Http2Client]]:
    """A scripted server's one connection, the client's end of it, and the address."""
    peers: asyncio.Queue[Peer] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peers.put(Peer(reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = await Http2Client.open(*address.split(":"))
    peer = await peers.get()
    try:
        yield peer, address, client
    finally:
        client.close()
        peer.writer.close()
        server.close()
        await server.wait_closed()


def test_answers_statuses_and_resets_from_a_scripted_server():
    async def scenario() -> None:
        async with _scripted() as (peer, address, client):
            block = _headers(ECHO, address)
            calls = _start(client, block, [b"%d" % i for i in range(4)])
            first, second, third, fourth = await peer.requests(4)
            peer.answer(first, 0, b"one")
            peer.answer(second, 9)
            peer.h2.reset_stream(third, error_code=7)  # REFUSED_STREAM
            peer.h2.send_headers(fourth, [(":status", "503")], end_stream=True)
            peer.flush()
            done = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(done[0], Answer)
            assert _body(done[0]) == length_prefixed(b"one")
            assert [call_outcome(a) for a in (done[0], done[1], done[3])] == [
                OK,
                "FAILED_PRECONDITION",
                "UNAVAILABLE",
            ]
            assert isinstance(done[2], StreamReset)
            assert done[2].code == 7
            # A ping is answered.
            peer.h2.ping(b"12345678")
            peer.flush()
            await peer.until(lambda seen: _any(seen, h2.events.PingAckReceived))

    _run(scenario)


def test_a_goaway_fails_the_calls_the_server_did_not_take():
    async def scenario() -> None:
        async with _scripted() as (peer, address, client):
            block = _headers(ECHO, address)
            calls = _start(client, block, [b"x"] * 3)
            first, _, _ = await peer.requests(3)
            peer.writer.write(frame(GOAWAY, 0, 0, struct.pack(">II", first, 0)))  # h2 would stop
            peer.answer(first, 0, b"taken")
            done = await asyncio.gather(*calls, return_exceptions=True)
            assert _body(done[0]) == length_prefixed(b"taken")  # type: ignore[arg-type]
            assert all(isinstance(d, ConnectionResetError) for d in done[1:])
            assert not client.usable
            with pytest.raises(ConnectionResetError):
                await client.call(block, length_prefixed(b"late"))

    _run(scenario)


def test_a_servers_error_on_one_stream_resets_that_stream_alone():
    async def scenario() -> None:
        async with _scripted() as (peer, address, client):
            block = _headers(ECHO, address)
            calls = _start(client, block, [b"x"] * 2)
            first, second = await peer.requests(2)
            peer.writer.write(frame(WINDOW_UPDATE, 0, first, bytes(4)))  # an increment of 0
            with pytest.raises(StreamReset) as reset:
                await calls[0]
            assert reset.value.code == ErrorCode.PROTOCOL_ERROR
            await peer.until(lambda seen: _any(seen, h2.events.StreamReset))
            peer.answer(second, 0, b"fine")
            assert _body(await calls[1]) == length_prefixed(b"fine")
            assert client.usable

    _run(scenario)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (frame(6, 0, 0, b"short"), "a PING of 5 bytes"),
        # Only the header: the client refuses it on its length (bytes it had not read
        # would turn its close into a TCP reset that could lose its GOAWAY).
        ((16_385).to_bytes(3, "big") + bytes(6), "a frame over the 16 KiB this side allows"),
        (frame(5, 4, 1, b"\0\0\0\2"), "a push, disabled by this side"),
        (frame(1, 5, 2, b"\x88"), "an answer on a stream the client never opened"),
        (frame(1, 4, 1, b"\xff\xff\xff\xff"), "a header block HPACK cannot decode"),
    ],
)
def test_a_malformed_frame_ends_the_connection_and_fails_its_calls(raw: bytes, what: str):
    async def scenario() -> None:
        async with _scripted() as (peer, address, client):
            [call] = _start(client, _headers(ECHO, address), [b"x"])
            await peer.requests(1)
            peer.writer.write(raw)
            with pytest.raises(ConnectionResetError):
                await call
            # The client said why, with a GOAWAY, and closed.
            events = peer.h2.receive_data(await peer.reader.read())
            goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert len(goaway) == 1, what
            assert goaway[0].error_code != 0, what
            assert not client.usable

    _run(scenario)


# Frames of any type, flags, stream and payload: malformed and plausible.
_ANY_FRAME = st.builds(
    frame,
    st.integers(0, 10),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 7, 99]),
    st.binary(max_size=40),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ANY_FRAME, max_size=8))
def test_any_frames_end_every_call_in_an_answer_or_an_error(frames: list[bytes]):
    """Whatever the server sends before it closes, each call ends (an answer, a reset,
    the connection lost) and nothing escapes into the event loop's log."""
    escaped: list[dict] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: escaped.append(context))
        async with _scripted() as (peer, address, client):
            block = _headers(ECHO, address)
            calls = _start(client, block, [b"x"] * 3)
            first, second, _ = await peer.requests(3)
            peer.answer(first, 0, b"before")
            peer.writer.write(b"".join(frames))
            peer.answer(second, 0, b"after")
            peer.writer.close()
            done = await asyncio.gather(*calls, return_exceptions=True)
            assert _body(done[0]) == length_prefixed(b"before")  # type: ignore[arg-type]
            for outcome in done[1:]:
                assert isinstance(outcome, Answer | StreamReset | ConnectionResetError), outcome

    _run(scenario)
    assert not escaped
