"""The endpoints one worker answers for the others, on its private socket only (see
`peers`): apply a generation of the desired state, and hand over its share of what
the server reads as a whole (the judge's step windows, the statistics, the metrics)."""

import asyncio
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidegate.canary import Traffic
from tidegate.control import ControlPlane
from tidegate.errors import BadRequest, NotFound
from tidegate.v2 import json_response, read_json_object


def _private(request: Request) -> None:
    """NotFound unless the request came over a Unix socket (uvicorn gives those a
    server address without a port): the public port has no internal endpoints."""
    server = request.scope.get("server")
    if not (isinstance(server, tuple | list) and server[1] is None):
        raise NotFound(f"no endpoint {request.method} {request.url.path}")


class InternalApi:
    def __init__(
        self,
        control: ControlPlane,
        traffic: Traffic,
        max_body: int,
        own_metrics: Callable[[], bytes],
    ) -> None:
        self.control = control
        self.traffic = traffic
        self.max_body = max_body
        self.own_metrics = own_metrics  # this worker's exposition (blocking)

    def routes(self) -> list[Route]:
        return [
            Route("/internal/reconcile", self.reconcile, methods=["POST"]),
            Route("/internal/windows/{model}", self.windows, methods=["GET"]),
            Route("/internal/stats", self.stats, methods=["GET"]),
            Route("/internal/metrics", self.metrics, methods=["GET"]),
            Route("/internal/drift/{model}/{version}", self.drift_state, methods=["GET"]),
        ]

    async def reconcile(self, request: Request) -> Response:
        """Applies the desired state's generation (NotApplied, 500, if it cannot)."""
        _private(request)
        generation = (await read_json_object(request, self.max_body)).get("generation")
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise BadRequest("'generation' must be a whole number")
        return json_response({"generation": await self.control.follow(generation)})

    async def windows(self, request: Request) -> Response:
        """This worker's step windows of a model with a canary (null without one)."""
        _private(request)
        live = self.traffic.live(request.path_params["model"])
        return json_response(None if live is None else live.windows.to_state())

    async def stats(self, request: Request) -> Response:
        """Every loaded version's statistics here: [[name, version, state], ...]."""
        _private(request)
        deployments = self.control.registry.deployments()
        return json_response([[d.name, d.version, d.stats.to_state()] for d in deployments])

    async def drift_state(self, request: Request) -> Response:
        """This worker's own drift state of a version (NotFound before it has one)."""
        _private(request)
        name, version = request.path_params["model"], request.path_params["version"]
        deployment = self.control.registry.resolve(name, version)
        return json_response(await asyncio.to_thread(deployment.drift_state))

    async def metrics(self, request: Request) -> Response:
        """This worker's own `/metrics` text, as {"exposition": text} (see `metrics_merge`)."""
        _private(request)
        text = await asyncio.to_thread(self.own_metrics)
        return json_response({"exposition": text.decode()})
