"""Builds the ASGI application: the route table, the error handler and the lifespan."""

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tidegate.access import AccessGate
from tidegate.auth import AuthFile
from tidegate.busy_poll import BusyPoll
from tidegate.canary import Traffic
from tidegate.config import GRPC_GRACE_S, ServerConfig
from tidegate.control import ControlPlane
from tidegate.control_api import ControlApi
from tidegate.dashboard import Dashboard
from tidegate.direct import DirectInfer
from tidegate.errors import TidegateError
from tidegate.executor import InferenceExecutor
from tidegate.infer import ASGIApp, InferRouter, error_parts
from tidegate.internal import InternalApi
from tidegate.metrics import (
    CONTENT_TYPE as METRICS_CONTENT_TYPE,
    GAUGE_MERGE,
    collectors,
    render,
    server_collectors,
    whole_server_drift,
)
from tidegate.metrics_merge import merge
from tidegate.observer import DriftObserver
from tidegate.peers import worker_peers
from tidegate.poller import RepositoryPoller
from tidegate.registry import Registry
from tidegate.requestlog import RequestLog, RequestLogConfig
from tidegate.v2 import DataPlane, json_response

log = logging.getLogger("tidegate.app")


async def _tidegate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TidegateError)
    status, headers, body = error_parts(exc)
    model = request.path_params.get("model")
    log.info(
        "%s %s: %d %s",
        request.method,
        request.url.path,
        status,
        exc.message,
        extra={"model": model, "status": status},
    )
    return Response(body, status, headers={k.decode(): v.decode() for k, v in headers})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404:
        message = f"no endpoint {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return json_response({"error": message}, exc.status_code)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # A bug, not bad input: log the traceback, answer in the V2 error format.
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)


def _routes(plane: DataPlane) -> list[Route]:
    model = "/v2/models/{model}"
    version = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v2/health/live", plane.live, methods=["GET"]),
        Route("/v2/health/ready", plane.ready, methods=["GET"]),
        Route("/v2", plane.server_metadata, methods=["GET"]),
        Route("/v2/models/stats", plane.model_stats, methods=["GET"]),
        Route("/v2/repository/index", plane.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", plane.repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", plane.repository_unload, methods=["POST"]),
    ]
    routes.append(Route(f"{version}/drift/state", plane.drift_state, methods=["GET"]))
    routes.append(Route(f"{version}/drift", plane.fleet_drift, methods=["POST"]))
    for prefix in (model, version):
        routes += [
            Route(prefix, plane.model_metadata, methods=["GET"]),
            Route(f"{prefix}/ready", plane.model_ready, methods=["GET"]),
            Route(f"{prefix}/config", plane.model_config, methods=["GET"]),
            Route(f"{prefix}/stats", plane.model_stats, methods=["GET"]),
            Route(f"{prefix}/drift", plane.drift, methods=["GET"]),
        ]
    return routes


@dataclass(frozen=True)
class Application:
    """The server's two ways in: the ASGI application, and the answerer of infer
    requests that the HTTP connection hands over without an ASGI cycle (`direct`); and
    the busy polling its connections share, HTTP's and gRPC's (None: off)."""

    asgi: ASGIApp
    direct_infer: DirectInfer
    busy_poll: BusyPoll | None


def create_app(config: ServerConfig) -> Application:
    """The tidegate application for one repository. Models load during startup.

    Inference requests are answered by `InferRouter`, straight from the connection or
    as a pure ASGI app in front of Starlette; Starlette serves the rest (and runs the
    lifespan)."""
    executor = InferenceExecutor(config.executor_threads)
    registry = Registry(config.repository, executor)
    observer = DriftObserver()
    busy_poll = BusyPoll(config.busy_poll_us / 1e6) if config.busy_poll_us else None
    traffic = Traffic(registry, observer)
    state_dir = config.state_dir or config.repository / ".tidegate"
    control = ControlPlane(registry, traffic, state_dir, worker_peers())
    auth = None  # one auth file for both transports
    if config.auth_file is not None:
        auth = AuthFile(config.auth_file, on_reload=_audit_reloads(control))
    plane = DataPlane(registry, executor, config.max_body_bytes, control)

    def count_in_flight() -> int:
        return router.in_flight

    request_log = None
    if config.request_log_dir is not None:
        request_log = RequestLog(
            RequestLogConfig(
                config.request_log_dir, config.request_log_sample, config.request_log_payload
            )
        )
    metrics = collectors(registry, observer, control, count_in_flight, request_log)
    server_metrics = server_collectors(control.peers.run_dir)

    def own_metrics() -> bytes:
        return render(metrics)

    async def metrics_endpoint(request: Request) -> Response:
        body = await asyncio.to_thread(own_metrics)
        if control.peers.enabled:  # the whole server's, whichever worker answers
            texts = [body.decode()]
            for reply in await control.peers.call("GET", "/internal/metrics"):
                if reply.status == 200 and isinstance(reply.body, dict):
                    texts.append(reply.body["exposition"])
                else:
                    log.warning("/metrics without worker %s: %s", reply.worker, reply.body)
            body = await asyncio.to_thread(merge, texts, GAUGE_MERGE)
            # Every version's at once: one round trip to the workers, not one per version.
            keys = [
                (d.name, d.version_label) for d in registry.deployments() if d.drift is not None
            ]
            states = await asyncio.gather(*(control.peers.drift_states(*key) for key in keys))
            others = dict(zip(keys, states, strict=True))
            body += await asyncio.to_thread(render, whole_server_drift(registry, others))
        body += await asyncio.to_thread(render, server_metrics)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        poller = (
            None
            if config.poll_interval is None
            else RepositoryPoller(registry, config.poll_interval)
        )
        if poller is not None:
            await poller.prime()
        await registry.load_all()
        await control.restore()
        # Everything alive now (modules, sessions, profiles) lives as long as the server:
        # keep it out of the collector's full passes, whose cost under load grows with
        # every object they visit.
        gc.freeze()
        observer.start()
        polling = None if poller is None else asyncio.create_task(poller.run())
        # Every server follows the desired state on disk: the workers of one server and
        # the replicas of a fleet sharing a state directory change it for each other.
        tasks = [asyncio.create_task(control.run()), asyncio.create_task(control.follow_forever())]
        grpc_server = None
        if config.grpc_port:  # imported only then: a server without gRPC loads none of it
            from tidegate import grpc_server as grpc_transport

            service = grpc_transport.InferenceService(router.core, control, executor, auth)
            grpc_server = await grpc_transport.start(
                service, config.host, config.grpc_port, config.max_body_bytes, busy_poll
            )
        try:
            yield
        finally:
            if grpc_server is not None:
                # As HTTP's drain: no new calls, those in flight finish (bounded).
                await grpc_server.stop(GRPC_GRACE_S)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if polling is not None:
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling
            # The server has stopped taking requests and drained those in flight.
            executor.shutdown()
            observer.stop()
            control.audit.close()
            if request_log is not None:
                request_log.close()

    app = Starlette(
        routes=[
            *_routes(plane),
            *ControlApi(control, config.max_body_bytes).routes(),
            *InternalApi(control, traffic, config.max_body_bytes, own_metrics).routes(),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *Dashboard(control, auth).routes(),
        ],
        lifespan=lifespan,
        exception_handlers={
            TidegateError: _tidegate_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    router = InferRouter(app, registry, traffic, observer, config.max_body_bytes, request_log)
    asgi: ASGIApp = router if auth is None else AccessGate(router, auth)
    return Application(asgi, DirectInfer(router, auth), busy_poll)


def _audit_reloads(control: ControlPlane) -> Callable[[bool, str], None]:
    """Audits each re-read of the auth file. Called on the event loop, by the request
    that noticed the change: the audit's fsync runs in a task, not in that request."""
    pending: set[asyncio.Task[None]] = set()

    def reloaded(ok: bool, detail: str) -> None:
        outcome = "done" if ok else "failed"
        record = control.record("auth-file", "auth.reload", None, outcome, detail)
        task = asyncio.get_running_loop().create_task(record)
        pending.add(task)
        task.add_done_callback(pending.discard)

    return reloaded
