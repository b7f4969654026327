"""`tidegate bench --protocol grpc`: the load generator's loops (tidegate.loadgen) over
the V2 protocol's gRPC transport, `inference.GRPCInferenceService/ModelInfer`.

Each prepared request becomes a ModelInferRequest once, before the load (its tensors
as `raw_input_contents`), and is serialized then; the calls send those bytes as they
are and keep the answer's bytes unparsed (identity serializers), so the client pays
for no protobuf per request. A call that ends with status OK is a success; any other
status counts as an error by its code's name (`NOT_FOUND`, `UNAVAILABLE`, ...).

Concurrency is calls in flight. They share grpc.aio channels, a new channel (its own
TCP connection: a local subchannel pool, else gRPC would share one connection among
all channels to a target) for every CALLS_PER_CHANNEL calls in flight, so that one
HTTP/2 connection's flow control and framing do not cap the load and a server with
several workers behind one port gets several connections to spread. In the open
loop `max_connections` bounds the calls in flight.

Model metadata and statistics (`prepare` and the server's own times in `tidegate
bench`) come over gRPC too, with blocking calls outside the load.
"""

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
from grpc import aio

from tidegate.loadgen import OK, LevelResult, Plan, Tally, Target, run_requests
from tidegate.proto import grpc_service_pb2 as pb
from tidegate.proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tidegate.workload import PreparedRequest, encode_request

__all__ = ["CALLS_PER_CHANNEL", "infer_message", "model_metadata", "model_statistics", "run_level"]

# Calls in flight per channel: 8 (c=64 opens 8 connections). Against tidegate on a
# 2-vCPU machine, c=64 on the tabular model, 4, 8, 16 and 64 (a single connection) calls
# per channel were alike within noise (2,570, 2,740, 2,780 and 2,680 req/s, medians of 4
# rounds: the server's cost per call dominates); 8 keeps each connection's share of
# stalls small and still gives a server with several workers several connections.
CALLS_PER_CHANNEL = 8
_INFER = "/inference.GRPCInferenceService/ModelInfer"
# One TCP connection per channel; messages as large as the server takes.
_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


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


class _Call:
    """A place for one call at a time on a shared channel: what the loops call a
    connection. Closing one leaves the channel to its other calls."""

    def __init__(self, infer: aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        self._infer = infer

    async def exchange(self, data: bytes) -> str:
        try:
            await self._infer(data)
        except aio.AioRpcError as error:
            return str(error.code().name)
        return OK

    def close(self) -> None:
        pass


class _Channels:
    """The channels of one level: a new one for every CALLS_PER_CHANNEL calls opened."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._channels: list[aio.Channel] = []
        self._calls = 0
        self._infer: aio.UnaryUnaryMultiCallable[bytes, bytes] | None = None

    async def open(self) -> _Call:
        if self._calls % CALLS_PER_CHANNEL == 0 or self._infer is None:
            channel = aio.insecure_channel(self._target.address, options=_OPTIONS)
            self._channels.append(channel)
            # No serializers: the requests are serialized already, the answers kept as bytes.
            self._infer = channel.unary_unary(_INFER)
        self._calls += 1
        return _Call(self._infer)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def run_level(
    target: Target,
    model: str,
    version: str | None,
    prepared: list[PreparedRequest],
    plan: Plan,
    tally: Tally | None = None,
) -> LevelResult:
    """Runs one load level of ModelInfer calls, as tidegate.loadgen.run_level does over HTTP."""
    requests = [(infer_message(model, version, r), r.rows) for r in prepared]
    channels = _Channels(target)
    try:
        return await run_requests(channels.open, requests, plan, tally)
    finally:
        await channels.close()


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
