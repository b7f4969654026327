"""The `tidegate` command line. The only click and rich importer; the server, the
control client and rich load lazily, inside the commands, so that `tidegate --help`
stays fast."""

import contextlib
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

    from tidegate.client import ControlClient, IndexRow, ServerMetadata
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
    help="Where traffic policies, rollouts and the audit log live "
    "(default: REPOSITORY/.tidegate).",
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
    state_dir: Path | None,
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
        state_dir=None if state_dir is None else state_dir.resolve(),
    )
    if threads is not None:
        config = replace(config, executor_threads=threads)
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
