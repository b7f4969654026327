"""tidegate.grpc_wire as a gRPC server of its own, with grpcio's client: method handlers
as grpcio takes them, including those without a (de)serializer, which pass bytes as
they are (grpc_floor.py's handlers are such)."""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from tests.conftest import free_port
from tidegate.grpc_wire import GrpcServer

SERVICE = "test.Bytes"


async def _reversed(request: bytes, context: object) -> bytes:
    return request[::-1]


async def _each_doubled(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request * 2


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """A GrpcServer on its own event loop in a thread, serving bytes-only handlers."""
    loop = asyncio.new_event_loop()
    port = free_port()
    server = GrpcServer(max_message_bytes=1 << 20, busy_poll=None)
    methods = {
        "Reverse": grpc.unary_unary_rpc_method_handler(_reversed),
        "Double": grpc.stream_stream_rpc_method_handler(_each_doubled),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", port), loop).result(10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_a_unary_handler_without_serializers_answers_bytes(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reverse = channel.unary_unary(f"/{SERVICE}/Reverse")
        assert reverse(b"tidegate", timeout=10) == b"etagedit"
        assert reverse(b"", timeout=10) == b""


def test_a_streaming_handler_without_serializers_answers_bytes(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        double = channel.stream_stream(f"/{SERVICE}/Double")
        answers = list(double(iter([b"a", b"bc", b"def"]), timeout=10))
    assert answers == [b"aa", b"bcbc", b"defdef"]
