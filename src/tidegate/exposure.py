"""Whether a server may listen where it is told to: a light module, so that the
supervisor of `--workers N` checks it without importing the serving stack."""

import ipaddress
import logging

from tidegate.config import ServerConfig
from tidegate.errors import ConfigError

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


def check_grpc_port(config: ServerConfig) -> None:
    """Refuses at once, by name, a gRPC port another program holds: the gRPC server
    would only fail later, inside the server's start-up, after the models loaded. A port held by
    tidegate's own workers (SO_REUSEPORT, the same user) is free to share."""
    if not config.grpc_port:
        return
    from tidegate.supervisor import reserve_port

    try:
        reserve_port(config.host, config.grpc_port).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot serve gRPC on {config.host}:{config.grpc_port}: {exc.strerror} "
            "(--grpc-port 0 turns gRPC off)"
        ) from exc
