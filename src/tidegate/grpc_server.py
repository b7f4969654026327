"""The V2 protocol over gRPC (`inference.GRPCInferenceService`), beside HTTP.

Served by `tidegate.grpc_wire` (its own HTTP/2) on the event loop that serves HTTP, so a
request of either transport goes through the same `serving.InferenceCore`: one
batcher per version, one traffic policy, one drift state, one set of statistics.
Loads and unloads go through the control plane as over HTTP (every worker,
audited). Errors carry the HTTP path's messages, with the status code that means
the same in gRPC (`_CODES`). With an auth file, each call needs the same role as
its HTTP endpoint, from `authorization: Bearer ...` metadata.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from tidegate import __version__, grpc_codec
from tidegate.auth import AuthFile, Role
from tidegate.busy_poll import BusyPoll
from tidegate.control import ControlPlane
from tidegate.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Overloaded,
    TidegateError,
    TimedOut,
    TooLarge,
    Unauthorized,
)
from tidegate.executor import InferenceExecutor
from tidegate.grpc_wire import GrpcServer
from tidegate.proto import POOL, grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from tidegate.protocol import ascii_number
from tidegate.registry import Deployment
from tidegate.serving import InferenceCore, Tensors
from tidegate.v2 import EXTENSIONS, metadata_document, server_stats, triton_config

SERVICE = "inference.GRPCInferenceService"
STREAM_IN_FLIGHT = 1024  # requests of one stream being answered at once; more wait

# The gRPC status that says what each error's HTTP status says (most specific first).
_CODES: list[tuple[type[TidegateError], grpc.StatusCode]] = [
    (TimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_code(error: TidegateError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _version(text: str) -> str | None:
    return text or None


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        core: InferenceCore,
        control: ControlPlane,
        executor: InferenceExecutor,
        auth: AuthFile | None,
    ) -> None:
        self.core = core
        self.control = control
        self.executor = executor
        self.auth = auth

    async def _allow(self, context: Any, role: Role, action: str) -> str:
        """The caller's token name (the audit's actor); aborts UNAUTHENTICATED or
        PERMISSION_DENIED as HTTP answers 401 or 403."""
        if self.auth is None:
            return "anonymous"
        authorization = dict(context.invocation_metadata()).get("authorization")
        try:
            return self.auth.authorize(authorization, role, action).name
        except TidegateError as exc:
            await context.abort(status_code(exc), exc.message)
            raise  # abort raises; this keeps type checkers informed

    async def _fail(self, context: Any, exc: TidegateError) -> None:
        await context.abort(status_code(exc), exc.message)

    # -- health and metadata ----------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ServerLive")
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ServerReady")
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ModelReady")
        try:
            self.core.resolve(request.name, _version(request.version))
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ServerMetadata")
        return pb.ServerMetadataResponse(
            name="tidegate", version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ModelMetadata")
        try:
            deployments = self._deployments(request.name, request.version)
        except TidegateError as exc:
            await self._fail(context, exc)
        return json_format.ParseDict(
            metadata_document(request.name, deployments), pb.ModelMetadataResponse()
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ModelConfig")
        try:
            deployment = self.core.resolve(request.name, _version(request.version))
        except TidegateError as exc:
            await self._fail(context, exc)
        config = triton_config(deployment, self.executor.threads)
        response = pb.ModelConfigResponse()
        json_format.ParseDict({"config": config}, response, ignore_unknown_fields=True)
        return response

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "ModelStatistics")
        try:
            if request.name:
                deployments = self._deployments(request.name, request.version)
            else:
                deployments = list(self.core.registry.deployments())
        except TidegateError as exc:
            await self._fail(context, exc)
        totals = await server_stats(self.control.peers, deployments)
        stats = [
            t.to_triton(d.name, d.version_label) for d, t in zip(deployments, totals, strict=True)
        ]
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    def _deployments(self, name: str, version: str) -> list[Deployment]:
        if version:
            return [self.core.resolve(name, version)]
        return self.core.registry.versions(name)

    # -- the repository -----------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.READER, "RepositoryIndex")
        rows = await self.core.registry.index()
        if request.ready:
            rows = [row for row in rows if row["state"] == "READY"]
        models = [
            {k: row[k] for k in ("name", "version", "state", "reason") if k in row} for row in rows
        ]
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        actor = await self._allow(context, Role.OPERATOR, "RepositoryModelLoad")
        try:
            version = _repository_version(request.parameters)
            await self.control.load(request.model_name, version, actor)
        except TidegateError as exc:
            await self._fail(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        actor = await self._allow(context, Role.OPERATOR, "RepositoryModelUnload")
        try:
            version = _repository_version(request.parameters)
            await self.control.unload(request.model_name, version, actor)
        except TidegateError as exc:
            await self._fail(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- inference ----------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._allow(context, Role.INFERENCE, "ModelInfer")
        key = dict(context.invocation_metadata()).get("tidegate-routing-key")
        try:
            response, served = await self._infer(request, key)
        except TidegateError as exc:
            await self._fail(context, exc)
        context.set_trailing_metadata(
            (("tidegate-model-version", response.model_version), ("tidegate-variant", served))
        )
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """One response per request, in the order of the requests, which are answered
        concurrently (so that they batch): an error is that request's response."""
        await self._allow(context, Role.INFERENCE, "ModelStreamInfer")
        key = dict(context.invocation_metadata()).get("tidegate-routing-key")
        answers: asyncio.Queue[asyncio.Task[Any] | None] = asyncio.Queue(STREAM_IN_FLIGHT)

        async def read() -> None:
            async for request in request_iterator:
                await answers.put(asyncio.ensure_future(self._stream_answer(request, key)))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield await answer
            await reader
        finally:
            reader.cancel()

    async def _stream_answer(self, request: Any, key: str | None) -> Any:
        if isinstance(request, _Undecodable):
            return pb.ModelStreamInferResponse(error_message=request.message)
        try:
            response, _ = await self._infer(request, key)
        except TidegateError as exc:
            return pb.ModelStreamInferResponse(error_message=exc.message)
        return pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: Any, key: str | None) -> tuple[Any, str]:
        started = time.perf_counter_ns()
        version = _version(request.model_version)
        deployment = self.core.resolve(request.model_name, version)
        try:
            decoded = grpc_codec.decode_infer(
                request,
                deployment.model.meta,
                max_batch_size=deployment.max_batch_size,
                reject_nan=deployment.config.validation.reject_nan,
            )
        except TidegateError:
            self.core.refused(deployment, started)
            raise
        decode_ns = time.perf_counter_ns() - started

        def encode(answering: Deployment, outputs: Tensors) -> Any:
            return grpc_codec.encode_infer(
                pb.ModelInferResponse(),
                answering.name,
                answering.version_label,
                decoded,
                outputs,
                answering.model.meta,
            )

        served = await self.core.infer(
            deployment,
            version,
            decoded,
            None if key is None else key.encode(),
            started,
            decode_ns,
            encode,
        )
        # Once this call has returned its answer, as HTTP does after its send.
        asyncio.get_running_loop().call_soon(self.core.after, served)
        return served.payload, served.variant.name


def _repository_version(parameters: Any) -> str | None:
    """The `version` parameter of a load or unload (tidegate's, as over HTTP)."""
    value = grpc_codec.parameter(parameters, "version")
    if value is None:
        return None
    text = str(value)
    if ascii_number(text) is None:
        raise BadRequest("parameter 'version' must be a version number")
    return text


@dataclass(slots=True, frozen=True)
class _Undecodable:
    """A request whose bytes are not its RPC's message: INVALID_ARGUMENT, not grpcio's
    UNKNOWN from a failed deserializer."""

    message: str


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError as exc:
            return _Undecodable(f"the message is not a valid {message_type.__name__}: {exc}")

    return parse


def _checked(behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
    async def answer(request: Any, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return answer


def _handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    """The service's methods, as the generated `add_..._to_server` registers them but
    with lenient deserializers (see `_Undecodable`)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        parse = _lenient(getattr(pb, method.input_type.name))
        serialize = getattr(pb, method.output_type.name).SerializeToString
        behaviour = getattr(service, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, request_deserializer=parse, response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _checked(behaviour), request_deserializer=parse, response_serializer=serialize
            )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start(
    service: InferenceService,
    host: str,
    port: int,
    max_message_bytes: int,
    busy_poll: BusyPoll | None,
) -> GrpcServer:
    """The gRPC server on `host:port` (SO_REUSEPORT, as HTTP: every worker binds it),
    with the standard health service and server reflection, polling after its answers
    as `busy_poll` says (None: not)."""
    server = GrpcServer(max_message_bytes, busy_poll)
    server.add_generic_rpc_handlers((_handlers(service),))
    # The generated registration functions use only the two methods GrpcServer has.
    registry = cast(grpc.aio.Server, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, registry)
    # tidegate's messages live in their own descriptor pool (see `tidegate.proto`).
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection.aio.ReflectionServicer(names, pool=POOL), registry
    )
    await server.start(host, port)
    for name in ("", SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
