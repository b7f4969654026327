"""What the command modules share: the errors a command ends with, the options of the
control commands (--url, --token, --json), the control client with its errors turned
into click's, the console, and small number helpers. Light on purpose: click only;
rich and the control client load inside the functions that use them."""

import contextlib
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

    from tidegate.client import ControlClient

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


url_option = click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="TIDEGATE_URL",
    metavar="URL",
    show_envvar=True,
    help="The tidegate server; 'host:port' means http://host:port.",
)
token_option = click.option(
    "--token",
    default=None,
    envvar="TIDEGATE_TOKEN",
    metavar="TOKEN",
    show_envvar=True,
    help="Bearer token, for a server with access control (serve --auth-file). Prefer the "
    "environment variable: a command line shows in the process list.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
)


@contextlib.contextmanager
def control(url: str, token: str | None = None) -> Iterator["ControlClient"]:
    """A client for `url`, with its errors turned into click's, in one place. The token
    is never part of a message: it is a secret."""
    from tidegate.client import ControlClient, ServerError, Unreachable

    try:
        ControlClient(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from exc
    try:
        client = ControlClient(url, token=token)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--token' / TIDEGATE_TOKEN") from exc
    try:
        yield client
    except Unreachable as exc:
        raise ServerUnreachable(f"cannot reach tidegate at {exc.url}: {exc.reason}") from exc
    except ServerError as exc:
        message = exc.message
        if exc.status == 401 and token is None:
            message += " (give a token with --token or TIDEGATE_TOKEN)"
        raise CommandError(message) from exc


def make_console() -> "Console":
    from rich.console import Console

    # No highlighting: model names and numbers are data, not syntax. Rich leaves out
    # colours and spinners by itself when stdout is not a terminal.
    return Console(highlight=False)


Decorated = TypeVar("Decorated", bound=Callable[..., Any])


def parse_numbers(text: str | None, kind: Callable[[str], Any]) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from exc


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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


def print_drift(report: dict[str, Any]) -> None:
    """A version's drift report as a table of its features (`tidegate drift`, `fleet drift`)."""
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
    console = make_console()
    # Eleven columns of numbers: never squeeze them into 80 columns by cutting digits.
    console.width = max(console.width, 132)
    console.print(table)
