"""The only uvicorn importer: runs the app on uvloop + httptools.

Graceful shutdown is uvicorn's: on SIGINT/SIGTERM it stops accepting
connections, lets in-flight requests finish (up to `graceful_timeout` seconds),
then runs the lifespan shutdown, which waits for running inferences.
"""

import ipaddress
import logging

import uvicorn

from tidegate.app import create_app
from tidegate.config import ServerConfig
from tidegate.connection import protocol_class
from tidegate.errors import ConfigError
from tidegate.jsonlog import configure_logging

log = logging.getLogger("tidegate.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(config: ServerConfig) -> None:
    """Refuses to serve beyond loopback without an auth file, unless told to: anyone
    who reaches the port could otherwise load, unload and roll out models."""
    if config.auth_file is not None or is_loopback(config.host):
        return
    if not config.insecure_no_auth:
        raise ConfigError(
            f"refusing to serve on {config.host} without an auth file: pass --auth-file FILE, "
            "or --insecure-no-auth to let anyone who reaches the port control the server"
        )
    log.warning(
        "serving on %s WITHOUT authentication (--insecure-no-auth): anyone who reaches "
        "port %d may infer, load, unload and roll out models",
        config.host,
        config.port,
    )


def serve(config: ServerConfig, *, access_log: bool = False, graceful_timeout: int = 30) -> None:
    configure_logging(config.log_level, config.log_format == "json")
    check_exposure(config)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        loop="uvloop",
        # httptools, answering malformed and oversized requests in the V2 error format.
        http=protocol_class(config.max_header_bytes, config.max_headers),
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
