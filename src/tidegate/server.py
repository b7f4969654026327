"""The only uvicorn importer: runs the app on uvloop + httptools.

Graceful shutdown is uvicorn's: on SIGINT/SIGTERM it stops accepting
connections, lets in-flight requests finish (up to `graceful_timeout` seconds),
then runs the lifespan shutdown, which waits for running inferences.
"""

import logging

import uvicorn

from tidegate.app import create_app
from tidegate.config import ServerConfig


def serve(config: ServerConfig, *, access_log: bool = False, graceful_timeout: int = 30) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=access_log,
        log_level=config.log_level,
        timeout_graceful_shutdown=graceful_timeout,
        server_header=False,
        # Nothing reads the client's address, so X-Forwarded-For need not be parsed
        # on every request.
        proxy_headers=False,
    )
