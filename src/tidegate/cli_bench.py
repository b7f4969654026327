"""`tidegate bench`: the load generator's command line, for any V2 server. The load
itself runs in tidegate.bench and tidegate.loadgen; this module parses the levels, draws
the progress and prints the tables (and compares two saved runs)."""

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tidegate.cli_common import (
    CommandError,
    Decorated,
    ServerUnreachable,
    format_ms,
    make_console,
    parse_numbers,
)

if TYPE_CHECKING:
    from rich.console import Console

    from tidegate.loadgen import Plan, Tally

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
            # json and binary: what --protocol meant before gRPC, HTTP with that --encoding.
            "type": click.Choice(["http", "grpc", "json", "binary"]),
            "default": "http",
            "help": "V2 over HTTP, or over gRPC (URL is then the gRPC server's host:port, "
            "tensors go raw); json and binary: HTTP with that --encoding.",
        },
    ),
    (
        ("--encoding",),
        {
            "type": click.Choice(["json", "binary"]),
            "default": "json",
            "help": "HTTP: V2 JSON, or Triton's binary tensor extension.",
        },
    ),
    (
        ("--max-connections",),
        {
            "type": click.IntRange(min=1),
            "default": 1024,
            "help": "Open loop: most connections (gRPC: calls in flight); more requests wait.",
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


def _bench_options(command: Decorated) -> Decorated:
    """Applies `_BENCH_OPTIONS`, in order, with their defaults shown in --help."""
    for names, settings in reversed(_BENCH_OPTIONS):
        command = click.option(*names, show_default=True, **settings)(command)
    return command


@click.command(short_help="Load-test a V2 server (tidegate, MLServer, Triton).")
@click.argument("url", required=False)
@click.option("--model", help="The model to send requests to (required to run a load).")
@click.option("--version", default=None, help="A model version (default: the server's choice).")
@click.option(
    "--concurrency",
    default=None,
    help="Closed loop: connections (gRPC: calls in flight), e.g. 1,8,64.",
)
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
    encoding: str,
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
    if protocol in ("json", "binary"):
        protocol, encoding = "http", protocol
    try:
        target = Target.parse(url, grpc=protocol == "grpc")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from exc
    concurrencies = parse_numbers(concurrency, int)
    rates = parse_numbers(rate, float)
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
        prepared = runner.prepare(target, model, version, source, batch_size, encoding == "binary")
    except OSError as exc:
        raise ServerUnreachable(f"cannot reach {url}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    console = make_console()
    results = []
    rows = []
    for plan in plans:
        what = f"{plan.mode} loop at {plan.level:g} " + (
            ("calls in flight" if target.grpc else "connections")
            if plan.mode == "closed"
            else "requests/s"
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
        "encoding": "raw" if protocol == "grpc" else encoding,
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

        plot([(f"{model} {protocol} {meta['encoding']}", rows)], plot_path)


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
                format_ms(x) if key != "ok_per_s" else f"{x:,.0f}",
                format_ms(y) if key != "ok_per_s" else f"{y:,.0f}",
                ratio,
            ]
        table.add_row(*cells)
    console = make_console()
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
            format_ms(row["p50_ms"]),
            format_ms(row["p90_ms"]),
            format_ms(row["p99_ms"]),
            format_ms(row["p99.9_ms"]),
            format_ms(row["max_ms"]),
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
                f"{format_ms(row['client_lag_p99_ms'])} ms): try --processes"
            )
        if (row["client_late_p99_ms"] or 0) > 5:
            notes.add(
                f"at rate {row['level']:g} requests left up to "
                f"{format_ms(row['client_late_p99_ms'])} ms late (p99): the client fell behind"
            )
    console.width = max(console.width, 140)
    console.print(table)
    for note in sorted(notes):
        console.print(f"[yellow]note:[/yellow] {note}")
