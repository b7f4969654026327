"""HTTP that never reaches the application: malformed requests and oversized heads
get the V2 JSON error (400, 414, 431) and a closed connection, from a real
`tidegate serve`; requests within the limits are served, however their head arrives."""

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import LiveServer, serving_a_copy
from tests.shipped import ShippedVersion, reference_rows
from tidegate.connection import _KNOWN_TARGETS, _infer_targets, infer_path

READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        assert self.headers["content-type"] == "application/json"
        document = json.loads(self.body)
        assert set(document) == {"error"}
        return str(document["error"])


def send(port: int, *parts: bytes, pause: float = 0.0) -> Answer:
    """Sends `parts` (each its own write, `pause` seconds apart, so that the server
    reads them separately) and reads until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before the whole request was sent: read the answer
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # the rest of our request arrived after the close
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return Answer(int(status_line.split()[1]), headers, body)


def headers(count: int, size: int = 1) -> bytes:
    return b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * size) for i in range(count))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serving_a_copy(tmp_path_factory.mktemp("connection")) as server:
        yield server


# (id, request bytes, status, words the error must contain)
REFUSED = [
    ("unknown-method", b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Invalid method"),
    ("not-http", b"hello there\r\n\r\n", 400, "malformed HTTP request"),
    ("bad-version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "Invalid HTTP version"),
    ("control-in-target", b"GET /v2\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "url"),
    ("space-in-name", b"GET /v2 HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "header token"),
    (
        "length-and-chunked",
        b"POST /v2 HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "Content-Length",
    ),
    (
        "long-target",
        b"GET /v2/" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "request target is longer than the limit of 32768 bytes",
    ),
    (
        "large-headers",
        READY + headers(40, 1000) + b"\r\n",
        431,
        "larger than the limit of 32768 bytes (--max-header-size), at header 'x-filler-32'",
    ),
    (
        "many-headers",
        READY + headers(99) + b"\r\n",  # 101 fields
        431,
        "more than 100 request header fields (--max-headers)",
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"), [pytest.param(*c[1:], id=c[0]) for c in REFUSED]
)
def test_refused_requests_get_a_json_error_and_a_closed_connection(
    live: LiveServer, request_bytes, status, words
):
    answer = send(live.port, request_bytes)
    assert answer.status == status
    assert answer.headers["connection"] == "close"
    assert words in answer.error()
    assert int(answer.headers["content-length"]) == len(answer.body)


def test_heads_within_the_limits_are_served_however_they_arrive(live: LiveServer):
    full = READY + headers(98, 300) + b"\r\n"  # 100 fields, under 32 KiB: just fits
    assert send(live.port, full).status == 200
    pieces = [full[i : i + 1000] for i in range(0, len(full), 1000)]
    assert send(live.port, *pieces, pause=0.01).status == 200  # summed, not refused
    over = READY + headers(98, 340) + b"\r\n"
    answer = send(live.port, *[over[i : i + 1000] for i in range(0, len(over), 1000)], pause=0.01)
    assert answer.status == 431
    assert "32768 bytes" in answer.error()


def test_a_header_line_that_never_ends_is_refused_while_it_arrives(live: LiveServer):
    endless = [READY + b"X-Endless: "] + [b"v" * 16384] * 64  # 1 MiB, no line end
    answer = send(live.port, *endless, pause=0.002)
    assert answer.status == 431
    assert "larger than the limit of 32768 bytes" in answer.error()
    target = [b"GET /v2/"] + [b"a" * 16384] * 64  # a target that never ends
    answer = send(live.port, *target, pause=0.002)
    assert answer.status == 414


def test_the_server_is_healthy_after_refusals(live: LiveServer):
    for _, request_bytes, _, _ in REFUSED:
        send(live.port, request_bytes)
    assert live.client.get("/v2/health/ready").status_code == 200
    shipped = ShippedVersion("digits", 1)
    rows = reference_rows(shipped, 2)["input"]
    triton = httpclient.InferenceServerClient(live.url)
    infer_input = httpclient.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    labels = triton.infer("digits", [infer_input]).as_numpy("label")
    assert labels is not None
    assert labels.shape == (2,)
    triton.close()
    log = Path(live.log_path).read_text()
    assert "Traceback" not in log
    assert "refused a request: 400 malformed HTTP request: Invalid method" in log


def test_the_limits_are_options_of_serve(models_dir: Path, start_server):
    live = start_server(models_dir, "--max-header-size", "2048", "--max-headers", "10")
    assert send(live.port, READY + headers(8) + b"\r\n").status == 200  # 10 fields
    answer = send(live.port, READY + headers(9) + b"\r\n")
    assert answer.status == 431
    assert "more than 10 request header fields" in answer.error()
    answer = send(live.port, READY + b"X-Big: " + b"v" * 2100 + b"\r\n\r\n")
    assert answer.status == 431
    assert "limit of 2048 bytes (--max-header-size), at header 'x-big'" in answer.error()
    answer = send(live.port, b"GET /" + b"a" * 2100 + b" HTTP/1.1\r\n\r\n")
    assert answer.status == 414
    # An ordinary client's head is far smaller.
    rows = reference_rows(ShippedVersion("breast_cancer", 2), 1)["input"]
    triton = httpclient.InferenceServerClient(live.url)
    infer_input = httpclient.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows, binary_data=True)
    probabilities = triton.infer("breast_cancer", [infer_input]).as_numpy("probabilities")
    assert probabilities is not None
    assert np.isclose(probabilities.sum(), 1.0)
    triton.close()


def test_infer_paths_are_parsed_once_and_remembered_within_a_bound():
    """`infer_path` decodes a target's path and tells infer paths apart; it remembers
    what it parsed, but never more than its bound, however many targets clients send."""
    assert infer_path(b"/v2/models/wine/infer") == ("/v2/models/wine/infer", ("wine", None))
    assert infer_path(b"/v2/models/wine/versions/2/infer?x=1") == (
        "/v2/models/wine/versions/2/infer",
        ("wine", "2"),
    )
    assert infer_path(b"/v2/models/w%20ine/infer") == ("/v2/models/w ine/infer", ("w ine", None))
    assert infer_path(b"/v2/models/wine/ready") == ("/v2/models/wine/ready", None)
    assert infer_path(b"/v2/models/wine/infer") is infer_path(b"/v2/models/wine/infer")
    for index in range(3 * _KNOWN_TARGETS):
        target = f"/v2/models/m{index}/infer".encode()
        assert infer_path(target) == (target.decode(), (f"m{index}", None))
        assert len(_infer_targets) <= _KNOWN_TARGETS
