"""`tidegate bench --protocol grpc`: the load generator's loops (tidegate.loadgen) over
the V2 protocol's gRPC transport, `inference.GRPCInferenceService/ModelInfer`.

Each prepared request becomes a ModelInferRequest once, before the load (its tensors
as `raw_input_contents`), and is serialized then; the calls send those bytes as they
are and keep the answer's bytes unparsed (identity serializers), so the client pays
for no protobuf per request. A call that ends with status OK is a success; any other
status counts as an error by its code's name (`NOT_FOUND`, `UNAVAILABLE`, ...).

Concurrency is calls in flight. They go over tidegate.http2_client, not grpcio's
client: its CPU per call would be taken from the server measured on the same machine,
and at one call in flight it was three quarters of the latency measured against
tidegate. A new connection for every CALLS_PER_CHANNEL calls opened, so that one
HTTP/2 connection's flow control and framing do not cap the load and a server with
several workers behind one port gets several connections to spread. In the open loop
`max_connections` bounds the calls in flight. gRPC's own mapping gives a call's status
when the server answers with an HTTP status or resets the stream instead (the
UNAVAILABLE of REFUSED_STREAM, ...); a connection that cannot be made or breaks counts
as `connection`, as over HTTP.

Model metadata and statistics (`prepare` and the server's own times in `tidegate
bench`) come over gRPC too, with blocking calls outside the load.
"""

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from tidegate import __version__
from tidegate.grpc_wire import length_prefixed
from tidegate.http2 import ErrorCode, encode_headers
from tidegate.http2_client import Answer, Http2Client, StreamReset
from tidegate.loadgen import OK, LevelResult, Plan, Tally, Target, run_requests
from tidegate.proto import grpc_service_pb2 as pb
from tidegate.proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tidegate.workload import PreparedRequest, encode_request

__all__ = [
    "CALLS_PER_CHANNEL",
    "call_outcome",
    "infer_message",
    "model_metadata",
    "model_statistics",
    "request_headers",
    "run_level",
]

# Calls in flight per connection: 8 (c=64 opens 8 connections). Against tidegate on a
# 2-vCPU machine, c=64 on the tabular model, 4, 8, 16 and 64 (a single connection) calls
# per connection were alike within noise (2,570, 2,740, 2,780 and 2,680 req/s, medians of
# 4 rounds, grpcio's client: the server's cost per call dominates); 8 keeps each
# connection's share of stalls small and still gives a server with several workers
# several connections.
CALLS_PER_CHANNEL = 8
_INFER = b"/inference.GRPCInferenceService/ModelInfer"
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# A stream reset instead of an answer (gRPC's PROTOCOL-HTTP2.md); other codes: INTERNAL.
_RESET_STATUS: dict[int, str] = {
    ErrorCode.REFUSED_STREAM: "UNAVAILABLE",
    ErrorCode.CANCEL: "CANCELLED",
    ErrorCode.ENHANCE_YOUR_CALM: "RESOURCE_EXHAUSTED",
    ErrorCode.INADEQUATE_SECURITY: "PERMISSION_DENIED",
}
# An HTTP status other than 200 instead of a gRPC answer (gRPC's http-grpc-status-mapping).
_HTTP_STATUS = {
    b"400": "INTERNAL",
    b"401": "UNAUTHENTICATED",
    b"403": "PERMISSION_DENIED",
    b"404": "UNIMPLEMENTED",
    b"429": "UNAVAILABLE",
    b"502": "UNAVAILABLE",
    b"503": "UNAVAILABLE",
    b"504": "UNAVAILABLE",
}


def _tensors(request: PreparedRequest) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Each input of a prepared V2 request: its JSON entry and its raw data (a JSON body's
    `data` encoded as the binary extension would send it)."""
    if request.header_length is None:
        document = json.loads(request.body)
        entries = document["inputs"]
        arrays = {
            entry["name"]: np.asarray(
                entry["data"], dtype=object if entry["datatype"] == "BYTES" else None
            ).reshape(entry["shape"])
            for entry in entries
        }
        datatypes = {entry["name"]: entry["datatype"] for entry in entries}
        body, length = encode_request(arrays, datatypes, binary=True)
        request = PreparedRequest(body, length, request.rows)
    assert request.header_length is not None
    offset = request.header_length
    for entry in json.loads(request.body[:offset])["inputs"]:
        size = entry["parameters"]["binary_data_size"]
        yield entry, request.body[offset : offset + size]
        offset += size


def infer_message(model: str, version: str | None, request: PreparedRequest) -> bytes:
    """A prepared V2 request as a serialized ModelInferRequest for `model` (`version`),
    every input's data in `raw_input_contents`.

    Raises:
        ValueError: a JSON request's data does not fit its shape or datatype.
    """
    message = pb.ModelInferRequest(model_name=model, model_version=version or "")
    for entry, raw in _tensors(request):
        message.inputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
        message.raw_input_contents.append(raw)
    return message.SerializeToString()


def call_outcome(answer: Answer) -> str:
    """OK, or the name of the status a gRPC client would report for the answer."""
    status = next((value for name, value in answer.headers if name == b":status"), None)
    if status != b"200":
        return _HTTP_STATUS.get(status or b"", "UNKNOWN")
    # A failure may come as headers alone ("trailers-only"), without body or trailers.
    fields = answer.trailers or answer.headers
    code = next((value for name, value in fields if name == b"grpc-status"), None)
    if code is None:
        return "INTERNAL"  # the stream ended without a status
    return OK if code == b"0" else _STATUS_NAMES.get(int(code), "UNKNOWN")


def request_headers(address: str, path: bytes) -> bytes:
    """A call's header block, the same bytes for every call (nothing indexed)."""
    return encode_headers(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", address.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", f"tidegate-bench/{__version__}".encode()),
        ]
    )


class _Call:
    """A place for one call at a time on a shared connection: what the loops call a
    connection. Closing one leaves the connection to its other calls."""

    def __init__(self, connection: Http2Client, headers: bytes) -> None:
        self._connection = connection
        self._headers = headers

    async def exchange(self, data: bytes) -> str:
        try:
            answer = await self._connection.call(self._headers, data)
        except StreamReset as reset:
            return _RESET_STATUS.get(reset.code, "INTERNAL")
        return call_outcome(answer)

    def close(self) -> None:
        pass


class _Connections:
    """The connections of one level: a new one for every CALLS_PER_CHANNEL calls
    opened, or when the current one has closed or is going away."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._headers = request_headers(target.address, _INFER)
        self._connections: list[Http2Client] = []
        self._places = 0  # calls opened on the newest connection

    async def open(self) -> _Call:
        newest = self._connections[-1] if self._connections else None
        if newest is None or not newest.usable or self._places >= CALLS_PER_CHANNEL:
            newest = await Http2Client.open(self._target.host, self._target.port)
            self._connections.append(newest)
            self._places = 0
        self._places += 1
        return _Call(newest, self._headers)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()


async def run_level(
    target: Target,
    model: str,
    version: str | None,
    prepared: list[PreparedRequest],
    plan: Plan,
    tally: Tally | None = None,
) -> LevelResult:
    """Runs one load level of ModelInfer calls, as tidegate.loadgen.run_level does over HTTP."""
    requests = [(length_prefixed(infer_message(model, version, r)), r.rows) for r in prepared]
    connections = _Connections(target)
    try:
        return await run_requests(connections.open, requests, plan, tally)
    finally:
        connections.close()


def _ask(target: Target, method: str, request: Any, timeout: float) -> Any:
    """One blocking call of the service on a channel of its own."""
    with grpc.insecure_channel(target.address) as channel:
        return getattr(GRPCInferenceServiceStub(channel), method)(request, timeout=timeout)


def model_metadata(
    target: Target, model: str, version: str | None, timeout: float = 10.0
) -> dict[str, Any] | None:
    """The model's metadata as the HTTP endpoint's JSON has it (name, datatype and shape
    of each input); None when the server has no such model.

    Raises:
        ConnectionError: no gRPC server answers at the target (an OSError).
        RuntimeError: the call failed otherwise.
    """
    request = pb.ModelMetadataRequest(name=model, version=version or "")
    try:
        answer = _ask(target, "ModelMetadata", request, timeout)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.NOT_FOUND:
            return None
        if code == grpc.StatusCode.UNAVAILABLE:
            message = f"no gRPC server answers at {target.address}: {details}"
            raise ConnectionError(message) from error
        raise RuntimeError(f"ModelMetadata: {code.name}: {details}") from error
    inputs = [
        {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in answer.inputs
    ]
    return {"name": answer.name, "inputs": inputs}


def model_statistics(
    target: Target, model: str, version: str | None, timeout: float = 10.0
) -> dict[str, Any] | None:
    """The model's ModelStatistics shaped as the HTTP `/stats` JSON (`model_stats`, each
    with `inference_stats` of `count` and `ns` per kind); None when the call fails."""
    request = pb.ModelStatisticsRequest(name=model, version=version or "")
    try:
        answer = _ask(target, "ModelStatistics", request, timeout)
    except grpc.RpcError:
        return None  # no server, no such model, or a server without statistics
    stats = []
    for entry in answer.model_stats:
        kinds = entry.inference_stats.ListFields()
        stats.append(
            {"inference_stats": {f.name: {"count": v.count, "ns": v.ns} for f, v in kinds}}
        )
    return {"model_stats": stats}
