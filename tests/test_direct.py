"""Infer requests answered by the connection itself (`tidegate.direct`), checked over
raw sockets against a real `tidegate serve`: answers equal onnxruntime's, pipelined
requests are answered in order (mixed with requests that take the ASGI cycle), large
bodies arrive through flow control, oversized bodies get 413, a client that leaves
mid-body costs nothing, and what the direct path hands to uvicorn's cycle (100-continue,
other methods, the access log) is still answered."""

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LiveServer, serving_a_copy
from tests.shipped import (
    ShippedVersion,
    assert_same_output,
    expected_outputs,
    json_request,
    reference_rows,
)

WINE = ShippedVersion("wine", 1)
DIGITS = ShippedVersion("digits", 1)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class Connection:
    """One keep-alive connection that reads answers by their content-length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-head: {self.buffer!r}"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines)
        if status_line.split()[1] == "100":
            return Answer(100, headers, b"")
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(int(status_line.split()[1]), headers, body)

    def closed_by_server(self) -> bool:
        return self.buffer == b"" and not self._fill()


def post(path: str, body: bytes, *extra: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    head = [
        b"POST " + path.encode() + b" " + version,
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def wine_body(rows: int, start: int = 0) -> tuple[bytes, np.ndarray]:
    """A JSON request for wine rows, and onnxruntime's labels for them."""
    feeds = reference_rows(WINE, rows, start)
    body = json.dumps(json_request("input", "FP32", feeds["input"])).encode()
    return body, expected_outputs(WINE, {"input": feeds["input"]})["label"]


def assert_labels(answer: Answer, expected: np.ndarray) -> None:
    assert answer.status == 200, answer.body
    (output,) = [o for o in answer.json()["outputs"] if o["name"] == "label"]
    got = np.array(output["data"], dtype=expected.dtype).reshape(output["shape"])
    assert_same_output(got, expected)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serving_a_copy(tmp_path_factory.mktemp("direct")) as server:
        yield server


@pytest.fixture
def connection(live: LiveServer) -> Iterator[Connection]:
    with Connection(live.port) as opened:
        yield opened


def test_requests_on_one_connection_are_answered_in_turn(connection: Connection):
    """Forty in turn: each arrives alone and is answered within its read, but every
    16th is queued to look for company (`batcher.PROBE_EVERY`) and waits for its run
    in a task (`eager`)."""
    for start in range(0, 40 * 3, 3):
        body, expected = wine_body(3, start)
        connection.sock.sendall(post("/v2/models/wine/infer", body))
        answer = connection.answer()
        assert_labels(answer, expected)
        assert answer.json()["model_version"] == "1"
        assert "connection" not in answer.headers  # kept alive


def test_pipelined_requests_are_answered_in_order(connection: Connection):
    """Infer requests (direct) and health and metadata requests (ASGI) in one write."""
    bodies = [wine_body(3, start) for start in range(0, 30, 3)]
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    metadata = b"GET /v2/models/wine HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    stream = b""
    for index, (body, _) in enumerate(bodies):
        stream += post("/v2/models/wine/versions/1/infer", body)
        stream += (ready, metadata)[index % 2]
    connection.sock.sendall(stream)
    for index, (_, expected) in enumerate(bodies):
        assert_labels(connection.answer(), expected)
        other = connection.answer()
        assert other.status == 200
        if index % 2:
            assert other.json()["name"] == "wine"


def test_a_large_body_arriving_slowly_is_read_whole(connection: Connection):
    """Well past the 64 KiB after which uvicorn pauses reading until the body is read."""
    feeds = reference_rows(DIGITS, 256)["input"]  # its max_batch_size
    body = json.dumps(json_request("input", "FP32", feeds)).encode()
    assert len(body) > 65536
    request = post("/v2/models/digits/infer", body)
    for offset in range(0, len(request), 40_000):
        connection.sock.sendall(request[offset : offset + 40_000])
        time.sleep(0.005)
    answer = connection.answer()
    assert answer.status == 200, answer.body
    expected = expected_outputs(DIGITS, {"input": feeds})
    for output in answer.json()["outputs"]:
        want = expected[output["name"]]
        got = np.array(output["data"], dtype=want.dtype).reshape(output["shape"])
        assert_same_output(got, want)


def test_a_percent_encoded_path_is_decoded(connection: Connection):
    body, expected = wine_body(2)
    connection.sock.sendall(post("/v2/models/%77ine/infer", body))
    assert_labels(connection.answer(), expected)


@pytest.mark.parametrize(
    ("version", "extra"),
    [(b"HTTP/1.0", ()), (b"HTTP/1.1", (b"Connection: close",))],
    ids=["http-1.0", "connection-close"],
)
def test_a_connection_not_kept_alive_gets_its_answer_and_a_close(
    live: LiveServer, version: bytes, extra: tuple[bytes, ...]
):
    body, expected = wine_body(2)
    with Connection(live.port) as opened:
        opened.sock.sendall(post("/v2/models/wine/infer", body, *extra, version=version))
        answer = opened.answer()
        assert_labels(answer, expected)
        assert answer.headers["connection"] == "close"
        assert opened.closed_by_server()


def test_expect_100_continue_is_answered(connection: Connection):
    body, expected = wine_body(4)
    request = post("/v2/models/wine/infer", body, b"Expect: 100-continue")
    head, _, rest = request.partition(b"\r\n\r\n")
    connection.sock.sendall(head + b"\r\n\r\n")
    assert connection.answer().status == 100
    connection.sock.sendall(rest)
    assert_labels(connection.answer(), expected)


def test_other_methods_on_an_infer_path_get_405(connection: Connection):
    connection.sock.sendall(b"GET /v2/models/wine/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = connection.answer()
    assert answer.status == 405
    assert "error" in answer.json()


def test_bad_bodies_get_a_v2_error_and_the_connection_stays(connection: Connection):
    for body, words in [
        (b"{not json", "JSON"),
        (b'{"inputs": []}', "input"),
        (b"", "JSON"),
    ]:
        connection.sock.sendall(post("/v2/models/wine/infer", body))
        answer = connection.answer()
        assert answer.status == 400, answer.body
        assert words in answer.json()["error"]
    connection.sock.sendall(post("/v2/models/nosuch/infer", b"{}"))
    answer = connection.answer()
    assert answer.status == 404
    assert "nosuch" in answer.json()["error"]
    body, expected = wine_body(3)
    connection.sock.sendall(post("/v2/models/wine/infer", body))
    assert_labels(connection.answer(), expected)


def test_a_client_leaving_mid_body_leaves_the_server_healthy(live: LiveServer):
    body, expected = wine_body(50)
    for _ in range(20):
        with Connection(live.port) as opened:
            opened.sock.sendall(post("/v2/models/wine/infer", body)[: len(body) // 2])
    time.sleep(0.2)
    with Connection(live.port) as opened:
        opened.sock.sendall(post("/v2/models/wine/infer", body))
        assert_labels(opened.answer(), expected)
    assert "Traceback" not in live.log()


def test_a_body_over_the_limit_gets_413(models_dir: Path, start_server):
    live = start_server(models_dir, "--max-body-size", "2000")
    small, expected = wine_body(2)
    large, _ = wine_body(40)
    assert len(small) < 2000 < len(large)
    with Connection(live.port) as opened:
        opened.sock.sendall(post("/v2/models/wine/infer", large))
        answer = opened.answer()
        assert answer.status == 413
        assert "2000" in answer.json()["error"]
        if not opened.closed_by_server():  # kept alive: the connection still serves
            opened.sock.sendall(post("/v2/models/wine/infer", small))
            assert_labels(opened.answer(), expected)
    assert live.client.get("/v2/health/ready").status_code == 200


def test_with_the_access_log_infer_is_answered_and_logged(models_dir: Path, start_server):
    live = start_server(models_dir, "--access-log")
    body, expected = wine_body(2)
    with Connection(live.port) as opened:
        opened.sock.sendall(post("/v2/models/wine/infer", body))
        assert_labels(opened.answer(), expected)
    deadline = time.monotonic() + 10
    while "POST /v2/models/wine/infer" not in live.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'POST /v2/models/wine/infer HTTP/1.1" 200' in live.log()


def test_an_idle_connection_closes_after_the_keep_alive_timeout(models_dir: Path, start_server):
    """Closed by the server `--keep-alive-timeout` seconds after its last response,
    not before; a connection in use stays open however long it lives, whether its
    requests are answered directly (infer) or through the ASGI cycle (metadata), and
    so does one whose request takes longer than the timeout to arrive."""
    live = start_server(models_dir, "--keep-alive-timeout", "1")
    body, expected = wine_body(2)
    metadata = b"GET /v2/models/wine HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with Connection(live.port) as busy:
        started = time.monotonic()
        index = 0
        while time.monotonic() - started < 2.5:  # over twice the timeout, in use
            if index % 2:
                busy.sock.sendall(metadata)
                assert busy.answer().status == 200
            else:
                busy.sock.sendall(post("/v2/models/wine/infer", body))
                assert_labels(busy.answer(), expected)
            index += 1
            time.sleep(0.3)
        # A request whose body is slower to come than the timeout is not idleness.
        request = post("/v2/models/wine/infer", body)
        busy.sock.sendall(request[:-10])
        time.sleep(1.5)
        busy.sock.sendall(request[-10:])
        assert_labels(busy.answer(), expected)
        answered = time.monotonic()
        busy.sock.settimeout(5)
        assert busy.closed_by_server()  # blocks until the server closes it
        idle = time.monotonic() - answered
    assert 0.9 <= idle < 2.0, f"closed after {idle:.2f} s idle, the timeout is 1 s"
