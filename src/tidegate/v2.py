"""Starlette handlers for the V2 data plane and Triton's repository, config and
statistics extensions. Thin: parsing lives in `codec`, state in `registry`."""

import time
import zlib
from functools import partial
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate import __version__, codec
from tidegate.errors import BadRequest, TidegateError, TooLarge
from tidegate.executor import InferenceExecutor
from tidegate.registry import Deployment, Registry
from tidegate.stats import Timings

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
]
PLATFORM = "onnxruntime_onnx"
_JSON = "application/json"
_BINARY = "application/octet-stream"
# gzip and zlib framing are both accepted for "deflate", as browsers and curl do.
_DECOMPRESSORS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": 32 + zlib.MAX_WBITS}


def json_response(document: object, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status, media_type=_JSON)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = _DECOMPRESSORS.get(encoding)
    if wbits is None:
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (use gzip or deflate)")
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data: {exc}") from exc
    if len(data) > limit:
        raise TooLarge(f"decompressed body is over the limit of {limit} bytes")
    if not decompressor.eof:
        raise BadRequest(f"body is truncated {encoding} data")
    return data


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        body = _decompress(body, encoding, limit)
    return body


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """A small control-plane body: empty means {}."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document


def _header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequest(f"Inference-Header-Content-Length {value!r} is not a byte count")
    return int(value)


def _metadata(name: str, deployments: list[Deployment]) -> dict[str, object]:
    meta = deployments[-1].model.meta
    return {
        "name": name,
        "versions": [d.version_label for d in deployments],
        "platform": PLATFORM,
        "inputs": [spec.metadata() for spec in meta.inputs],
        "outputs": [spec.metadata() for spec in meta.outputs],
    }


def _triton_config(deployment: Deployment, threads: int) -> dict[str, object]:
    """The model configuration as Triton renders it, for perf_analyzer and tritonclient."""
    batch = deployment.max_batch_size
    policy = deployment.config.versions

    def tensors(specs: tuple[Any, ...]) -> list[dict[str, object]]:
        return [
            {
                "name": spec.name,
                "data_type": spec.datatype.triton,
                "dims": list(spec.shape[1:] if batch else spec.shape),
            }
            for spec in specs
        ]

    policies: dict[str, object] = {
        "latest": {"latest": {"num_versions": 1}},
        "all": {"all": {}},
        "specific": {"specific": {"versions": list(policy.versions)}},
    }
    return {
        "name": deployment.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": policies[policy.kind],
        "max_batch_size": batch,
        "input": tensors(deployment.model.meta.inputs),
        "output": tensors(deployment.model.meta.outputs),
        "instance_group": [{"name": deployment.name, "kind": "KIND_CPU", "count": threads}],
    }


class DataPlane:
    """The V2 endpoints, bound to one registry and one inference executor."""

    def __init__(self, registry: Registry, executor: InferenceExecutor, max_body: int) -> None:
        self.registry = registry
        self.executor = executor
        self.max_body = max_body

    def _resolve(self, request: Request) -> Deployment:
        return self.registry.resolve(
            request.path_params["model"], request.path_params.get("version")
        )

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        return json_response({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "tidegate", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        name = request.path_params["model"]
        if "version" in request.path_params:
            return json_response(_metadata(name, [self._resolve(request)]))
        return json_response(_metadata(name, self.registry.versions(name)))

    async def model_ready(self, request: Request) -> Response:
        deployment = self._resolve(request)
        return json_response({"name": deployment.name, "ready": True})

    async def model_config(self, request: Request) -> Response:
        threads = self.executor.statistics().threads
        return json_response(_triton_config(self._resolve(request), threads))

    async def model_stats(self, request: Request) -> Response:
        if "version" in request.path_params:
            deployments = [self._resolve(request)]
        elif "model" in request.path_params:
            deployments = self.registry.versions(request.path_params["model"])
        else:
            deployments = list(self.registry.deployments())
        return json_response(
            {"model_stats": [d.stats.to_triton(d.name, d.version_label) for d in deployments]}
        )

    async def infer(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        deployment = self._resolve(request)
        try:
            return await self._infer(request, deployment, started)
        except TidegateError:
            now = time.perf_counter_ns()
            deployment.stats.record_failure(now - started, time.monotonic_ns())
            raise

    async def _infer(self, request: Request, deployment: Deployment, started: int) -> Response:
        body = await read_body(request, self.max_body)
        decode_start = time.perf_counter_ns()
        meta = deployment.model.meta
        decoded = codec.decode_request(
            body,
            _header_length(request),
            meta,
            max_batch_size=deployment.max_batch_size,
            reject_nan=deployment.config.validation.reject_nan,
        )
        decoded_at = time.perf_counter_ns()
        timed = await self.executor.run(partial(deployment.model.run, decoded.inputs))
        encode_start = time.perf_counter_ns()
        payload, json_length = codec.encode_response(
            deployment.name, deployment.version_label, decoded, timed.value, meta
        )
        finished = time.perf_counter_ns()
        headers = {"tidegate-model-version": deployment.version_label}
        if json_length is not None:
            headers["inference-header-content-length"] = str(json_length)
        first = next(iter(decoded.inputs.values()))
        rows = first.shape[0] if deployment.max_batch_size and first.ndim else 1
        deployment.stats.record_success(
            rows,
            Timings(
                total=finished - started,
                queue=timed.queue_ns,
                compute_input=decoded_at - decode_start,
                compute_infer=timed.run_ns,
                compute_output=finished - encode_start,
            ),
            time.monotonic_ns(),
        )
        media_type = _JSON if json_length is None else _BINARY
        return Response(payload, headers=headers, media_type=media_type)

    # -- Triton's model repository extension ----------------------------------------

    async def repository_index(self, request: Request) -> Response:
        options = await read_json_object(request, self.max_body)
        rows = self.registry.index()
        if options.get("ready") is True:
            rows = [row for row in rows if row["state"] == "READY"]
        return json_response(rows)

    async def _version_parameter(self, request: Request, allowed: set[str]) -> str | None:
        options = await read_json_object(request, self.max_body)
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be a JSON object")
        unknown = sorted(set(parameters) - allowed - {"version"})
        if unknown:
            raise BadRequest(f"parameter '{unknown[0]}' is not supported")
        version = parameters.get("version")
        if version is not None and not isinstance(version, str | int):
            raise BadRequest("parameter 'version' must be a version number")
        return None if version is None else str(version)

    async def repository_load(self, request: Request) -> Response:
        version = await self._version_parameter(request, set())
        await self.registry.load(request.path_params["model"], version)
        return json_response({})

    async def repository_unload(self, request: Request) -> Response:
        # tritonclient always sends unload_dependents; there are no ensembles to unload.
        version = await self._version_parameter(request, {"unload_dependents"})
        await self.registry.unload(request.path_params["model"], version)
        return json_response({})
