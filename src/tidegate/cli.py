"""The `tidegate` command line. The only click and rich importer; the server, the
control client and rich load lazily, inside the commands, so that `tidegate --help`
stays fast."""

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import click

from tidegate import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from tidegate.client import ControlClient, IndexRow, RolloutAction, ServerMetadata
    from tidegate.loadgen import Plan, Tally

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
    threads: int | None,
    poll_interval: float | None,
    state_dir: Path | None,
    auth_file: Path | None,
    insecure_no_auth: bool,
    request_log_dir: Path | None,
    request_log_sample: float,
    request_log_payload: bool,
    access_log: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the models of REPOSITORY (default: ./models)."""
    from tidegate.config import ServerConfig
    from tidegate.errors import TidegateError
    from tidegate.server import serve as run_server

    config = ServerConfig(
        repository=repository.resolve(),
        host=host,
        port=port,
        max_body_bytes=max_body_size,
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
    try:
        run_server(config, access_log=access_log)
    except TidegateError as exc:  # a refused binding, a broken auth file
        raise CommandError(exc.message) from exc


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
def _control(url: str, token: str | None = None) -> Iterator["ControlClient"]:
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


def _console() -> "Console":
    from rich.console import Console

    # No highlighting: model names and numbers are data, not syntax. Rich leaves out
    # colours and spinners by itself when stdout is not a terminal.
    return Console(highlight=False)


@main.command(short_help="Show the server and the state of each model version.")
@url_option
@token_option
@json_option
def status(url: str, token: str | None, as_json: bool) -> None:
    """Show the server and every model version of its repository, with its state."""
    with _control(url, token) as client:
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
    with _control(url, token) as client:
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
@token_option
@json_option
def drift(model: str, version: int | None, url: str, token: str | None, as_json: bool) -> None:
    """Show MODEL's drift statistics: per feature and output, against the reference."""
    with _control(url, token) as client:
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


# -- traffic, canaries, rollouts and the audit log ---------------------------------------

ROLLED_BACK_EXIT = 4  # `tidegate rollout` watched the rollout end in a rollback
INTERRUPTED_EXIT = 130  # Ctrl-C while watching: 128 + SIGINT, as shells report it
WATCH_INTERVAL_S = 0.5  # between two looks at a rollout being watched
_FINISHED = ("promoted", "rolled_back")
_STATUS_STYLES = {
    "running": "cyan",
    "paused": "yellow",
    "promoted": "green",
    "rolled_back": "red",
}
_CHECK_STYLES = {"pass": "green", "fail": "red", "continue": "yellow"}


def _wide(console: "Console") -> "Console":
    """Tables of reasons and numbers: give them room when the output is a file or pipe,
    where nothing wraps; on a terminal the terminal's width rules (a live display wider
    than the terminal cannot redraw itself)."""
    if not console.is_terminal:
        console.width = max(console.width, 132)
    return console


@main.command(short_help="Give a canary version a share of a model's traffic.")
@click.argument("model")
@click.argument("version", required=False, type=click.IntRange(min=1))
@click.option(
    "--weight",
    type=click.FloatRange(0, 100),
    default=None,
    metavar="PERCENT",
    help="The canary's share, 0-100: of requests, or with --shadow of mirrored copies.",
)
@click.option(
    "--shadow",
    is_flag=True,
    help="Stable answers every request; the canary also runs on a mirrored share and its "
    "answers are compared with stable's. Default: split (the canary answers its share).",
)
@click.option(
    "--stable",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Also pin the stable version. Default: keep the model's current stable.",
)
@click.option("--clear", is_flag=True, help="Remove the canary: stable answers everything.")
@url_option
@token_option
@json_option
def canary(
    model: str,
    version: int | None,
    weight: float | None,
    shadow: bool,
    stable: int | None,
    clear: bool,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Send --weight percent of MODEL's traffic to VERSION, beside stable (or mirror it,
    with --shadow); or remove the canary with --clear. Prints the resulting policy and
    the traffic window of each side.

    VERSION must be loaded (`tidegate load MODEL --version N`). While a rollout is in
    progress it owns the traffic, and the server refuses a change."""
    fields: dict[str, Any]
    if clear:
        if version is not None or weight is not None or shadow:
            raise click.UsageError("--clear takes no VERSION, --weight or --shadow")
        fields = {"canary": None, "weight": 0}
    elif version is None or weight is None:
        raise click.UsageError("give VERSION and --weight, or --clear to remove the canary")
    else:
        fields = {"canary": str(version), "weight": weight, "mode": "shadow" if shadow else "split"}
    if stable is not None:
        fields["stable"] = str(stable)
    with _control(url, token) as client:
        document = client.set_traffic(model, **fields)
    _show_traffic(document, as_json)


@main.command(short_help="Show a model's traffic policy and canary window.")
@click.argument("model")
@url_option
@token_option
@json_option
def traffic(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Show which version of MODEL is stable, its canary if any (version, weight, mode),
    and while there is one, each side's requests, errors and latency so far."""
    with _control(url, token) as client:
        document = client.traffic(model)
    _show_traffic(document, as_json)


def _show_traffic(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"{document.get('model_name', '?')}: {_policy_text(document)}")
    window = document.get("window")
    if isinstance(window, dict):
        console = _wide(_console())
        for renderable in _window_renderables(window):
            console.print(renderable)


def _policy_text(policy: Mapping[str, Any]) -> str:
    """`stable 1, canary 2 at 10 % (split)`; a stable of None is the highest loaded."""
    stable = policy.get("stable")
    text = "stable " + ("(highest loaded)" if stable is None else str(stable))
    canary = policy.get("canary")
    if canary is None:
        return text + ", no canary"
    return text + f", canary {canary} at {_percent(policy.get('weight'))} ({policy.get('mode')})"


def _percent(value: object) -> str:
    return f"{value:g} %" if isinstance(value, int | float) else "? %"


def _window_renderables(window: Mapping[str, Any]) -> list[Any]:
    """The window of a canary's step as a table of both sides, and lines for the split
    and the shadow comparison."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    table.add_column("side")
    for column in ("requests", "errors", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_column("predictions", overflow="fold")
    for side in ("stable", "canary"):
        numbers = window.get(side) or {}
        table.add_row(
            side,
            str(numbers.get("requests", "")),
            str(numbers.get("errors", "")),
            _ms(numbers.get("latency_p50_ms")),
            _ms(numbers.get("latency_p99_ms")),
            Text(_classes(numbers.get("predictions"))),
        )
    lines: list[Any] = [table]
    split = window.get("split") or {}
    unkeyed = split.get("stable", 0) + split.get("canary", 0)
    text = f"window: {window.get('seconds', 0):.1f} s"
    if unkeyed:
        share = 100 * split.get("canary", 0) / unkeyed
        text += f"; random split of unkeyed requests: {split.get('canary', 0)} of {unkeyed}"
        text += f" to the canary ({share:.1f} %)"
    lines.append(Text(text))
    shadow = window.get("shadow")
    if isinstance(shadow, dict):
        rows = shadow.get("rows", 0)
        rate = f" ({100 * shadow.get('disagreeing', 0) / rows:.1f} %)" if rows else ""
        lines.append(
            Text(
                f"shadow: {shadow.get('mirrored', 0)} mirrored, {shadow.get('dropped', 0)} "
                f"dropped; {shadow.get('disagreeing', 0)} of {rows} rows predicted "
                f"differently{rate}"
            )
        )
    return lines


def _classes(predictions: object, most: int = 8) -> str:
    """`0:99 1:122 2:99`: rows per predicted class (the first `most` classes)."""
    if not isinstance(predictions, dict):
        return ""
    items = [f"{label}:{rows}" for label, rows in predictions.items()]
    return " ".join(items[:most]) + (" …" if len(items) > most else "")


def _steps(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    steps = _numbers(value, float)
    if len(steps) < 2 or steps[-1] != 100 or any(a >= b for a, b in itertools.pairwise(steps)):
        raise click.BadParameter("give two or more increasing weights ending at 100, e.g. 5,50,100")
    return steps


# (option, the rollout request's key, click type, metavar, help): sent only when given, so the
# model's [rollout] section supplies the rest.
_ROLLOUT_SETTINGS: list[tuple[str, str, Any, str, str]] = [
    (
        "--min-rows",
        "min_rows",
        click.IntRange(min=1),
        "N",
        "Canary requests a step needs before it can pass (default 500).",
    ),
    (
        "--min-dwell",
        "min_dwell_s",
        click.FloatRange(min=0),
        "S",
        "Seconds each step lasts at least (default 30).",
    ),
    (
        "--max-dwell",
        "max_dwell_s",
        click.FloatRange(min=0),
        "S",
        "Seconds after which a step that still fails a non-critical check (latency) rolls "
        "back; without any verdict it holds, and says so (default 600).",
    ),
    (
        "--epoch",
        "epoch_s",
        click.FloatRange(min=0.01),
        "S",
        "Seconds between two looks of the judge (default 1).",
    ),
    (
        "--alpha",
        "alpha",
        click.FloatRange(0, 1, min_open=True, max_open=True),
        "P",
        "Chance of rolling back a canary as good as stable, over the whole rollout (default 0.05).",
    ),
    (
        "--error-margin",
        "error_margin",
        click.FloatRange(min=0),
        "F",
        "The canary's error rate may be stable's times 1 + F (default 0.1).",
    ),
    (
        "--latency-p99-ratio",
        "latency_p99_ratio",
        click.FloatRange(min=1),
        "R",
        "Budget for canary p99 / stable p99 latency (default 1.5).",
    ),
    (
        "--min-latency-samples",
        "min_latency_samples",
        click.IntRange(min=1),
        "N",
        "Successful requests per side before latency is judged (default 200).",
    ),
    (
        "--psi",
        "psi",
        click.FloatRange(min=0),
        "X",
        "Class-share PSI from which a significant prediction shift fails (default 0.1).",
    ),
    (
        "--disagreement",
        "disagreement",
        click.FloatRange(0, 1, min_open=True, max_open=True),
        "P",
        "Shadow mode: budget for the share of rows predicted differently (default 0.05).",
    ),
]


def _rollout_settings(command: _Command) -> _Command:
    for option, key, kind, metavar, help_text in reversed(_ROLLOUT_SETTINGS):
        command = click.option(
            option, key, type=kind, default=None, metavar=metavar, help=help_text
        )(command)
    return command


@main.command(short_help="Roll a version out in judged steps, and watch it.")
@click.argument("model")
@click.argument("version", required=False, type=click.IntRange(min=1))
@click.option(
    "--steps",
    callback=_steps,
    metavar="W,W,...",
    help="The canary's weights in percent, increasing, ending at 100 (default 5,25,50,100).",
)
@click.option(
    "--shadow/--split",
    default=None,
    help="Shadow: stable answers everything and the canary runs on a mirrored share; "
    "split: the canary answers its share (default: the model's [rollout] mode, split).",
)
@_rollout_settings
@click.option("--detach", is_flag=True, help="Start the rollout and return at once.")
@url_option
@token_option
@json_option
def rollout(
    model: str,
    version: int | None,
    steps: list[float] | None,
    shadow: bool | None,
    detach: bool,
    url: str,
    token: str | None,
    as_json: bool,
    **settings: Any,
) -> None:
    """Roll VERSION of MODEL out as a canary, step by step, then watch it to its end.

    At each weight of --steps the server's judge compares the canary with stable on
    the same window (errors, latency, predicted classes, and in shadow mode the rows
    predicted differently). A critical failure rolls it back at once; a step that
    passes with its minimum rows and dwell advances, and passing the step before
    100 % promotes the canary. The settings default to the model's [rollout] section.

    Without VERSION: watch the model's rollout in progress, or show how the last one
    ended (with --detach: show it once; with --json: print its status document).

    \b
    Exit status, when watching:
      0  the rollout was promoted
      4  it was rolled back
      1  the server refused (error: ... on stderr)
      3  the server cannot be reached
    Ctrl-C stops the watching only (exit status 130): the rollout continues on
    the server; `tidegate rollback MODEL` stops it.
    """
    options = {key: value for key, value in settings.items() if value is not None}
    if steps is not None:
        options["steps"] = steps
    if shadow is not None:
        options["mode"] = "shadow" if shadow else "split"
    if version is None and options:
        raise click.UsageError("rollout settings take a VERSION to start a rollout with")
    with _control(url, token) as client:
        if version is None:
            document = client.rollout(model)
        else:
            document = client.start_rollout(model, version, **options)
        if as_json:
            click.echo(json.dumps(document, indent=2))
            return
        if version is not None:
            click.echo(f"started: {_status_line(document)}")
        if detach:
            if version is None:
                _wide(_console()).print(_rollout_view(document))
            else:
                click.echo(f"watch it with: tidegate rollout {model}")
            return
        document = _watch(client, model, document)
    click.echo(_status_line(document))
    if document.get("status") == "rolled_back":
        raise click.exceptions.Exit(ROLLED_BACK_EXIT)


def _watch(client: "ControlClient", model: str, document: dict[str, Any]) -> dict[str, Any]:
    """Redraws the rollout every WATCH_INTERVAL_S until it is promoted or rolled back;
    returns its last status. Ctrl-C leaves the rollout running and exits 130."""
    from rich.live import Live

    console = _wide(_console())
    interrupted = False
    try:
        with Live(_rollout_view(document), console=console, auto_refresh=False) as live:
            while document.get("status") not in _FINISHED:
                time.sleep(WATCH_INTERVAL_S)
                document = client.rollout(model)
                live.update(_rollout_view(document), refresh=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _end_live(console)
    if interrupted:
        click.echo(
            f"stopped watching: the rollout of {model} continues on the server "
            f"(watch it again with: tidegate rollout {model}; stop it with: "
            f"tidegate rollback {model})",
            err=True,
        )
        raise click.exceptions.Exit(INTERRUPTED_EXIT)
    return document


def _end_live(console: "Console") -> None:
    """Ends the line of the last view: to a file or pipe `Live` draws only that last view,
    once, and without a newline (a terminal gets its own)."""
    if not console.is_terminal:
        console.line()


def _status_line(document: Mapping[str, Any]) -> str:
    """`wine: the rollout of version 3 (stable 1) is running at step 1/4, 5 %: <reason>`."""
    status = str(document.get("status", "?"))
    steps = document.get("steps") or []
    line = (
        f"{document.get('model_name', '?')}: the rollout of version {document.get('canary')} "
        f"(stable {document.get('stable')}) is {status.replace('_', ' ')} at step "
        f"{document.get('step')}/{len(steps)}, {_percent(document.get('weight'))}"
    )
    reason = document.get("reason")
    return f"{line}: {reason}" if reason else line


def _rollout_view(document: Mapping[str, Any]) -> Any:
    """What the watch draws: where the rollout stands, the judge's last look with each
    check's verdict, numbers and reason, and the step's traffic window."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    status = str(document.get("status", "?"))
    head = Text(
        f"{document.get('model_name', '?')}: version {document.get('canary')} against "
        f"stable {document.get('stable')}, {document.get('mode')} mode: "
    )
    head.append(status.replace("_", " "), style=_STATUS_STYLES.get(status, ""))
    config = document.get("config") or {}
    steps = document.get("steps") or []
    where = (
        f"step {document.get('step')}/{len(steps)} at {_percent(document.get('weight'))} "
        f"(steps {', '.join(f'{w:g}' for w in steps)} %)"
    )
    if status not in _FINISHED:
        where += f", {document.get('seconds_in_step', 0):.1f} s in the step"
        if config:
            where += (
                f"; a step needs {config.get('min_rows')} canary requests and "
                f"{config.get('min_dwell_s'):g} s"
            )
    parts: list[Any] = [head, Text(where)]
    judgement = document.get("judgement")
    if not isinstance(judgement, dict):
        parts.append(Text("judge: no look yet"))
    else:
        parts.append(Text(f"judge: {judgement.get('action')}: {judgement.get('reason')}"))
        table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
        table.add_column("check")
        table.add_column("verdict")
        table.add_column("numbers")
        table.add_column("reason", overflow="fold")
        for check in judgement.get("checks") or []:
            verdict = str(check.get("verdict", ""))
            # A critical failure rolls back at once; say so where it shows.
            said = (
                f"{verdict} (critical)" if verdict == "fail" and check.get("critical") else verdict
            )
            table.add_row(
                Text(str(check.get("name", ""))),
                Text(said, style=_CHECK_STYLES.get(verdict, "")),
                Text(_check_numbers(check)),
                Text(str(check.get("reason", ""))),
            )
        parts.append(table)
    window = document.get("window")
    if isinstance(window, dict):
        parts.extend(_window_renderables(window))
    return Group(*parts)


def _check_numbers(check: Mapping[str, Any]) -> str:
    """A check's key numbers, short; any other check's first few numbers as they come."""
    n = check.get("numbers") or {}
    try:
        return _KEY_NUMBERS[check["name"]](n)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        shown = [f"{key} {_g(value)}" for key, value in n.items() if value is not None]
        return ", ".join(shown[:4])


def _g(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


def _ratio(n: Mapping[str, Any]) -> str:
    """A likelihood ratio against its threshold (as e^x when it overflows a float)."""
    ratio, log = n.get("likelihood_ratio"), n.get("log_likelihood_ratio")
    said = _g(ratio) if ratio is not None else f"e^{log:.0f}"
    return f"LR {said} / {_g(n['threshold'])}"


def _validity_numbers(n: Mapping[str, Any]) -> str:
    total = n["split_stable"] + n["split_canary"]
    text = f"canary {n['split_canary']} of {total} (expected {n['expected_canary']:.0f})"
    return text + (f", p {_g(n['p_value'])}" if n.get("p_value") is not None else "")


def _errors_numbers(n: Mapping[str, Any]) -> str:
    text = (
        f"canary {n['canary_errors']}/{n['canary_requests']}, "
        f"stable {n['stable_errors']}/{n['stable_requests']}"
    )
    return text + (f", {_ratio(n)}" if n.get("log_likelihood_ratio") is not None else "")


def _latency_numbers(n: Mapping[str, Any]) -> str:
    if n.get("ratio") is None:
        return (
            f"samples canary {n['canary_samples']}, stable {n['stable_samples']} "
            f"(need {n['min_samples']})"
        )
    return (
        f"p99 {n['canary_p99_ns'] / 1e6:.3g} / {n['stable_p99_ns'] / 1e6:.3g} ms "
        f"= {n['ratio']:.2f} (budget {n['budget']:g})"
    )


def _predictions_numbers(n: Mapping[str, Any]) -> str:
    text = f"rows canary {n['canary_rows']}, stable {n['stable_rows']}"
    if n.get("psi") is None:
        return text
    return text + f", PSI {n['psi']:.3g} (gate {n['psi_gate']:g}), p {_g(n['p_value'])}"


def _disagreement_numbers(n: Mapping[str, Any]) -> str:
    text = f"{n['disagreeing']} of {n['rows']} rows differ"
    if n.get("rate") is None:
        return text
    return text + f" ({n['rate']:.1%}, budget {n['budget']:.1%}), {_ratio(n)}"


_KEY_NUMBERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "validity": _validity_numbers,
    "errors": _errors_numbers,
    "latency": _latency_numbers,
    "predictions": _predictions_numbers,
    "disagreement": _disagreement_numbers,
}


@main.command(short_help="Promote a model's rollout now.")
@click.argument("model")
@url_option
@token_option
@json_option
def promote(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Promote MODEL's rollout now, without waiting for the judge: the canary takes all
    the traffic and the old stable version is unloaded once its requests finish."""
    _act("promote", model, url, token, as_json)


@main.command(short_help="Roll a model's rollout back now.")
@click.argument("model")
@url_option
@token_option
@json_option
def rollback(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Roll MODEL's rollout back now: stable takes all the traffic again, and a canary
    that the rollout loaded is unloaded."""
    _act("rollback", model, url, token, as_json)


@main.command(short_help="Hold a model's rollout at its step.")
@click.argument("model")
@url_option
@token_option
@json_option
def pause(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Pause MODEL's rollout: the canary keeps its weight and the judge stops looking
    until `tidegate resume MODEL`."""
    _act("pause", model, url, token, as_json)


@main.command(short_help="Resume a model's paused rollout.")
@click.argument("model")
@url_option
@token_option
@json_option
def resume(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Resume MODEL's paused rollout at its step; the step's traffic window starts
    afresh."""
    _act("resume", model, url, token, as_json)


def _act(action: "RolloutAction", model: str, url: str, token: str | None, as_json: bool) -> None:
    with _control(url, token) as client:
        document = client.rollout_action(model, action)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(_status_line(document))


@main.command(short_help="Show the audit log of control actions.")
@click.option("--model", default=None, help="Only this model's entries.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Only the last N entries (default: the server's last 1000).",
)
@url_option
@token_option
@json_option
def audit(model: str | None, limit: int | None, url: str, token: str | None, as_json: bool) -> None:
    """Show who changed what, when and why, oldest first: traffic changes, rollouts
    and the judge's own decisions, loads and unloads, as the server's audit log has
    them (with --json, the checks behind each of the judge's decisions too)."""
    with _control(url, token) as client:
        document = client.audit(model, limit)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    entries = document.get("entries") or []
    if not entries:
        click.echo("no audit entries" + (f" for model {model}" if model else ""))
    else:
        _print_audit(entries)
    unreadable = document.get("unreadable_lines")
    if unreadable:
        click.echo(f"({unreadable} unreadable lines of the log skipped)")


def _print_audit(entries: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    for column in ("time", "actor", "action", "model", "versions", "step", "outcome"):
        table.add_column(column, no_wrap=column == "time")
    table.add_column("reason", overflow="fold")
    for entry in entries:
        versions, step = _audit_details(entry)
        outcome = str(entry.get("outcome", ""))
        table.add_row(
            Text(str(entry.get("time", ""))),
            Text(str(entry.get("actor", ""))),
            Text(str(entry.get("action", ""))),
            Text(str(entry.get("model") or "")),
            Text(versions),
            Text(step),
            Text(outcome, style=_STATUS_STYLES.get(outcome, "")),
            Text(str(entry.get("reason", ""))),
        )
    _wide(_console()).print(table)


def _audit_details(entry: Mapping[str, Any]) -> tuple[str, str]:
    """An entry's versions and its step (or the weight of a traffic policy)."""
    versions, step = "", ""
    named = entry.get("versions")
    policy = entry.get("policy")
    if isinstance(named, dict):
        versions = f"stable {named.get('stable')}, canary {named.get('canary')}"
    elif isinstance(policy, dict):
        versions = _policy_text(policy).split(" at ")[0]
        if policy.get("canary") is not None:
            step = f"{_percent(policy.get('weight'))} {policy.get('mode')}"
    elif entry.get("version") is not None:
        versions = f"version {entry['version']}"
    if entry.get("step") is not None:
        step = f"{entry['step']}, {_percent(entry.get('weight'))}"
    return versions, step


# -- bench: a load generator for any V2 server ------------------------------------------


def _numbers(text: str | None, kind: Callable[[str], Any]) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from exc


_OUTPUT_FILE = click.Path(dir_okay=False, path_type=Path)


_BENCH_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--arrivals",),
        {
            "type": click.Choice(["constant", "poisson"]),
            "default": "constant",
            "help": "Open loop: evenly spaced or Poisson arrivals.",
        },
    ),
    (
        ("--duration",),
        {"type": click.FloatRange(min=0.1), "default": 10.0, "help": "Seconds measured per level."},
    ),
    (
        ("--warmup",),
        {
            "type": click.FloatRange(min=0),
            "default": 2.0,
            "help": "Seconds sent, not measured, before each level.",
        },
    ),
    (
        ("--timeout",),
        {
            "type": click.FloatRange(min=0.001),
            "default": 30.0,
            "help": "Seconds before a request times out.",
        },
    ),
    (("--batch-size",), {"type": click.IntRange(min=1), "default": 1, "help": "Rows per request."}),
    (
        ("--protocol",),
        {
            "type": click.Choice(["json", "binary"]),
            "default": "json",
            "help": "V2 JSON, or Triton's binary tensor extension.",
        },
    ),
    (
        ("--max-connections",),
        {
            "type": click.IntRange(min=1),
            "default": 1024,
            "help": "Open loop: most connections; more requests wait.",
        },
    ),
    (
        ("--pipeline",),
        {
            "type": click.IntRange(min=1),
            "default": 1,
            "help": "Closed loop: requests in flight per connection (HTTP/1.1 pipelining).",
        },
    ),
    (
        ("--processes",),
        {
            "type": click.IntRange(min=1),
            "default": 1,
            "help": "Client processes sharing each level.",
        },
    ),
    (
        (
            "--json",
            "json_path",
        ),
        {
            "type": _OUTPUT_FILE,
            "default": None,
            "help": "Write every number (and the histograms) to FILE.",
        },
    ),
    (
        (
            "--csv",
            "csv_path",
        ),
        {"type": _OUTPUT_FILE, "default": None, "help": "Write one row per level to FILE."},
    ),
    (
        ("--plot", "plot_path"),
        {
            "type": _OUTPUT_FILE,
            "default": None,
            "help": "Draw latency percentiles against throughput, and the latency "
            "distributions, to FILE.png.",
        },
    ),
    (
        ("--compare",),
        {
            "type": click.Path(exists=True, dir_okay=False, path_type=Path),
            "nargs": 2,
            "default": None,
            "help": "Instead of a load: put two --json results side by side.",
        },
    ),
]


def _bench_options(command: _Command) -> _Command:
    """Applies `_BENCH_OPTIONS`, in order, with their defaults shown in --help."""
    for names, settings in reversed(_BENCH_OPTIONS):
        command = click.option(*names, show_default=True, **settings)(command)
    return command


@main.command("token", short_help="Make a bearer token and its auth-file entry.")
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


@main.command(short_help="Load-test a V2 server (tidegate, MLServer, Triton).")
@click.argument("url", required=False)
@click.option("--model", help="The model to send requests to (required to run a load).")
@click.option("--version", default=None, help="A model version (default: the server's choice).")
@click.option("--concurrency", default=None, help="Closed loop: connections, e.g. 1,8,64.")
@click.option("--rate", default=None, help="Open loop: requests per second, e.g. 500,1000.")
@click.option(
    "--requests",
    "max_requests",
    type=click.IntRange(min=1),
    default=None,
    help="Stop a level after this many requests (warm-up included).",
)
@click.option(
    "--input",
    "source",
    default="random",
    show_default=True,
    help="random (from the model's metadata), FILE.npz (rows per input), or "
    "FILE.json (V2 requests, sent as they are).",
)
@_bench_options
def bench(
    url: str,
    model: str,
    version: str | None,
    concurrency: str | None,
    rate: str | None,
    arrivals: str,
    duration: float,
    warmup: float,
    timeout: float,
    max_requests: int | None,
    source: str,
    batch_size: int,
    protocol: str,
    max_connections: int,
    pipeline: int,
    processes: int,
    json_path: Path | None,
    csv_path: Path | None,
    plot_path: Path | None,
    compare: tuple[Path, Path] | None,
) -> None:
    """Drive URL's model with load levels and report throughput and latency; or, with
    --compare, show two earlier runs side by side."""
    from rich.live import Live

    from tidegate import bench as runner
    from tidegate.loadgen import Plan, Tally, Target

    if compare:
        _compare(compare, plot_path)
        return
    if url is None or model is None:
        raise click.UsageError("a load needs URL and --model (or give --compare A.json B.json)")
    try:
        target = Target.parse(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from exc
    concurrencies = _numbers(concurrency, int)
    rates = _numbers(rate, float)
    if concurrencies and rates:
        raise click.UsageError("give --concurrency (closed loop) or --rate (open loop), not both")
    if any(c < 1 for c in concurrencies) or any(r <= 0 for r in rates):
        raise click.BadParameter("levels must be positive")
    base = Plan(
        duration=duration,
        warmup=warmup,
        timeout=timeout,
        max_requests=max_requests,
        max_connections=max_connections,
        pipeline=pipeline,
    )
    plans = [replace(base, concurrency=c) for c in concurrencies or ([] if rates else [1])]
    plans += [replace(base, rate=r, poisson=arrivals == "poisson") for r in rates]
    try:
        prepared = runner.prepare(target, model, version, source, batch_size, protocol == "binary")
    except OSError as exc:
        raise ServerUnreachable(f"cannot reach {url}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    console = _console()
    results = []
    rows = []
    for plan in plans:
        what = f"{plan.mode} loop at {plan.level:g} " + (
            "connections" if plan.mode == "closed" else "requests/s"
        )
        before = runner.server_stats(target, model, version)
        live = Tally()
        with Live(_Progress(what, plan, live, processes), console=console, transient=True):
            result = runner.run(target, model, version, prepared, plan, processes, live)
        after = runner.server_stats(target, model, version)
        row = runner.summary(result, runner.server_times(before, after))
        results.append((result, row))
        rows.append(row)
        console.print(f"[dim]{what}: {row['ok']} ok, {row['errors']} errors[/dim]")
    _print_bench(console, rows)
    meta = {
        "url": url,
        "model": model,
        "version": version,
        "protocol": protocol,
        "batch_size": batch_size,
        "input": source,
        "processes": processes,
    }
    if json_path is not None:
        runner.write_json(json_path, meta, results)
    if csv_path is not None:
        runner.write_csv(csv_path, rows)
    if plot_path is not None:
        from tidegate.benchplot import plot

        plot([(f"{model} {protocol}", rows)], plot_path)


def _compare(paths: tuple[Path, Path], plot_path: Path | None) -> None:
    """Levels of two --json results, matched by mode and level, B against A."""
    from rich.table import Table

    from tidegate import bench as runner

    try:
        a, b = (runner.read_json(path) for path in paths)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    table = Table(title=f"A: {paths[0]}   B: {paths[1]}")
    for column in (
        "mode",
        "level",
        "A req/s",
        "B req/s",
        "B/A",
        "A p50",
        "B p50",
        "B/A",
        "A p99",
        "B p99",
        "B/A",
    ):
        table.add_column(column, justify="left" if column == "mode" else "right")
    theirs = {(level["mode"], level["level"]): level for level in b["levels"]}
    for mine in a["levels"]:
        other = theirs.get((mine["mode"], mine["level"]))
        if other is None:
            continue
        cells = [mine["mode"], f"{mine['level']:g}"]
        for key in ("ok_per_s", "p50_ms", "p99_ms"):
            x, y = mine[key], other[key]
            ratio = f"{y / x:.2f}" if x and y is not None else "-"
            cells += [
                _ms(x) if key != "ok_per_s" else f"{x:,.0f}",
                _ms(y) if key != "ok_per_s" else f"{y:,.0f}",
                ratio,
            ]
        table.add_row(*cells)
    console = _console()
    console.width = max(console.width, 140)
    console.print(table)
    if plot_path is not None:
        from tidegate.benchplot import plot

        plot([(str(paths[0]), a["levels"]), (str(paths[1]), b["levels"])], plot_path)


class _Progress:
    """What `rich.live.Live` redraws while a level runs: time, and counts so far."""

    def __init__(self, what: str, plan: "Plan", tally: "Tally", processes: int) -> None:
        self._what, self._plan, self._tally, self._processes = what, plan, tally, processes
        self._started = time.monotonic()

    def __rich__(self) -> str:
        elapsed = time.monotonic() - self._started
        plan, tally = self._plan, self._tally
        phase = "warming up" if elapsed < plan.warmup else "measuring"
        text = f"{self._what}: {phase}, {elapsed:.1f} / {plan.warmup + plan.duration:g} s"
        if self._processes == 1:
            text += f", {tally.ok:,} ok, {sum(tally.errors.values()):,} errors"
        return text


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_bench(console: "Console", rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="tidegate bench")
    for column in (
        "mode",
        "level",
        "req/s",
        "rows/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "server ms",
        "client cpu",
    ):
        table.add_column(column, justify="left" if column == "mode" else "right")
    notes = set()
    for row in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in row["error_kinds"].items()) or "0"
        server = "-"
        if "server_total_ms" in row:
            server = f"{row['server_total_ms']:.3f} (q {row['server_queue_ms']:.3f})"
        table.add_row(
            row["mode"] + (f" {row['arrivals']}" if row["arrivals"] else ""),
            f"{row['level']:g}",
            f"{row['ok_per_s']:,.0f}",
            f"{row['rows_per_s']:,.0f}",
            _ms(row["p50_ms"]),
            _ms(row["p90_ms"]),
            _ms(row["p99_ms"]),
            _ms(row["p99.9_ms"]),
            _ms(row["max_ms"]),
            errors,
            server,
            f"{row['client_cpu'] * 100:.0f} %",
        )
        if row["excludes_waiting"]:
            notes.add(
                "closed loop: latencies exclude the time requests would have waited "
                "while the server stalled (use --rate for that)"
            )
        if row["client_cpu"] > 0.9 or (row["client_lag_p99_ms"] or 0) > 5:
            notes.add(
                f"at level {row['level']:g} the client itself was busy (CPU "
                f"{row['client_cpu'] * 100:.0f} %, loop lag p99 "
                f"{_ms(row['client_lag_p99_ms'])} ms): try --processes"
            )
        if (row["client_late_p99_ms"] or 0) > 5:
            notes.add(
                f"at rate {row['level']:g} requests left up to "
                f"{_ms(row['client_late_p99_ms'])} ms late (p99): the client fell behind"
            )
    console.width = max(console.width, 140)
    console.print(table)
    for note in sorted(notes):
        console.print(f"[yellow]note:[/yellow] {note}")
