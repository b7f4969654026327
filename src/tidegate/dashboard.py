"""The read-only web dashboard at `/dashboard`: static files, and two small reads.

The page (`dashboard_static/`: HTML, CSS and plain JavaScript modules, no build step
and nothing fetched from elsewhere) polls once a second:

- `GET /dashboard/api/summary`: what the server, model and traffic views show, one
  request instead of one per model. A composition of existing reads, each already for
  the whole server under `--workers N`: the versions' statistics summed over the
  workers (`v2.server_stats`, as `/v2/models/stats`), every model's traffic status and
  rollout status (`ControlPlane.read_traffic` / `read_rollout`, as their endpoints;
  a running rollout's step window, every worker's, fetched once for both),
  and the worker count and restarts (`supervisor.read_status`, as `/metrics`). The
  statistics are cumulative counts and histograms; the page turns successive reads
  into rates and percentiles. Memory and load time are the answering worker's: each
  worker builds every version itself.
- the drift report of the version shown (`GET /v2/models/{m}/versions/{v}/drift`),
  only while the drift view is open;
- once, `GET /dashboard/api/whoami`: the caller's token name and roles, so that the
  page shows the rollout buttons only to an operator. The buttons call the rollout
  endpoints themselves, so each action is checked and audited as any other.

Access (see `access`): the page and its scripts hold no data and load without a
token (a browser cannot send one when it opens a URL); the page asks for a token,
keeps it in the tab's sessionStorage only, and every read above needs the reader role.
"""

import os
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tidegate import __version__
from tidegate.auth import AuthFile, Role
from tidegate.control import ControlPlane
from tidegate.errors import NotFound, TidegateError
from tidegate.stats import LATENCY_BOUNDS_S
from tidegate.supervisor import RUN_DIR_ENV, read_status
from tidegate.v2 import json_response, server_stats

PREFIX = "/dashboard"
STATIC = f"{PREFIX}/static/"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page runs only its own scripts and styles, and talks only to this server.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _read_static() -> dict[str, tuple[bytes, str]]:
    """Every file of the page, read once: name -> (bytes, media type)."""
    files = {}
    for entry in resources.files("tidegate").joinpath("dashboard_static").iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in _MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    return files


def _started() -> float:
    """When the server started (wall clock, seconds): under a supervisor, the
    supervisor's start, so that a restarted worker does not make the server look
    young; else this process's."""
    if os.environ.get(RUN_DIR_ENV) is not None:
        started = _process_start(os.getppid())
        if started is not None:
            return started
    return time.time()


def _process_start(pid: int) -> float | None:
    """A process's start time from /proc (Linux): boot time plus its start in ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class Dashboard:
    def __init__(
        self,
        control: ControlPlane,
        auth: AuthFile | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.control = control
        self.auth = auth
        self.clock = clock
        self.started = _started()
        self.files = _read_static()

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX, self.page, methods=["GET"]),
            Route(f"{PREFIX}/", self.slash, methods=["GET"]),
            Route(f"{STATIC}{{name}}", self.static, methods=["GET"]),
            Route(f"{PREFIX}/api/whoami", self.whoami, methods=["GET"]),
            Route(f"{PREFIX}/api/summary", self.summary, methods=["GET"]),
        ]

    def _file(self, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            raise NotFound(f"no dashboard file '{name}'")
        body, media_type = found
        return Response(body, media_type=media_type, headers=_HEADERS)

    async def page(self, request: Request) -> Response:
        return self._file("index.html")

    async def slash(self, request: Request) -> Response:
        return RedirectResponse(PREFIX, status_code=308)

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    async def whoami(self, request: Request) -> Response:
        """The caller's token name and the roles it may act in (admin implies all)."""
        if self.auth is None:
            roles = [role.value for role in Role]
            return json_response({"name": None, "access_control": False, "roles": roles})
        principal = self.auth.authenticate(request.headers.get("authorization"))
        roles = [role.value for role in Role if principal.has(role)]
        return json_response({"name": principal.name, "access_control": True, "roles": roles})

    async def _model(self, name: str) -> dict[str, Any]:
        """A model's traffic status, and its rollout's if it has one. A running rollout's
        status carries the step's window of every worker; the traffic status takes it
        from there rather than asking the workers a second time."""
        control = self.control
        rollout = control.rollouts.get(name)
        if rollout is None:
            return {"traffic": await control.read_traffic(name)}
        status = await control.read_rollout(name)
        if "window" not in status:
            return {"traffic": await control.read_traffic(name), "rollout": status}
        traffic = control.traffic_status(name)
        traffic["window"] = status["window"]
        return {"traffic": traffic, "rollout": status}

    async def summary(self, request: Request) -> Response:
        control = self.control
        registry = control.registry
        deployments = list(registry.deployments())
        totals = await server_stats(control.peers, deployments)
        versions = []
        for deployment, stats in zip(deployments, totals, strict=True):
            versions.append(
                {
                    "model": deployment.name,
                    "version": deployment.version_label,
                    "state": "READY",
                    "memory_bytes": deployment.memory_bytes,
                    "load_seconds": deployment.load_seconds,
                    "max_batch_size": deployment.max_batch_size,
                    "drift": deployment.drift is not None,
                    "stats": stats.to_state(),
                }
            )
        models: dict[str, dict[str, Any]] = {}
        for name in sorted({d.name for d in deployments}):
            try:  # a model unloaded meanwhile is left out
                models[name] = await self._model(name)
            except TidegateError:
                continue
        run_dir = control.peers.run_dir
        status = (1, {}) if run_dir is None else read_status(run_dir)
        workers, restarts = status if status is not None else (None, {})
        now = self.clock()
        return json_response(
            {
                "server": {
                    "version": __version__,
                    "time": now,
                    "uptime_s": now - self.started,
                    "workers": workers,
                    "worker_restarts": restarts,
                    "load_failures": dict(registry.load_failures),
                },
                "latency_bounds_s": list(LATENCY_BOUNDS_S),
                "versions": versions,
                "models": models,
            }
        )
