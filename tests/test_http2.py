"""tidegate's HTTP/2 layer (tidegate.http2) against a real `tidegate serve`, with the
`h2` library as the client on a plain socket instead of grpcio: the frames grpcio never
sends (CONTINUATION, padding, unknown types, a tiny window, an overrun window, malformed
and forbidden frames, more streams than allowed) and what the server must answer to
them. Every frame the server sends is also parsed by hyperframe on its own, so that the
tests see what h2 hides (frame sizes, frames on streams h2 does not know). Answers are
compared with onnxruntime run directly on the model. Last, hypothesis sends sequences of
frames, malformed and plausible, and the server must answer, or end the connection in
order, and go on serving."""

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings, strategies as st
from tritonclient.grpc import service_pb2

from tests import shipped as catalog
from tests.conftest import LiveServer
from tests.test_grpc import WINE, _serve

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DTYPES = {"FP32": np.float32, "INT64": np.int64}
AFrame = TypeVar("AFrame", bound=Frame)
TIMEOUT = 10.0  # seconds any one awaited event may take before a test fails
_FRAME_HEAD = struct.Struct(">IBI")  # a frame's 24-bit length and type, flags, stream id


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module. Its body limit is set well past the 4 MiB stream window
    (whatever the default), so that a request body may outgrow the window."""
    server = _serve(tmp_path_factory.mktemp("http2"), "--max-body-size", "20000000")
    yield server
    server.stop()


# -- requests and answers ----------------------------------------------------------------


def _rows(count: int, start: int = 0) -> np.ndarray:
    """Wine's reference rows (133 of them), the model's input."""
    return catalog.reference_rows(WINE, count, start)["input"]


def _message(body: bytes) -> bytes:
    """gRPC's framing of one message: uncompressed, 4-byte big-endian length."""
    return b"\0" + len(body).to_bytes(4, "big") + body


def _request(rows: np.ndarray, request_id: str = "") -> bytes:
    """A ModelInfer request for wine, framed as one gRPC message."""
    request = service_pb2.ModelInferRequest(model_name="wine", model_version="1", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return _message(request.SerializeToString())


def _request_headers(authority: str, path: str, content_type: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", content_type),
        ("te", "trailers"),
    ]


def _assert_wine(response: service_pb2.ModelInferResponse, rows: np.ndarray) -> None:
    """The response's outputs are onnxruntime's for `rows`, output by output."""
    expected = catalog.expected_outputs(WINE, {"input": rows})
    got = {
        output.name: np.frombuffer(raw, DTYPES[output.datatype]).reshape(tuple(output.shape))
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        catalog.assert_same_output(got[name], array)


def _one_message(data: bytes) -> bytes:
    """The body of the one gRPC message `data` must hold exactly."""
    assert data[:1] == b"\0", data[:16]
    assert int.from_bytes(data[1:5], "big") == len(data) - 5
    return data[5:]


@dataclass
class Answer:
    """What the server sent on one stream, as h2 reports it."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    def status(self) -> tuple[grpc.StatusCode, str]:
        """The call's status and message: from the trailers, or from the headers of a
        trailers-only answer."""
        assert self.ended, f"reset with {self.reset}" if self.reset is not None else "not ended"
        fields = self.trailers or self.headers
        code = next(c for c in grpc.StatusCode if str(c.value[0]) == fields["grpc-status"])
        return code, fields.get("grpc-message", "")

    def response(self) -> service_pb2.ModelInferResponse:
        """The ModelInfer response of a call that succeeded: :status 200, one message,
        grpc-status 0 in the trailers."""
        assert self.reset is None, f"reset with {self.reset}"
        assert self.ended
        assert self.headers.get(":status") == "200", self.headers
        assert self.headers.get("content-type") == "application/grpc", self.headers
        assert self.trailers.get("grpc-status") == "0", self.trailers
        return service_pb2.ModelInferResponse.FromString(_one_message(bytes(self.data)))


# -- frames --------------------------------------------------------------------------------


def _frames(buffer: bytearray) -> list[Frame]:
    """The whole frames at the start of `buffer`, removed from it; independent of h2."""
    frames = []
    while len(buffer) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(bytes(buffer[:9])))
        if len(buffer) < 9 + length:
            break
        frame.parse_body(memoryview(bytes(buffer[9 : 9 + length])))
        del buffer[: 9 + length]
        frames.append(frame)
    return frames


def _block(path: str = INFER, authority: str = "127.0.0.1") -> bytes:
    """A request's header block from a fresh hpack Encoder, every field never indexed:
    it refers to the static table only and adds nothing to the server's dynamic table,
    so it can be sent beside h2's own blocks on one connection."""
    pairs = _request_headers(authority, path, "application/grpc")
    return bytes(Encoder().encode([NeverIndexedHeaderTuple(n, v) for n, v in pairs]))


def _unknown(kind: int, stream_id: int, body: bytes) -> ExtensionFrame:
    """A frame of a type HTTP/2 does not define, every flag bit set (hyperframe
    serializes an extension frame only once it has parsed its body)."""
    frame = ExtensionFrame(kind, stream_id, flag_byte=0xFF)
    frame.parse_body(memoryview(body))
    return frame


def _serialized(*frames: Frame | bytes) -> bytes:
    return b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)


def _address(server: LiveServer) -> tuple[str, int]:
    host, port = server.grpc_url.rsplit(":", 1)  # type: ignore[attr-defined]
    assert host == "127.0.0.1"
    return host, int(port)


def _exchange(server: LiveServer, data: bytes) -> tuple[list[Frame], bool]:
    """Sends raw bytes on a new connection and reads until the server closes it: the
    frames it sent, and whether it closed within TIMEOUT."""
    received = bytearray()
    with socket.create_connection(_address(server), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + TIMEOUT
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                break
            received += chunk
            closed = not chunk
    return _frames(received), closed


def _assert_goaway(frames: list[Frame], closed: bool, code: ErrorCodes) -> None:
    """The server ended the connection: one GOAWAY with `code`, its last frame, then EOF."""
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert len(goaways) == 1, frames
    assert frames[-1] is goaways[0], frames
    assert ErrorCodes(goaways[0].error_code) == code, goaways[0].additional_data
    assert closed, "the server kept the connection open after its GOAWAY"


# -- an h2 client --------------------------------------------------------------------------


class Client:
    """An h2 client connection to the server's gRPC port, on a plain socket. It records
    what h2 reports per stream (`answers`), h2's events, and every frame the server sent
    as hyperframe parses it (`frames`). With `credit`, the data received is handed back
    to h2's window management at once (h2 then sends WINDOW_UPDATEs as it sees fit);
    without, the test opens the windows itself."""

    def __init__(
        self,
        server: LiveServer,
        settings: dict[SettingCodes, int] | None = None,
        credit: bool = True,
    ) -> None:
        self.authority = server.grpc_url  # type: ignore[attr-defined]
        self.sock = socket.create_connection(_address(server), timeout=TIMEOUT)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.credit = credit
        self.answers: dict[int, Answer] = {}
        self.events: list[h2.events.Event] = []
        self.frames: list[Frame] = []
        self.closed = False
        self._unparsed = bytearray()
        self.flush()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def raw(self, *frames: Frame | bytes) -> None:
        """Frames behind h2's back (after what h2 has queued)."""
        self.flush()
        self.sock.sendall(_serialized(*frames))

    def start(
        self,
        message: bytes | None = None,
        *,
        path: str = INFER,
        content_type: str = "application/grpc",
        end: bool = True,
        headers_as: Callable[[HeadersFrame], list[Frame]] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """Opens a stream with a request's HEADERS and `metadata` (sent as `headers_as`
        rewrites h2's frame, if given), then sends `message` as its body; returns the
        stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.answers[stream_id] = Answer()
        headers = _request_headers(self.authority, path, content_type) + list(metadata)
        self.conn.send_headers(stream_id, headers)
        if headers_as is None:
            self.flush()
        else:
            out: list[Frame] = []
            for frame in _frames(bytearray(self.conn.data_to_send())):
                if isinstance(frame, HeadersFrame) and frame.stream_id == stream_id:
                    out += headers_as(frame)
                else:
                    out.append(frame)
            self.sock.sendall(_serialized(*out))
        if message is not None:
            self.send(stream_id, message, end)
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """DATA as fast as the server's windows let h2 send it."""
        rest = memoryview(data)
        while True:
            room = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if rest and room <= 0:
                self.pump(
                    lambda: self.conn.local_flow_control_window(stream_id) > 0,
                    f"a window to send on stream {stream_id}",
                )
                continue
            chunk, rest = rest[:room], rest[room:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=end and not rest)
            self.flush()
            if not rest:
                return

    def call(
        self,
        message: bytes,
        *,
        content_type: str = "application/grpc",
        headers_as: Callable[[HeadersFrame], list[Frame]] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Answer:
        """A whole call: its answer once the stream ended."""
        stream_id = self.start(
            message, content_type=content_type, headers_as=headers_as, metadata=metadata
        )
        answer = self.answers[stream_id]
        self.pump(lambda: answer.done, f"the answer on stream {stream_id}")
        return answer

    def pump(self, until: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Reads and handles what the server sends until `until()` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or not self._receive(left):
                raise AssertionError(f"no {what} within {timeout} s; frames: {self.frames[-8:]}")
            if self.closed and not until():
                raise AssertionError(f"the connection closed before {what}: {self.frames[-8:]}")

    def idle(self, seconds: float) -> None:
        """Handles whatever the server sends for `seconds` (to show it sends nothing)."""
        deadline = time.monotonic() + seconds
        while not self.closed and (left := deadline - time.monotonic()) > 0:
            self._receive(left)

    def _receive(self, timeout: float) -> bool:
        """One read; False if nothing came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(TIMEOUT)
        if not data:
            self.closed = True
            return True
        self._unparsed += data
        self.frames += _frames(self._unparsed)
        for event in self.conn.receive_data(data):
            self._handle(event)
        self.flush()
        return True

    def _handle(self, event: h2.events.Event) -> None:
        self.events.append(event)
        stream_id = getattr(event, "stream_id", None)
        answer = self.answers.setdefault(stream_id, Answer()) if stream_id else Answer()
        if isinstance(event, h2.events.ResponseReceived):
            answer.headers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.TrailersReceived):
            answer.trailers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            answer.data += event.data or b""
            if self.credit and event.flow_controlled_length and event.stream_id:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset):
            answer.reset = event.error_code

    def server_frames(self, kind: type[AFrame], stream_id: int | None = None) -> list[AFrame]:
        """The frames of a type (on a stream) the server sent, in order."""
        return [
            f
            for f in self.frames
            if isinstance(f, kind) and (stream_id is None or f.stream_id == stream_id)
        ]


def _assert_serves(server: LiveServer) -> None:
    """A fresh connection's call is answered, and answered right."""
    rows = _rows(5, 40)
    with Client(server) as client:
        _assert_wine(client.call(_request(rows)).response(), rows)


# -- the tests -----------------------------------------------------------------------------


def test_a_call_over_h2_answers_what_onnxruntime_does(live: LiveServer) -> None:
    rows = _rows(17)
    with Client(live) as client:
        answer = client.call(_request(rows, "h2-call"))
    response = answer.response()
    assert (response.model_name, response.model_version, response.id) == ("wine", "1", "h2-call")
    _assert_wine(response, rows)
    assert answer.trailers["grpc-status"] == "0"
    assert answer.trailers["tidegate-model-version"] == "1"


def test_settings_are_as_advertised_acked_and_pings_answered(live: LiveServer) -> None:
    with Client(live) as client:
        client.raw(PingFrame(0, b"unasked!", flags=["ACK"]))  # an ACK is never answered
        client.conn.ping(b"answerme")
        client.flush()
        client.pump(
            lambda: (
                any(isinstance(e, h2.events.SettingsAcknowledged) for e in client.events)
                and any(isinstance(e, h2.events.PingAckReceived) for e in client.events)
                and client.conn.outbound_flow_control_window > 65_535
            ),
            "the SETTINGS ACK, PING ACK and connection WINDOW_UPDATE",
        )
        first = client.frames[0]
        assert isinstance(first, SettingsFrame)  # the server's preface
        assert "ACK" not in first.flags
        assert dict(first.settings) == {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.MAX_CONCURRENT_STREAMS: 1024,
            SettingCodes.INITIAL_WINDOW_SIZE: 4 << 20,
            SettingCodes.MAX_HEADER_LIST_SIZE: 16 << 10,
        }
        remote = client.conn.remote_settings
        assert remote.max_concurrent_streams == 1024
        assert remote.initial_window_size == 4 << 20
        assert remote.enable_push == 0
        assert remote.max_header_list_size == 16 << 10
        assert client.conn.outbound_flow_control_window == 64 << 20
        acks = [f for f in client.server_frames(SettingsFrame) if "ACK" in f.flags]
        assert len(acks) == 1
        assert acks[0].settings == {}
        pings = client.server_frames(PingFrame)
        assert [(p.opaque_data, "ACK" in p.flags) for p in pings] == [(b"answerme", True)]
        assert pings[0].stream_id == 0


def test_the_server_sends_no_more_than_the_clients_window(live: LiveServer) -> None:
    """A 16-byte stream window: 16 bytes come and then nothing until WINDOW_UPDATE; a
    small update lets exactly that much more through; one large update lets the rest of
    a ~70 kB answer through, in frames of at most 16 KiB, with no further update."""
    rows = _rows(133)
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: 16}
    with Client(live, settings=settings, credit=False) as client:
        client.conn.increment_flow_control_window(1 << 20)  # the connection's is no limit
        stream_id = client.start(_request(rows, "w" * 65_000))
        answer = client.answers[stream_id]
        client.pump(lambda: len(answer.data) >= 16, "the first 16 bytes")
        client.idle(0.3)
        assert len(answer.data) == 16
        assert not answer.done
        assert answer.trailers == {}
        total = 5 + int.from_bytes(answer.data[1:5], "big")
        assert total > 65_000

        client.conn.increment_flow_control_window(1000, stream_id)
        client.flush()
        client.pump(lambda: len(answer.data) >= 1016, "the next 1000 bytes")
        client.idle(0.1)
        assert len(answer.data) == 1016  # h2 itself fails a frame past its window
        assert not answer.done

        client.conn.increment_flow_control_window(total - 1016, stream_id)
        client.flush()
        client.pump(lambda: answer.done, "the rest of the answer after one WINDOW_UPDATE")
        assert len(answer.data) == total
        data_frames = client.server_frames(DataFrame, stream_id)
        assert sum(len(f.data) for f in data_frames) == total
        assert all(len(f.data) <= 16_384 for f in data_frames)
        assert [len(f.data) for f in data_frames[:2]] == [16, 1000]
        trailers = client.server_frames(HeadersFrame, stream_id)[-1]
        assert client.frames.index(trailers) > client.frames.index(data_frames[-1])
    response = answer.response()
    assert response.id == "w" * 65_000
    _assert_wine(response, rows)


def test_a_body_past_the_stream_window_completes(live: LiveServer) -> None:
    """A 5 MB request (wine rows and a 5 MB id, which the answer echoes) through a 4 MiB
    stream window: h2 sends only what the window allows, so it completes only if the
    server credits the stream as the body arrives."""
    rows = _rows(7)
    request_id = np.random.default_rng(7).bytes(2_500_000).hex()
    message = _request(rows, request_id)
    assert len(message) > 4 << 20
    with Client(live) as client:
        stream_id = client.start(message)
        answer = client.answers[stream_id]
        client.pump(lambda: answer.done, "the answer to a 5 MB request")
        updates = client.server_frames(WindowUpdateFrame, stream_id)
    response = answer.response()
    assert response.id == request_id
    _assert_wine(response, rows)
    assert updates, "the request completed without the server crediting its stream"
    assert all(u.window_increment > 0 for u in updates)


def test_data_past_the_stream_window_is_a_flow_control_error(live: LiveServer) -> None:
    """DATA frames each holding a whole gRPC message, on a unary call: the server holds
    messages a unary call has not read yet, so it credits none, and the window the client
    was given stays the initial 4 MiB. 256 full frames fill it; the 257th overruns it."""
    frame_body = _message(b"\0" * (16_384 - 5))
    with Client(live) as client:
        stream_id = client.start(end=False)
        client.raw(*[DataFrame(stream_id, frame_body) for _ in range(257)])
        answer = client.answers[stream_id]
        client.pump(lambda: answer.done, "the RST_STREAM of the overrun stream")
        assert answer.reset == ErrorCodes.FLOW_CONTROL_ERROR
        assert not client.server_frames(WindowUpdateFrame, stream_id)
        assert not client.server_frames(GoAwayFrame)
        # A stream error: the connection goes on.
        rows = _rows(3)
        _assert_wine(client.call(_request(rows)).response(), rows)


def _split_into_continuations(frame: HeadersFrame) -> list[Frame]:
    """h2's HEADERS as HEADERS + two CONTINUATIONs, cut mid-field."""
    block = frame.data
    cuts = [0, len(block) // 3, 2 * len(block) // 3, len(block)]
    flags = [f for f in frame.flags if f != "END_HEADERS"]
    return [
        HeadersFrame(frame.stream_id, block[: cuts[1]], flags=flags),
        ContinuationFrame(frame.stream_id, block[cuts[1] : cuts[2]]),
        ContinuationFrame(frame.stream_id, block[cuts[2] :], flags=["END_HEADERS"]),
    ]


def test_a_header_block_over_headers_and_continuations(live: LiveServer) -> None:
    rows = _rows(4)
    with Client(live) as client:
        answer = client.call(_request(rows), headers_as=_split_into_continuations)
        # The server's HPACK state survived the split: h2's next block refers to it.
        again = client.call(_request(rows))
    _assert_wine(answer.response(), rows)
    _assert_wine(again.response(), rows)


@pytest.mark.parametrize(
    "interruption",
    [
        pytest.param(PingFrame(0, b"12345678"), id="PING"),
        pytest.param(DataFrame(1, _message(b""), flags=["END_STREAM"]), id="DATA-of-open-stream"),
        pytest.param(HeadersFrame(5, _block(), flags=["END_HEADERS"]), id="HEADERS"),
        pytest.param(ContinuationFrame(1, b"", flags=["END_HEADERS"]), id="another-streams"),
    ],
)
def test_an_interrupted_header_block_is_a_protocol_error(
    live: LiveServer, interruption: Frame
) -> None:
    """Stream 1 is open (its body to come); stream 3's header block is cut short by a
    frame that, but for the block in progress, would be fine, except the CONTINUATION of
    another stream's block."""
    frames, closed = _exchange(
        live,
        PREFACE
        + _serialized(
            SettingsFrame(0),
            HeadersFrame(1, _block(), flags=["END_HEADERS"]),
            HeadersFrame(3, _block()[:10]),  # no END_HEADERS: a CONTINUATION must follow
            interruption,
        ),
    )
    _assert_goaway(frames, closed, ErrorCodes.PROTOCOL_ERROR)
    _assert_serves(live)


def test_padded_frames_are_accepted_and_unknown_frame_types_ignored(live: LiveServer) -> None:
    rows = _rows(9, 20)
    message = _request(rows)

    def padded(frame: HeadersFrame) -> list[Frame]:
        """h2's HEADERS with padding and a priority (which the block follows)."""
        frame.flags.add("PADDED")
        frame.pad_length = 37
        frame.flags.add("PRIORITY")
        frame.depends_on, frame.stream_weight, frame.exclusive = 0, 200, False
        return [_unknown(0xFA, frame.stream_id, b"ignore me"), frame]

    with Client(live) as client:
        client.raw(_unknown(0x42, 0, b"an extension frame on stream 0"))
        stream_id = client.start(headers_as=padded, end=False)
        client.conn.send_data(stream_id, message[:50], pad_length=255)
        client.raw(_unknown(0xBE, stream_id, b"\0" * 100))
        client.conn.send_data(stream_id, message[50:], end_stream=True, pad_length=0)
        client.flush()
        answer = client.answers[stream_id]
        client.pump(lambda: answer.done, "the answer to padded frames")
        assert not client.server_frames(GoAwayFrame)
    _assert_wine(answer.response(), rows)


def _oversized_frame_header() -> bytes:
    """Only the 9-byte header of a DATA frame of 16,385 bytes: the server must refuse it
    on its length alone (it never buffers such a frame), and bytes it did not read would
    turn its close into a TCP reset that could discard its GOAWAY."""
    return (16_385).to_bytes(3, "big") + bytes([0x0, 0x0]) + (1).to_bytes(4, "big")


_OPENED = HeadersFrame(3, _block(), flags=["END_HEADERS"])  # stream 3, its body to come

CONNECTION_ERRORS = [
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", ErrorCodes.PROTOCOL_ERROR, id="http1.1"
    ),
    pytest.param(
        PREFACE + SettingsFrame(0).serialize() + _oversized_frame_header(),
        ErrorCodes.FRAME_SIZE_ERROR,
        id="frame-over-16KiB",
    ),
    pytest.param(
        PREFACE + _serialized(SettingsFrame(0), HeadersFrame(2, _block(), flags=["END_HEADERS"])),
        ErrorCodes.PROTOCOL_ERROR,
        id="even-stream-id",
    ),
    pytest.param(
        PREFACE
        + _serialized(SettingsFrame(0), _OPENED, HeadersFrame(2, _block(), flags=["END_HEADERS"])),
        ErrorCodes.PROTOCOL_ERROR,
        id="even-stream-id-below-the-last",
    ),
    pytest.param(
        PREFACE + _serialized(SettingsFrame(0), HeadersFrame(1, b"\xbf", flags=["END_HEADERS"])),
        ErrorCodes.COMPRESSION_ERROR,
        id="hpack-index-past-the-tables",
    ),
    pytest.param(
        PREFACE
        + _serialized(
            SettingsFrame(0), HeadersFrame(1, b"\x7f" + b"\xff" * 9, flags=["END_HEADERS"])
        ),
        ErrorCodes.COMPRESSION_ERROR,
        id="hpack-endless-integer",
    ),
    pytest.param(
        PREFACE
        + _serialized(
            SettingsFrame(0), _OPENED, PushPromiseFrame(3, 2, _block(), flags=["END_HEADERS"])
        ),
        ErrorCodes.PROTOCOL_ERROR,
        id="push-promise",
    ),
    pytest.param(
        PREFACE + _serialized(SettingsFrame(0), WindowUpdateFrame(0, 0)),
        ErrorCodes.PROTOCOL_ERROR,  # RFC 9113, 6.9: an increment of 0 is PROTOCOL_ERROR
        id="window-update-of-0",
    ),
    pytest.param(
        PREFACE + SettingsFrame(0).serialize() + _FRAME_HEAD.pack(7, 0, 0),
        ErrorCodes.PROTOCOL_ERROR,  # a GOAWAY has at least a last stream id and a code
        id="goaway-of-no-bytes",
    ),
]


@pytest.mark.parametrize(("sent", "code"), CONNECTION_ERRORS)
def test_connection_errors_end_in_goaway_and_the_server_goes_on(
    live: LiveServer, sent: bytes, code: ErrorCodes
) -> None:
    frames, closed = _exchange(live, sent)
    assert isinstance(frames[0], SettingsFrame)
    _assert_goaway(frames, closed, code)
    _assert_serves(live)


def test_a_stream_reset_mid_request_leaves_the_others_answering(live: LiveServer) -> None:
    rows = _rows(6, 60)
    with Client(live) as client:
        unary = client.start(_request(rows)[:40], end=False)
        streaming = client.start(_request(rows), path=STREAM_INFER, end=False)
        first = client.answers[streaming]
        client.pump(
            lambda: (
                len(first.data) >= 5
                and len(first.data) == 5 + int.from_bytes(first.data[1:5], "big")
            ),
            "the streaming call's first answer",
        )
        message = service_pb2.ModelStreamInferResponse.FromString(_one_message(bytes(first.data)))
        assert message.error_message == ""
        _assert_wine(message.infer_response, rows)
        client.conn.reset_stream(unary, ErrorCodes.CANCEL)
        client.conn.reset_stream(streaming, ErrorCodes.CANCEL)
        client.flush()
        seen = len(client.frames)
        others = [_rows(2, 10), _rows(11, 100)]
        answers = [client.call(_request(r)) for r in others]
        client.idle(0.1)
        after = client.frames[seen:]
    for answer, expected_rows in zip(answers, others, strict=True):
        _assert_wine(answer.response(), expected_rows)
    assert not [f for f in after if f.stream_id in (unary, streaming)]
    assert not [f for f in after if isinstance(f, GoAwayFrame)]


def test_streams_past_1024_are_refused_and_the_others_complete(live: LiveServer) -> None:
    """1024 streams open at once (each waiting for its body) besides streams that ended
    before, by an answer or a reset (which must free their places); the next three are
    refused, and the 1024 then answer."""
    table = _rows(133)
    with Client(live) as client:
        client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 1024, "SETTINGS")
        _assert_wine(client.call(_request(table[:1])).response(), table[:1])
        for _ in range(2):
            client.conn.reset_stream(client.start(_request(table[:1])[:20], end=False))
        opened = [client.start(end=False) for _ in range(1024)]
        # Behind h2's back, which would not open more streams than the server allows:
        excess = [opened[-1] + 2, opened[-1] + 4, opened[-1] + 6]
        client.raw(*[HeadersFrame(s, _block(), flags=["END_HEADERS"]) for s in excess])

        def refused() -> list[RstStreamFrame]:
            return [f for f in client.server_frames(RstStreamFrame) if f.stream_id in excess]

        client.pump(lambda: len(refused()) == 3, "RST_STREAM of the 3 streams past 1024")
        assert [(f.stream_id, f.error_code) for f in refused()] == [
            (s, ErrorCodes.REFUSED_STREAM) for s in excess
        ]
        assert not any(client.answers[s].done for s in opened)
        for index, stream_id in enumerate(opened):  # the bodies, in one write
            client.conn.send_data(stream_id, _request(_one_row(table, index)), end_stream=True)
        client.flush()
        client.pump(lambda: all(client.answers[s].done for s in opened), "1024 answers", 20)
        answers = [client.answers[s] for s in opened]
    for index, answer in enumerate(answers):
        _assert_wine(answer.response(), _one_row(table, index))


def _one_row(table: np.ndarray, index: int) -> np.ndarray:
    return table[index % len(table) : index % len(table) + 1]


def test_a_content_type_other_than_grpc_is_415(live: LiveServer) -> None:
    rows = _rows(2)
    with Client(live) as client:
        answer = client.call(_request(rows), content_type="application/json")
        assert answer.headers[":status"] == "415"
        assert answer.data == b""
        assert answer.ended
        # The connection serves the next call.
        _assert_wine(client.call(_request(rows)).response(), rows)


def test_a_client_goaway_lets_calls_in_flight_finish_then_closes(live: LiveServer) -> None:
    rows = _rows(8, 70)
    message = _request(rows)
    with Client(live) as client:
        stream_id = client.start(message[:30], end=False)
        client.raw(GoAwayFrame(0, last_stream_id=0, error_code=0))
        client.conn.ping(b"stillup?")
        client.flush()
        client.pump(
            lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events),
            "a PING ACK after the client's GOAWAY",
        )
        client.idle(0.2)
        assert not client.closed  # a call is in flight: the connection stays
        client.send(stream_id, message[30:])
        answer = client.answers[stream_id]
        client.pump(lambda: answer.done, "the call in flight")
        client.pump(lambda: client.closed, "the server closing the connection")
    _assert_wine(answer.response(), rows)


def _indexed_literal(static_index: int, value: bytes) -> bytes:
    """HPACK's literal field with incremental indexing, its name from the static table:
    the server's decoder adds it to the dynamic table at index 62."""
    return bytes((0x40 | static_index, len(value))) + value


def test_a_repeated_header_block_follows_the_dynamic_table_it_refers_to(
    live: LiveServer,
) -> None:
    # The same bytes of indexed fields alone, sent twice, name two methods: the entries
    # they refer to moved in between. The server decodes such a repeated block once and
    # keeps it; what it kept must not outlive a change of the table.
    check, nope = b"/grpc.health.v1.Health/Check", b"/grpc.health.v1.Health/Nope"
    post_http = b"\x83\x86"  # :method POST, :scheme http (the static table's 3 and 6)
    first = post_http + _indexed_literal(4, check) + _indexed_literal(31, b"application/grpc")
    repeated = post_http + b"\xbf\xbe"  # dynamic 63 and 62: the path, the content type
    moved = post_http + _indexed_literal(4, nope) + b"\xbf"  # the content type, now 63
    blocks = [first, repeated, moved, repeated]
    empty_message = _message(b"")  # a HealthCheckRequest of no fields: the whole server
    requests = [
        _serialized(
            HeadersFrame(stream_id, data=block, flags=["END_HEADERS"]),
            DataFrame(stream_id, data=empty_message, flags=["END_STREAM"]),
        )
        for stream_id, block in zip((1, 3, 5, 7), blocks, strict=True)
    ]
    frames, closed = _exchange(
        live,
        PREFACE
        + SettingsFrame(0).serialize()
        + b"".join(requests)
        + GoAwayFrame(0, last_stream_id=0, error_code=0).serialize(),
    )
    assert closed
    decoder = Decoder()  # the server's blocks are literals never indexed: one decoder reads all
    ends = {
        frame.stream_id: dict(decoder.decode(frame.data))
        for frame in frames
        if isinstance(frame, HeadersFrame) and "END_STREAM" in frame.flags
    }
    assert {stream: ends[stream]["grpc-status"] for stream in (1, 3, 5, 7)} == {
        1: "0",
        3: "0",
        5: "12",
        7: "12",
    }
    assert ends[7]["grpc-message"] == f"Method not found: {nope.decode()}"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((("grpc-timeout", "soon"),), "a malformed grpc-timeout: b'soon'"),
        ((("grpc-timeout", "123456789S"),), "a malformed grpc-timeout: b'123456789S'"),
        ((("x-key-bin", "abcde"),), "binary metadata 'x-key-bin' is not base64"),
    ],
)
def test_malformed_call_headers_end_the_call_not_the_connection(
    live: LiveServer, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    rows = _rows(3, 20)
    with Client(live) as client:
        answer = client.call(_request(rows), metadata=metadata)
        assert answer.status() == (grpc.StatusCode.INTERNAL, message)
        assert not answer.data
        # The connection serves the next call, and well-formed metadata passes.
        answer = client.call(_request(rows), metadata=(("x-key-bin", "YWJj"),))
        _assert_wine(answer.response(), rows)


def test_a_call_past_its_grpc_timeout_is_deadline_exceeded(live: LiveServer) -> None:
    rows = _rows(4, 30)
    message = _request(rows)
    with Client(live) as client:
        started = time.monotonic()
        stream_id = client.start(message[:20], end=False, metadata=(("grpc-timeout", "200m"),))
        answer = client.answers[stream_id]
        client.pump(lambda: answer.done, "the expired call's status")
        waited = time.monotonic() - started
        assert answer.status() == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        assert 0.2 <= waited < 5, waited
        # The rest of the request, sent behind h2's back (for h2 the reset stream is
        # closed), is dropped; the next call on the connection is answered.
        client.raw(DataFrame(stream_id, data=message[20:], flags=["END_STREAM"]))
        _assert_wine(client.call(_request(rows)).response(), rows)


def test_request_headers_past_the_advertised_list_size_are_resource_exhausted(
    live: LiveServer,
) -> None:
    rows = _rows(2, 50)
    with Client(live) as client:
        # 16 KiB, as test_settings_are_as_advertised_acked_and_pings_answered sees.
        answer = client.call(_request(rows), metadata=(("x-note", "n" * 16384),))
        code, message = answer.status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert message.startswith("request headers of ")
        assert message.endswith(" bytes are over the 16384 allowed")
        # The connection's header compression state is intact: the next call decodes.
        _assert_wine(client.call(_request(rows)).response(), rows)


# Frames of every type HTTP/2 defines and one it does not, any flags, the streams a
# fuzzed connection would name, payloads short enough to be read whole; and frames a
# client could well send (a call's headers, framed messages, window updates, resets,
# settings), so that sequences reach open streams and not only the first malformed
# frame.
_STREAMS = st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF])
_ANY_FRAME = st.tuples(st.integers(0, 10), st.integers(0, 255), _STREAMS, st.binary(max_size=40))
_CALL_HEADERS = st.tuples(
    st.just(1), st.sampled_from([0x4, 0x5]), st.sampled_from([1, 3, 5]), st.just(_block())
)
_MESSAGE = st.tuples(
    st.just(0),
    st.sampled_from([0, 1]),
    st.sampled_from([1, 3, 5]),
    st.one_of(st.binary(max_size=30).map(_message), st.just(_request(_rows(1)))),
)
_FOUR_BYTES = st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big"))
_WINDOW_OR_RESET = st.tuples(st.sampled_from([3, 8]), st.just(0), _STREAMS, _FOUR_BYTES)
_SETTINGS = st.tuples(
    st.just(4),
    st.just(0),
    st.just(0),
    st.lists(st.tuples(st.integers(1, 7), st.integers(0, 2**32 - 1)), max_size=3).map(
        lambda entries: b"".join(struct.pack(">HI", key, value) for key, value in entries)
    ),
)
_FUZZED_FRAMES = st.lists(
    st.one_of(_ANY_FRAME, _CALL_HEADERS, _MESSAGE, _WINDOW_OR_RESET, _SETTINGS),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_FUZZED_FRAMES)
def test_fuzzed_frames_end_in_an_answer_or_a_goaway_and_the_server_stays_healthy(
    live: LiveServer, frames: list[tuple[int, int, int, bytes]]
) -> None:
    # After the client's frames, a PING: the server either still speaks HTTP/2 (it
    # acknowledges the PING), has ended the connection with a GOAWAY, or has closed it
    # after the client's own well-formed GOAWAY. Never silence, and never an error
    # escaping into the event loop (the log stays free of them).
    data = PREFACE + SettingsFrame(0).serialize()
    for kind, flags, stream_id, payload in frames:
        data += _FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload
    data += PingFrame(0, b"fuzzing!").serialize()
    received = bytearray()
    closed = False
    with socket.create_connection(_address(live), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + TIMEOUT
        while not closed and time.monotonic() < deadline:
            seen = _frames(bytearray(received))
            acked = any(isinstance(f, PingFrame) and f.opaque_data == b"fuzzing!" for f in seen)
            ended = any(isinstance(f, GoAwayFrame) for f in seen)
            if acked or ended:
                break
            chunk = sock.recv(1 << 16)
            closed = not chunk
            received += chunk
    seen = _frames(received)
    said_goodbye = any(
        kind == 7 and not stream and len(body) >= 8 for kind, _, stream, body in frames
    )
    assert (said_goodbye and closed) or any(
        (isinstance(f, PingFrame) and "ACK" in f.flags) or isinstance(f, GoAwayFrame) for f in seen
    ), seen
    log = live.log()
    assert "Traceback" not in log, log[-2000:]
    assert "Exception in callback" not in log, log[-2000:]
    _assert_serves(live)
