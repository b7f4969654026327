"""Starlette handlers for tidegate's control extensions: traffic, rollouts, audit.

Thin: `ControlPlane` does the work. The actor of an action is the name the access
control put in the request's scope (`ACTOR_KEY`), `anonymous` without it.
"""

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidegate.control import ControlPlane
from tidegate.errors import BadRequest, NotFound
from tidegate.protocol import ascii_number
from tidegate.v2 import ACTOR_KEY, json_response, read_json_object

ACTIONS = ("promote", "rollback", "pause", "resume")
AUDIT_LIMIT = 1000  # entries `GET /v2/audit` returns unless asked for fewer


def actor_of(request: Request) -> str:
    actor: str = request.scope.get(ACTOR_KEY, "anonymous")
    return actor


class ControlApi:
    def __init__(self, control: ControlPlane, max_body: int) -> None:
        self.control = control
        self.max_body = max_body

    def routes(self) -> list[Route]:
        model = "/v2/models/{model}"
        return [
            Route(f"{model}/traffic", self.traffic, methods=["GET", "PUT"]),
            Route(f"{model}/traffic/state", self.fleet_view, methods=["GET"]),
            Route(f"{model}/rollout", self.rollout, methods=["GET", "POST"]),
            Route(f"{model}/rollout/judgement", self.judgement, methods=["POST"]),
            Route(f"{model}/rollout/{{action}}", self.rollout_action, methods=["POST"]),
            Route("/v2/audit", self.audit, methods=["GET"]),
            Route("/v2/state", self.applied_state, methods=["GET"]),
        ]

    async def traffic(self, request: Request) -> Response:
        name = request.path_params["model"]
        if request.method == "GET":
            return json_response(await self.control.read_traffic(name))
        document = await read_json_object(request, self.max_body)
        return json_response(await self.control.set_traffic(name, document, actor_of(request)))

    async def rollout(self, request: Request) -> Response:
        name = request.path_params["model"]
        if request.method == "GET":
            return json_response(await self.control.read_rollout(name))
        document = await read_json_object(request, self.max_body)
        return json_response(await self.control.start_rollout(name, document, actor_of(request)))

    async def rollout_action(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise NotFound(f"no rollout action '{action}' (one of {', '.join(ACTIONS)})")
        await read_json_object(request, self.max_body)  # an empty body, or {}
        name = request.path_params["model"]
        return json_response(await self.control.act(name, action, actor_of(request)))

    async def fleet_view(self, request: Request) -> Response:
        """What a fleet judge reads of this replica (see `ControlPlane.fleet_view`)."""
        return json_response(await self.control.fleet_view(request.path_params["model"]))

    async def judgement(self, request: Request) -> Response:
        """A fleet judge's decision on the model's rollout (see `ControlPlane.apply_judgement`)."""
        document = await read_json_object(request, self.max_body)
        name = request.path_params["model"]
        return json_response(await self.control.apply_judgement(name, document, actor_of(request)))

    async def applied_state(self, request: Request) -> Response:
        """The desired state this process serves, and its generation."""
        return json_response(self.control.applied_state())

    async def audit(self, request: Request) -> Response:
        """The audit log's last entries (`?limit=N`, default and most 1000), oldest
        first, of one model with `?model=NAME`."""
        query = request.query_params
        limit = ascii_number(query.get("limit", str(AUDIT_LIMIT)))
        if limit is None or limit > AUDIT_LIMIT:
            raise BadRequest(f"'limit' must be a whole number up to {AUDIT_LIMIT}")
        read = await asyncio.to_thread(self.control.audit.read, query.get("model"), limit)
        return json_response({"entries": read.entries, "unreadable_lines": read.unreadable})
