"""One write per response: the transport joins a sized head to its body, passes
everything else through at once, and loses nothing (HEAD, close, keep-alive)."""

import socket

import pytest

from tidegate.connection import _OneWriteTransport

SIZED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


class RecordingTransport:
    """The few calls uvicorn's request cycle makes, recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_a_sized_head_leaves_with_its_body():
    real = RecordingTransport()
    transport = _OneWriteTransport(real)  # type: ignore[arg-type]
    transport.write(SIZED_HEAD)
    assert real.writes == []
    transport.write(b"{}")
    assert real.writes == [SIZED_HEAD + b"{}"]
    transport.write(SIZED_HEAD)  # the next response on the connection
    transport.write(b"[]")
    assert real.writes[1] == SIZED_HEAD + b"[]"


@pytest.mark.parametrize(
    "data",
    [CHUNKED_HEAD, b"HTTP/1.1 100 Continue\r\n\r\n", b"5\r\nhello\r\n", b"body"],
    ids=["chunked head", "100 continue", "chunk", "body"],
)
def test_everything_else_goes_at_once(data: bytes):
    real = RecordingTransport()
    transport = _OneWriteTransport(real)  # type: ignore[arg-type]
    transport.write(data)
    assert real.writes == [data]


def test_a_held_head_is_flushed_on_close_and_on_demand():
    real = RecordingTransport()
    transport = _OneWriteTransport(real)  # type: ignore[arg-type]
    transport.write(SIZED_HEAD)
    transport.flush()
    transport.flush()
    assert real.writes == [SIZED_HEAD]
    transport.write(SIZED_HEAD)
    transport.close()
    assert real.writes == [SIZED_HEAD, SIZED_HEAD]
    assert real.closed
    assert transport.is_closing()
    assert transport.get_extra_info("peername") == "info:peername"


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Sends `request` and reads one response: its head, and the body it announces."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    length = 0 if request.startswith(b"HEAD") else int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_live_keep_alive_through_get_head_and_infer(server):
    """A HEAD response writes no body: its held head must still leave, and the
    connection must go on serving the requests that follow it."""
    infer = (
        b'{"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", '
        b'"data": [' + b",".join([b"1.0"] * 30) + b"]}]}"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
        got = _exchange(sock, b"GET /v2/health/live HTTP/1.1\r\n" + host + b"\r\n")
        assert got.startswith(b"HTTP/1.1 200")
        got = _exchange(sock, b"HEAD /v2/health/live HTTP/1.1\r\n" + host + b"\r\n")
        assert got.startswith(b"HTTP/1.1 200")
        assert got.endswith(b"\r\n\r\n")
        request = (
            b"POST /v2/models/breast_cancer/versions/1/infer HTTP/1.1\r\n"
            + host
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(infer)}\r\n\r\n".encode()
            + infer
        )
        for _ in range(3):
            got = _exchange(sock, request)
            assert got.startswith(b"HTTP/1.1 200"), got
            assert b'"model_version":"1"' in got
