"""`tidegate fleet`: the replicas of one deployment, read and judged as one (see
`fleet`): status, traffic, drift, and the fleet-judged rollout."""

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from tidegate.cli_common import (
    CommandError,
    ServerUnreachable,
    json_option,
    make_console,
    print_drift,
    token_option,
)
from tidegate.cli_rollout import ROLLED_BACK_EXIT, rollout_options, rollout_request, status_line

if TYPE_CHECKING:
    from tidegate.fleet import Fleet, Look

replicas_option = click.option(
    "--replicas",
    required=True,
    envvar="TIDEGATE_REPLICAS",
    show_envvar=True,
    metavar="URL,...",
    help="The replicas: comma-separated URLs or host:port, or a DNS name:port that "
    "resolves to every replica (a Kubernetes headless Service).",
)


@contextlib.contextmanager
def _fleet(replicas: str, token: str | None) -> Iterator["Fleet"]:
    """The fleet, with its errors turned into click's: a replica that does not answer
    exits 3 naming it, a refusal exits 1 with the server's message."""
    from tidegate.client import ServerError, Unreachable
    from tidegate.fleet import Fleet, Incomplete, replica_urls

    specs = [spec for spec in replicas.split(",") if spec.strip()]
    try:
        if not replica_urls(specs):
            raise ValueError("no replicas given")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--replicas'") from exc
    try:
        yield Fleet(specs, token)
    except Incomplete as exc:
        raise ServerUnreachable(str(exc)) from exc
    except Unreachable as exc:
        raise ServerUnreachable(f"cannot reach {exc.url}: {exc.reason}") from exc
    except ServerError as exc:
        raise CommandError(exc.message) from exc


@click.group(short_help="Read and judge the replicas of a deployment as one.")
def fleet() -> None:
    """Commands over every replica of a deployment that share one desired state (a
    shared --state-dir): each reads every replica, adds up what they count, and names
    any replica that does not answer (exit status 3)."""


@fleet.command(short_help="Each replica's generation, models and rollouts.")
@replicas_option
@token_option
@json_option
def status(replicas: str, token: str | None, as_json: bool) -> None:
    """Show the desired state each replica serves: its generation, the versions of
    each model, and each rollout's status. Exit status 3 when one does not answer."""
    with _fleet(replicas, token) as fleet_:
        answers, failures = fleet_.gather(lambda client: client.applied_state())
    if as_json:
        click.echo(json.dumps({"replicas": answers, "failures": failures}, indent=2))
    else:
        _print_status(answers, failures)
    if failures:
        raise click.exceptions.Exit(ServerUnreachable.exit_code)


def _print_status(answers: dict[str, dict[str, Any]], failures: dict[str, str]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    for column in ("replica", "generation", "models", "rollouts"):
        table.add_column(column)
    for url, document in sorted(answers.items()):
        state = document["state"]
        models = " ".join(
            f"{name}:{','.join(sorted(versions, key=int))}"
            for name, versions in sorted(state["models"].items())
        )
        rollouts = " ".join(
            f"{name}:{r['status']}@{r['config']['steps'][r['step']]:g}%"
            for name, r in sorted(state["rollouts"].items())
        )
        table.add_row(url, str(document["generation"]), models or "-", rollouts or "-")
    for url, why in sorted(failures.items()):
        table.add_row(url, "-", f"[red]did not answer: {why}[/red]", "")
    generations = {document["generation"] for document in answers.values()}
    make_console().print(table)
    if len(generations) > 1:
        click.echo(f"replicas on different generations: {sorted(generations)} (catching up?)")


@fleet.command(short_help="A model's traffic split over every replica.")
@click.argument("model")
@replicas_option
@token_option
@json_option
def traffic(model: str, replicas: str, token: str | None, as_json: bool) -> None:
    """Show MODEL's policy on each replica and its canary window added up over all
    of them: requests per side and the canary's share."""
    with _fleet(replicas, token) as fleet_:
        views, windows = fleet_.windows(model)
    merged = None if windows is None else windows.to_json()
    if as_json:
        click.echo(json.dumps({"replicas": views, "window": merged}, indent=2))
        return
    for url, view in sorted(views.items()):
        policy = view["policy"]
        canary = policy.get("canary")
        split = f", canary {canary} at {policy['weight']:g} % ({policy['mode']})" if canary else ""
        click.echo(f"{url}: generation {view['generation']}, stable {policy['stable']}{split}")
    if merged is None:
        click.echo(f"{model} has no canary: stable answers every request")
        return
    assert windows is not None
    stable, canary = windows.stable, windows.canary
    total = stable.requests + canary.requests
    share = 100 * canary.requests / total if total else 0.0
    click.echo(
        f"all {len(views)} replicas: {total} requests, canary {canary.requests} "
        f"({share:.2f} %), errors stable {stable.errors} canary {canary.errors}"
    )


@fleet.command(short_help="A model's drift over every replica's traffic.")
@click.argument("model")
@click.option("--version", default=None, help="One version (default: each serving version).")
@replicas_option
@token_option
@json_option
def drift(model: str, version: str | None, replicas: str, token: str | None, as_json: bool) -> None:
    """Show MODEL's drift report over the traffic of every replica: their drift
    states added up, then reported as one server that saw it all would report it."""
    with _fleet(replicas, token) as fleet_:
        if version is None:
            versions = fleet_.clients()[0].model_metadata(model).get("versions", [])
        else:
            versions = [version]
        reports = [fleet_.drift(model, v) for v in versions]
    if as_json:
        click.echo(json.dumps({"model_name": model, "versions": reports}, indent=2))
        return
    for report in reports:
        print_drift(report)


@fleet.command(short_help="Roll a version out, judged on every replica's traffic.")
@click.argument("model")
@click.argument("version", required=False, type=click.IntRange(min=1))
@rollout_options
@replicas_option
@token_option
@json_option
def rollout(
    model: str,
    version: int | None,
    steps: list[float] | None,
    shadow: bool | None,
    replicas: str,
    token: str | None,
    as_json: bool,
    **settings: Any,
) -> None:
    """Roll VERSION of MODEL out on every replica and judge it here, to its end, on
    the windows of all of them added up. Without VERSION: take up judging the
    model's fleet-judged rollout in progress (after this command was stopped).

    Each decision (advance, promote, roll back) is applied once, through one replica,
    audited once, and waited for until every replica serves it. While a replica does
    not answer the rollout pauses, naming it; it resumes once all answer again.
    The replicas' own judges leave a fleet-judged rollout alone: while this command
    is not running, the rollout holds at its step.

    \b
    Exit status: 0 promoted, 4 rolled back, 1 refused, 3 no replica answers.
    """
    from tidegate.fleet import FleetJudge

    options = rollout_request(version, steps, shadow, settings)
    with _fleet(replicas, token) as fleet_:
        if version is not None:
            started = fleet_.clients()[0].start_rollout(model, version, judge="fleet", **options)
            click.echo(f"started: {status_line(started)}", err=as_json)
        judge = FleetJudge(fleet_, model)
        while True:
            look = judge.look()
            _report(look, as_json)
            if look.finished:
                break
            epoch = (look.rollout or {}).get("config", {}).get("epoch_s", 1.0)
            time.sleep(float(epoch))
    if look.status == "rolled_back":
        raise click.exceptions.Exit(ROLLED_BACK_EXIT)


def _report(look: "Look", as_json: bool) -> None:
    """One line per look: JSON lines with --json, else text."""
    windows = look.windows
    if as_json:
        record = {"status": look.status, "action": look.action, "reason": look.reason}
        click.echo(json.dumps({**record, "window": windows and windows.to_json()}))
        return
    counts = ""
    if windows is not None:
        canary, stable = windows.canary.requests, windows.stable.requests
        counts = f" [canary {canary}, stable {stable} requests]"
    click.echo(f"{time.strftime('%H:%M:%S')} {look.action}: {look.reason}{counts}")
    if look.finished and look.rollout is not None:
        click.echo(status_line(look.rollout))
