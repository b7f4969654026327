"""The `tidegate` command line. The only click importer; server modules load lazily
so that `tidegate --help` stays fast."""

from pathlib import Path

import click

from tidegate import __version__


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
    help="Inference threads (default: one per CPU core).",
)
@click.option(
    "--max-pending",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Inferences that may wait for a thread before new ones get 503.",
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
    max_pending: int,
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
        max_pending=max_pending,
        poll_interval=poll_interval,
        log_level=log_level,
        **({} if threads is None else {"executor_threads": threads}),
    )
    run_server(config, access_log=access_log)
