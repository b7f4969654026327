"""The only uvicorn importer: runs the app on uvloop + httptools.

Graceful shutdown is uvicorn's: on SIGINT/SIGTERM it stops accepting
connections, lets in-flight requests finish (up to `graceful_timeout` seconds),
then runs the lifespan shutdown, which waits for running inferences.
"""

import contextlib
import logging
import socket

import uvicorn

from tidegate.app import create_app
from tidegate.config import ServerConfig
from tidegate.connection import protocol_class
from tidegate.exposure import check_exposure, check_grpc_port
from tidegate.jsonlog import configure_logging
from tidegate.peers import worker_peers
from tidegate.supervisor import reserve_port

log = logging.getLogger("tidegate.server")


def serve(
    config: ServerConfig,
    *,
    access_log: bool = False,
    graceful_timeout: int = 30,
    worker: bool = False,
) -> None:
    """Runs the server until SIGTERM or SIGINT. `worker`: as one worker of a
    supervisor (see `supervisor`), on the shared port and its private socket."""
    configure_logging(config.log_level, config.log_format == "json")
    check_exposure(config)
    check_grpc_port(config)
    app = create_app(config)
    uvicorn_config = uvicorn.Config(
        app.asgi,
        host=config.host,
        port=config.port,
        loop="uvloop",
        # httptools, answering malformed and oversized requests in the V2 error format,
        # and infer requests without an ASGI cycle, except with the access log (which
        # uvicorn's cycle writes).
        http=protocol_class(
            config.max_header_bytes,
            config.max_headers,
            None if access_log else app.direct_infer,
            app.busy_poll,
        ),
        timeout_keep_alive=config.keep_alive_s,
        lifespan="on",
        access_log=access_log,
        log_level=config.log_level,
        log_config=None,  # configure_logging's handlers, for uvicorn's loggers too
        timeout_graceful_shutdown=graceful_timeout,
        server_header=False,
        # Nothing reads the client's address, so X-Forwarded-For need not be parsed
        # on every request.
        proxy_headers=False,
    )
    server = uvicorn.Server(uvicorn_config)
    server.run(sockets=_worker_sockets(config) if worker else None)


def _worker_sockets(config: ServerConfig) -> list[socket.socket]:
    """The shared port (SO_REUSEPORT, as the supervisor's and every worker's) and this
    worker's private socket; bound, not listening: uvicorn listens once the models
    are loaded, so no connection waits on a worker that is starting."""
    public = reserve_port(config.host, config.port)
    peers = worker_peers()
    path = peers.socket(peers.me or "")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private.bind(str(path))
    return [public, private]
