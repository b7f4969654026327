"""Starlette handlers for the V2 endpoints other than inference (see `infer`):
health, metadata, and Triton's repository, configuration and statistics
extensions. Thin: state lives in `registry`."""

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tidegate import __version__
from tidegate.control import ControlPlane
from tidegate.errors import BadRequest, NotFound
from tidegate.executor import InferenceExecutor
from tidegate.infer import receive_body
from tidegate.peers import Peers
from tidegate.registry import Deployment, Registry
from tidegate.stats import VersionStats, whole_server

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
]
PLATFORM = "onnxruntime_onnx"
# Where the access control puts the name of the token a request came with: the actor
# in the audit log.
ACTOR_KEY = "tidegate.actor"
_JSON = "application/json"


def json_response(document: object, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status, media_type=_JSON)


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """A small control-plane body: empty means {}."""
    headers = request.headers
    body = await receive_body(
        request.receive, headers.get("content-length"), headers.get("content-encoding"), limit
    )
    if not body.strip():
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document


def metadata_document(name: str, deployments: list[Deployment]) -> dict[str, object]:
    meta = deployments[-1].model.meta
    return {
        "name": name,
        "versions": [d.version_label for d in deployments],
        "platform": PLATFORM,
        "inputs": [spec.metadata() for spec in meta.inputs],
        "outputs": [spec.metadata() for spec in meta.outputs],
    }


def triton_config(deployment: Deployment, threads: int) -> dict[str, object]:
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
        "latest": {"latest": {"num_versions": policy.num_versions}},
        "all": {"all": {}},
        "specific": {"specific": {"versions": list(policy.versions)}},
    }
    config: dict[str, object] = {
        "name": deployment.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": policies[policy.kind],
        "max_batch_size": batch,
        "input": tensors(deployment.model.meta.inputs),
        "output": tensors(deployment.model.meta.outputs),
        "instance_group": [{"name": deployment.name, "kind": "KIND_CPU", "count": threads}],
    }
    batching = deployment.config.batching
    if batch and batching.dynamic:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "allow_timeout_override": True,
                "max_queue_size": batching.max_queue_size,
            },
        }
    return config


async def server_stats(peers: Peers, deployments: list[Deployment]) -> list[VersionStats]:
    """The versions' statistics for the whole server, whichever worker answers: each
    worker's, summed (this process's own without other workers)."""
    if not peers.enabled:
        return [d.stats for d in deployments]
    replies = await peers.call("GET", "/internal/stats")
    others = [row for reply in replies if reply.status == 200 for row in reply.body]
    return whole_server([(d.name, d.version, d.stats) for d in deployments], others)


class DataPlane:
    """The V2 endpoints, bound to one registry and one inference executor."""

    def __init__(
        self,
        registry: Registry,
        executor: InferenceExecutor,
        max_body: int,
        control: ControlPlane,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.max_body = max_body
        self.control = control  # loads and unloads are changes of the desired state

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
            return json_response(metadata_document(name, [self._resolve(request)]))
        return json_response(metadata_document(name, self.registry.versions(name)))

    async def model_ready(self, request: Request) -> Response:
        deployment = self._resolve(request)
        return json_response({"name": deployment.name, "ready": True})

    async def model_config(self, request: Request) -> Response:
        threads = self.executor.threads
        return json_response(triton_config(self._resolve(request), threads))

    async def model_stats(self, request: Request) -> Response:
        if "version" in request.path_params:
            deployments = [self._resolve(request)]
        elif "model" in request.path_params:
            deployments = self.registry.versions(request.path_params["model"])
        else:
            deployments = list(self.registry.deployments())
        totals = await server_stats(self.control.peers, deployments)
        return json_response(
            {
                "model_stats": [
                    stats.to_triton(d.name, d.version_label)
                    for d, stats in zip(deployments, totals, strict=True)
                ]
            }
        )

    async def drift(self, request: Request) -> Response:
        """The drift report of one version, or of every serving version of a model,
        over the whole server's traffic (every worker's)."""
        name = request.path_params["model"]
        if "version" in request.path_params:
            deployment = self._resolve(request)
            others = await self._other_drift_states(deployment)
            return json_response(await asyncio.to_thread(deployment.drift_report, others))
        reports = []
        for deployment in self.registry.versions(name):
            others = await self._other_drift_states(deployment)
            reports.append(await asyncio.to_thread(deployment.drift_report, others))
        return json_response({"model_name": name, "versions": reports})

    async def fleet_drift(self, request: Request) -> Response:
        """`POST` to a version's drift: its report over this server's traffic plus
        `states`, other servers' drift states of the same version (`GET .../drift/state`
        from each replica of a fleet: `tidegate fleet drift`). BadRequest names a state
        that does not merge: another reference (its bins differ), or a malformed one."""
        deployment = self._resolve(request)
        states = (await read_json_object(request, self.max_body)).get("states")
        if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
            raise BadRequest("'states' must be a list of drift states (GET .../drift/state)")
        if deployment.drift is None or not deployment.drift.ready:
            raise NotFound(
                f"model '{deployment.name}' version {deployment.version} has no drift state"
            )
        digest = deployment.drift.reference_digest
        for index, state in enumerate(states):
            reference = state.get("reference")
            if not isinstance(reference, dict) or reference.get("digest") != digest:
                raise BadRequest(
                    f"states[{index}] was counted against another reference than this "
                    f"server's ({digest}): drift states merge only over the same reference "
                    "bins (give the version a reference.npz)"
                )
        others = [*await self._other_drift_states(deployment), *states]
        try:
            report = await asyncio.to_thread(deployment.drift_report, others)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"'states' do not merge with this version's: {exc!r}") from exc
        return json_response(report)

    async def drift_state(self, request: Request) -> Response:
        """A version's raw drift state (sums and counts), for merging elsewhere: the
        whole server's (every worker's, added)."""
        deployment = self._resolve(request)
        others = await self._other_drift_states(deployment)
        return json_response(await asyncio.to_thread(deployment.drift_state, others))

    async def _other_drift_states(self, deployment: Deployment) -> list[dict[str, Any]]:
        if deployment.drift is None:
            return []
        return await self.control.peers.drift_states(deployment.name, deployment.version_label)

    # -- Triton's model repository extension ----------------------------------------

    async def repository_index(self, request: Request) -> Response:
        options = await read_json_object(request, self.max_body)
        rows = await self.registry.index()
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
        actor = request.scope.get(ACTOR_KEY, "anonymous")
        await self.control.load(request.path_params["model"], version, actor)
        return json_response({})

    async def repository_unload(self, request: Request) -> Response:
        """Unloads a model or one version; 200 with a message saying so when it was not
        loaded (Triton's idempotent unload, see `Registry.unload`), audited as a no-op."""
        # tritonclient always sends unload_dependents; there are no ensembles to unload.
        version = await self._version_parameter(request, {"unload_dependents"})
        actor = request.scope.get(ACTOR_KEY, "anonymous")
        nothing_done = await self.control.unload(request.path_params["model"], version, actor)
        if nothing_done is not None:
            return json_response({"message": nothing_done})
        return json_response({})
