"""The `tidegate` command line. The only click and rich importer; the server, the
control client and rich load lazily, inside the commands, so that `tidegate --help`
stays fast."""

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import click

from tidegate import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from tidegate.client import ControlClient, IndexRow, ServerMetadata

DEFAULT_URL = "http://127.0.0.1:8000"


class CommandError(click.ClickException):
    """A control command failed on the server's side: `error: ...` on stderr, exit code 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        # Lower-case "error:" as the server words it, not click's "Error:".
        click.echo(f"error: {self.format_message()}", file=file, err=True)


class ServerUnreachable(CommandError):
    """No answer from the server; exit code 3, so scripts can tell "down" from "said no"."""

    exit_code = 3


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
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(
    repository: Path,
    host: str,
    port: int,
    max_body_size: int,
    threads: int | None,
    poll_interval: float | None,
    access_log: bool,
    log_level: str,
) -> None:
    """Serve the models of REPOSITORY (default: ./models)."""
    from tidegate.config import ServerConfig
    from tidegate.server import serve as run_server

    config = ServerConfig(
        repository=repository.resolve(),
        host=host,
        port=port,
        max_body_bytes=max_body_size,
        poll_interval=poll_interval,
        log_level=log_level,
        **({} if threads is None else {"executor_threads": threads}),
    )
    run_server(config, access_log=access_log)


# -- control commands: they talk to a running server over HTTP -------------------------

url_option = click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="TIDEGATE_URL",
    metavar="URL",
    show_envvar=True,
    help="The tidegate server; 'host:port' means http://host:port.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
)


@contextlib.contextmanager
def _control(url: str) -> Iterator["ControlClient"]:
    """A client for `url`, with its errors turned into click's, in one place."""
    from tidegate.client import ControlClient, ServerError, Unreachable

    try:
        client = ControlClient(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from exc
    try:
        yield client
    except Unreachable as exc:
        raise ServerUnreachable(f"cannot reach tidegate at {exc.url}: {exc.reason}") from exc
    except ServerError as exc:
        raise CommandError(exc.message) from exc


def _console() -> "Console":
    from rich.console import Console

    # No highlighting: model names and numbers are data, not syntax. Rich leaves out
    # colours and spinners by itself when stdout is not a terminal.
    return Console(highlight=False)


@main.command(short_help="Show the server and the state of each model version.")
@url_option
@json_option
def status(url: str, as_json: bool) -> None:
    """Show the server and every model version of its repository, with its state."""
    with _control(url) as client:
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
    _console().print(table)


def _mebibytes(row: Mapping[str, object]) -> str:
    size = row.get("memory_bytes")
    if isinstance(size, bool) or not isinstance(size, int | float):
        return ""
    return f"{size / 2**20:.1f} MiB"


_Command = TypeVar("_Command", bound=Callable[..., Any])


def _version_option(help_text: str) -> Callable[[_Command], _Command]:
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
@json_option
def load(model: str, version: int | None, url: str, as_json: bool) -> None:
    """(Re)load MODEL from the server's repository; returns once it serves."""
    _change("load", model, version, url, as_json)


@main.command(short_help="Stop serving a model.")
@click.argument("model")
@_version_option("Unload only this version. Default: every version of the model.")
@url_option
@json_option
def unload(model: str, version: int | None, url: str, as_json: bool) -> None:
    """Stop serving MODEL; requests in flight finish first."""
    _change("unload", model, version, url, as_json)


def _change(
    action: Literal["load", "unload"], model: str, version: int | None, url: str, as_json: bool
) -> None:
    which = model if version is None else f"{model} (version {version})"
    with _control(url) as client:
        call = client.load if action == "load" else client.unload
        if as_json:
            call(model, version)
        else:
            # A load returns only once the model is warm, which can take a while.
            with _console().status(f"{action}ing {which}…"):
                call(model, version)
        versions = _serving_versions(client, model)
    if as_json:
        document = {
            "action": action,
            "model": model,
            "version": None if version is None else str(version),
            "versions": versions,
        }
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"{action}ed {which}")
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
@json_option
def drift(model: str, version: int | None, url: str, as_json: bool) -> None:
    """Show MODEL's drift statistics: per feature and output, against the reference."""
    with _control(url) as client:
        document = client.drift(model, version)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    for report in [document] if version is not None else document["versions"]:
        _print_drift(report)


_VERDICT_STYLES = {"drift": "red", "no_drift": "green", "insufficient_data": "yellow"}
_DRIFT_COLUMNS = (
    # (header, report key, format)
    ("rows", "rows", "{:.0f}"),
    ("PSI", "psi", "{:.3f}"),
    ("JS", "js_distance", "{:.3f}"),
    ("KS", "ks", "{:.3f}"),
    ("p-value", "p_value", "{:.2g}"),
    ("shift sd", "mean_shift_sigma", "{:+.2f}"),
    ("var ratio", "variance_ratio", "{:.2f}"),
    ("NaN", "nan_rate", "{:.1%}"),
    ("out of range", "out_of_range_rate", "{:.1%}"),
)


def _print_drift(report: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    head = f"{report['model_name']} version {report['model_version']}"
    state = report.get("state")
    if state != "ready":
        detail = ""
        if state == "collecting_reference":
            detail = f": {report['reference']['rows']}/{report['reference_rows_needed']} rows"
        click.echo(f"{head}: {state}{detail}")
        return
    summary, reference = report["summary"], report["reference"]
    click.echo(
        f"{head}: {summary['verdict']} | {summary['window_rows']:.0f} rows in window, "
        f"reference {reference['rows']} rows from {reference['source']}, "
        f"{report['dropped_batches']} batches dropped"
    )
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    table.add_column("feature")
    for header, _, _ in _DRIFT_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("verdict")
    for row in [*report["inputs"], *report["outputs"], *report["classes"]]:
        cells = [
            "" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in _DRIFT_COLUMNS
        ]
        verdict = row["verdict"]
        table.add_row(
            Text(row["name"]), *cells, Text(verdict, style=_VERDICT_STYLES.get(verdict, ""))
        )
    console = _console()
    # Eleven columns of numbers: never squeeze them into 80 columns by cutting digits.
    console.width = max(console.width, 132)
    console.print(table)
