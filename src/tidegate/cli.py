"""The `tidegate` command: the click group, `serve`, the model commands (status, load,
unload, drift) and `token`. The traffic and rollout commands live in cli_rollout.py and
`bench` in cli_bench.py; they are attached to the group at the end of this module. The
server, the control client and rich load lazily, inside the commands, so that
`tidegate --help` stays fast."""

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import click

from tidegate import __version__
from tidegate.cli_bench import bench
from tidegate.cli_common import (
    CommandError,
    Decorated,
    control,
    json_option,
    make_console,
    print_drift,
    token_option,
    url_option,
)
from tidegate.cli_fleet import fleet
from tidegate.cli_rollout import (
    audit,
    canary,
    pause,
    promote,
    resume,
    rollback,
    rollout,
    traffic,
)
from tidegate.config import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADERS,
)

if TYPE_CHECKING:
    from tidegate.client import ControlClient, IndexRow, ServerMetadata


@click.group()
@click.version_option(__version__, prog_name="tidegate")
def main() -> None:
    """tidegate: serve ONNX models over the KServe V2 protocol."""


@main.command()
@click.argument(
    "repository",
    default="models",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-body-size",
    default=64 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body in bytes; larger ones get 413.",
)
@click.option(
    "--max-header-size",
    default=DEFAULT_MAX_HEADER_BYTES,
    show_default=True,
    type=click.IntRange(1024),
    help="Largest request head in bytes (the target and every header line); larger "
    "ones get 431, a longer target alone 414.",
)
@click.option(
    "--max-headers",
    default=DEFAULT_MAX_HEADERS,
    show_default=True,
    type=click.IntRange(1),
    help="Most header fields in a request; more get 431.",
)
@click.option(
    "--keep-alive-timeout",
    default=DEFAULT_KEEP_ALIVE_S,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds an idle connection stays open after its last response.",
)
@click.option(
    "--busy-poll-us",
    default=DEFAULT_BUSY_POLL_US,
    show_default=True,
    type=click.IntRange(0, 1_000_000),
    help="Microseconds the event loop keeps polling after a response when clients come "
    "straight back with their next request, instead of sleeping (0: off).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="Inference threads, each running one batch at a time (default: half the CPU cores).",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.05),
    default=None,
    help="Also scan the repository every S seconds and (re)load versions whose files "
    "changed, once they are complete. Default: only the repository API changes models.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where traffic policies, rollouts and the audit log live (default: REPOSITORY/.tidegate).",
)
@click.option(
    "--auth-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of named bearer tokens (sha256) and their roles; re-read when it "
    "changes. Without one the server only binds loopback addresses.",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Serve a non-loopback address without an auth file: anyone who reaches the "
    "port may infer, load, unload and roll out models.",
)
@click.option(
    "--request-log",
    "request_log_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write a sampled log of inference requests (rotating JSON lines) to this directory.",
)
@click.option(
    "--request-log-sample",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="Fraction of inference requests the request log keeps.",
)
@click.option(
    "--request-log-payload",
    is_flag=True,
    help="Also log each sampled request's body and its response.",
)
@click.option(
    "--grpc-port",
    default=8001,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the V2 gRPC transport (0: off).",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    help="Worker processes serving the port (SO_REUSEPORT), or 'auto': one per core.",
)
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line (lifecycle events and errors carry their fields).",
)
def serve(
    repository: Path,
    host: str,
    port: int,
    max_body_size: int,
    max_header_size: int,
    max_headers: int,
    keep_alive_timeout: int,
    busy_poll_us: int,
    threads: int | None,
    poll_interval: float | None,
    state_dir: Path | None,
    auth_file: Path | None,
    insecure_no_auth: bool,
    request_log_dir: Path | None,
    request_log_sample: float,
    request_log_payload: bool,
    grpc_port: int,
    workers: str,
    access_log: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the models of REPOSITORY (default: ./models)."""
    from tidegate.config import ServerConfig
    from tidegate.errors import TidegateError

    config = ServerConfig(
        repository=repository.resolve(),
        host=host,
        port=port,
        grpc_port=grpc_port,
        max_body_bytes=max_body_size,
        max_header_bytes=max_header_size,
        max_headers=max_headers,
        keep_alive_s=keep_alive_timeout,
        busy_poll_us=busy_poll_us,
        poll_interval=poll_interval,
        log_level=log_level,
        log_format=log_format,
        state_dir=None if state_dir is None else state_dir.resolve(),
        auth_file=None if auth_file is None else auth_file.resolve(),
        insecure_no_auth=insecure_no_auth,
        request_log_dir=None if request_log_dir is None else request_log_dir.resolve(),
        request_log_sample=request_log_sample,
        request_log_payload=request_log_payload,
    )
    if threads is not None:
        config = replace(config, executor_threads=threads)
    count = _worker_count(workers)
    try:
        if count == 1:
            from tidegate.server import serve as run_server

            run_server(config, access_log=access_log)
            return
        # Not the serving stack: the supervisor only starts and restarts workers.
        from tidegate.exposure import check_exposure, check_grpc_port
        from tidegate.jsonlog import configure_logging
        from tidegate.supervisor import Supervisor

        configure_logging(config.log_level, config.log_format == "json")
        check_exposure(config)
        check_grpc_port(config)
        if config.auth_file is not None:  # refused here once, not by every worker in turn
            from tidegate.auth import parse_auth_file

            parse_auth_file(config.auth_file)
        code = Supervisor(config, count, access_log=access_log).run()
    except TidegateError as exc:  # a refused binding, a broken auth file
        raise CommandError(exc.message) from exc
    except OSError as exc:  # the port is taken
        raise CommandError(f"cannot serve on {host}:{port}: {exc.strerror}") from exc
    if code:
        sys.exit(code)


def _worker_count(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r} is not a number of workers >= 1 or 'auto'")
    return int(text)


# -- control commands: they talk to a running server over HTTP -------------------------


@main.command(short_help="Show the server and the state of each model version.")
@url_option
@token_option
@json_option
def status(url: str, token: str | None, as_json: bool) -> None:
    """Show the server and every model version of its repository, with its state."""
    with control(url, token) as client:
        server = client.server_metadata()
        rows = client.repository_index()
    if as_json:
        click.echo(json.dumps({"server": server, "models": rows}, indent=2))
    else:
        _print_status(client.url, server, rows)


_STATE_STYLES = {"READY": "green", "UNAVAILABLE": "red"}


def _print_status(url: str, server: "ServerMetadata", rows: list["IndexRow"]) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    extensions = ", ".join(server.get("extensions", [])) or "none"
    click.echo(f"{server.get('name', '?')} {server.get('version', '?')} at {url}")
    click.echo(f"extensions: {extensions}")
    if not rows:
        click.echo("no models in the repository")
        return
    # Servers may add keys to the rows; memory is shown when any row reports it.
    memory = [_mebibytes(row) for row in rows]
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    table.add_column("model")
    table.add_column("version", justify="right")
    table.add_column("state")
    if any(memory):
        table.add_column("memory", justify="right")
    table.add_column("reason", overflow="fold")  # paths in load errors stay whole
    for row, mib in zip(rows, memory, strict=True):
        state = str(row.get("state", ""))
        # Text, not str: a reason or name with [brackets] is not rich markup.
        cells = [
            Text(str(row.get("name", ""))),
            Text(str(row.get("version", ""))),
            Text(state, style=_STATE_STYLES.get(state, "")),
            *([Text(mib)] if any(memory) else []),
            Text(str(row.get("reason", ""))),
        ]
        table.add_row(*cells)
    make_console().print(table)


def _mebibytes(row: Mapping[str, object]) -> str:
    size = row.get("memory_bytes")
    if isinstance(size, bool) or not isinstance(size, int | float):
        return ""
    return f"{size / 2**20:.1f} MiB"


def _version_option(help_text: str) -> Callable[[Decorated], Decorated]:
    return click.option(
        "--version", type=click.IntRange(min=1), default=None, metavar="N", help=help_text
    )


@main.command(short_help="Load a model and wait until it serves.")
@click.argument("model")
@_version_option(
    "Load only this version, beside those serving. "
    "Default: the versions the model's policy selects, replacing those serving."
)
@url_option
@token_option
@json_option
def load(model: str, version: int | None, url: str, token: str | None, as_json: bool) -> None:
    """(Re)load MODEL from the server's repository; returns once it serves."""
    _change("load", model, version, url, token, as_json)


@main.command(short_help="Stop serving a model.")
@click.argument("model")
@_version_option("Unload only this version. Default: every version of the model.")
@url_option
@token_option
@json_option
def unload(model: str, version: int | None, url: str, token: str | None, as_json: bool) -> None:
    """Stop serving MODEL; requests in flight finish first."""
    _change("unload", model, version, url, token, as_json)


def _change(
    action: Literal["load", "unload"],
    model: str,
    version: int | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    which = model if version is None else f"{model} (version {version})"
    with control(url, token) as client:
        call = client.load if action == "load" else client.unload
        if as_json:
            nothing_done = call(model, version)
        else:
            # A load returns only once the model is warm, which can take a while.
            with make_console().status(f"{action}ing {which}…"):
                nothing_done = call(model, version)
        versions = _serving_versions(client, model)
    if as_json:
        document = {
            "action": action,
            "model": model,
            "version": None if version is None else str(version),
            "versions": versions,
        }
        if nothing_done is not None:  # an unload of what was not loaded
            document["message"] = nothing_done
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"{action}ed {which}" if nothing_done is None else nothing_done)
        click.echo(f"serving versions: {', '.join(versions) or 'none'}")


def _serving_versions(client: "ControlClient", model: str) -> list[str]:
    from tidegate.client import ServerError

    try:
        return client.model_metadata(model).get("versions", [])
    except ServerError as exc:
        if exc.status == 404:  # no version serves (after an unload, say)
            return []
        raise


@main.command(short_help="Show a model's drift against its reference.")
@click.argument("model")
@_version_option("Only this version. Default: every serving version.")
@url_option
@token_option
@json_option
def drift(model: str, version: int | None, url: str, token: str | None, as_json: bool) -> None:
    """Show MODEL's drift statistics: per feature and output, against the reference."""
    with control(url, token) as client:
        document = client.drift(model, version)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    for report in [document] if version is not None else document["versions"]:
        print_drift(report)


@click.command("token", short_help="Make a bearer token and its auth-file entry.")
@click.argument("name")
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(["reader", "inference", "operator", "admin"]),
    help="A role of the token (repeat for several).",
)
def make_token(name: str, roles: tuple[str, ...]) -> None:
    """Make a new bearer token for NAME: the token goes to stderr, shown this once, and
    the table to add to the auth file to stdout (`tidegate token ci --role operator
    >> auth.toml`). The file keeps only the token's sha256."""
    from tidegate.auth import hash_token, new_token, valid_token_name

    if not valid_token_name(name):
        raise click.BadParameter("use letters, digits, '_', '.' and '-'", param_hint="'NAME'")
    secret = new_token()
    click.echo(f"token for {name} (shown once, keep it): {secret}", err=True)
    listed = ", ".join(f'"{role}"' for role in dict.fromkeys(roles))
    click.echo(f'\n[tokens."{name}"]\nsha256 = "{hash_token(secret)}"\nroles = [{listed}]')


@click.group(short_help="Build the drift kernels ahead of time.")
def kernels() -> None:
    """The drift kernels, compiled ahead of time so that servers run them without Numba."""


@kernels.command("build", short_help="Compile the drift kernels for this machine.")
@click.option("--force", is_flag=True, help="Build again even if the cache holds a build.")
def build_kernels(force: bool) -> None:
    """Compile the drift kernels for this machine into the kernel cache
    ($TIDEGATE_KERNEL_CACHE, else $NUMBA_CACHE_DIR/tidegate-aot, else
    ~/.cache/tidegate/kernels) and check that they load, so that the first model with
    drift on loads them rather than building them. `make install` and the Dockerfile run
    this. Prints the extension's path; exit code 1 if it cannot be built."""
    from tidegate import kernel_backend

    try:
        kernel_backend.build(force=force)
        built = kernel_backend.aot()
    except kernel_backend.KernelBuildError as exc:
        if "\n" in exc.output:  # a one-line output is the error's own message
            click.echo(exc.output, err=True)
        raise CommandError(
            f"{exc}; servers will run Numba's JIT instead, "
            f"about {kernel_backend.JIT_EXTRA_MIB} MiB more memory each"
        ) from exc
    click.echo(built.origin)


# The commands of the other modules, and `token`, in this order in `main.commands` (the
# order of definition before the split; `tidegate --help` sorts them by name).
for _command in (
    canary,
    traffic,
    rollout,
    promote,
    rollback,
    pause,
    resume,
    audit,
    make_token,
    bench,
    kernels,
    fleet,
):
    main.add_command(_command)
