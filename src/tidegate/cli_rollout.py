"""The traffic and rollout commands: canary, traffic, rollout, promote, rollback, pause,
resume and audit, with their rich views (the canary window, the rollout and the
judge's checks, the audit log). Defined here as bare click commands; cli.py attaches
them to `tidegate`."""

import itertools
import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import click

from tidegate.cli_common import (
    Decorated,
    control,
    format_ms,
    json_option,
    make_console,
    parse_numbers,
    token_option,
    url_option,
)

if TYPE_CHECKING:
    from rich.console import Console

    from tidegate.client import ControlClient, RolloutAction

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


def wide(console: "Console") -> "Console":
    """Tables of reasons and numbers: give them room when the output is a file or pipe,
    where nothing wraps; on a terminal the terminal's width rules (a live display wider
    than the terminal cannot redraw itself)."""
    if not console.is_terminal:
        console.width = max(console.width, 132)
    return console


@click.command(short_help="Give a canary version a share of a model's traffic.")
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
    with control(url, token) as client:
        document = client.set_traffic(model, **fields)
    _show_traffic(document, as_json)


@click.command(short_help="Show a model's traffic policy and canary window.")
@click.argument("model")
@url_option
@token_option
@json_option
def traffic(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Show which version of MODEL is stable, its canary if any (version, weight, mode),
    and while there is one, each side's requests, errors and latency so far."""
    with control(url, token) as client:
        document = client.traffic(model)
    _show_traffic(document, as_json)


def _show_traffic(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"{document.get('model_name', '?')}: {_policy_text(document)}")
    window = document.get("window")
    if isinstance(window, dict):
        console = wide(make_console())
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
            format_ms(numbers.get("latency_p50_ms")),
            format_ms(numbers.get("latency_p99_ms")),
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
    steps = parse_numbers(value, float)
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


def rollout_options(command: Decorated) -> Decorated:
    """--steps, --shadow/--split and the judge's settings: a new rollout's options (see
    `rollout_request`)."""
    for option, key, kind, metavar, help_text in reversed(_ROLLOUT_SETTINGS):
        command = click.option(
            option, key, type=kind, default=None, metavar=metavar, help=help_text
        )(command)
    command = click.option(
        "--shadow/--split",
        default=None,
        help="Shadow: stable answers everything and the canary runs on a mirrored share; "
        "split: the canary answers its share (default: the model's [rollout] mode, split).",
    )(command)
    return click.option(
        "--steps",
        callback=_steps,
        metavar="W,W,...",
        help="The canary's weights in percent, increasing, ending at 100 (default 5,25,50,100).",
    )(command)


def rollout_request(
    version: int | None, steps: list[float] | None, shadow: bool | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """The options of a rollout request from `rollout_options`' values: only those
    given, so that the model's [rollout] section supplies the rest."""
    options = {key: value for key, value in settings.items() if value is not None}
    if steps is not None:
        options["steps"] = steps
    if shadow is not None:
        options["mode"] = "shadow" if shadow else "split"
    if version is None and options:
        raise click.UsageError("rollout settings take a VERSION to start a rollout with")
    return options


@click.command(short_help="Roll a version out in judged steps, and watch it.")
@click.argument("model")
@click.argument("version", required=False, type=click.IntRange(min=1))
@rollout_options
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
    options = rollout_request(version, steps, shadow, settings)
    with control(url, token) as client:
        if version is None:
            document = client.rollout(model)
        else:
            document = client.start_rollout(model, version, **options)
        if as_json:
            click.echo(json.dumps(document, indent=2))
            return
        if version is not None:
            click.echo(f"started: {status_line(document)}")
        if detach:
            if version is None:
                wide(make_console()).print(rollout_view(document))
            else:
                click.echo(f"watch it with: tidegate rollout {model}")
            return
        document = _watch(client, model, document)
    click.echo(status_line(document))
    if document.get("status") == "rolled_back":
        raise click.exceptions.Exit(ROLLED_BACK_EXIT)


def _watch(client: "ControlClient", model: str, document: dict[str, Any]) -> dict[str, Any]:
    """Redraws the rollout every WATCH_INTERVAL_S until it is promoted or rolled back;
    returns its last status. Ctrl-C leaves the rollout running and exits 130."""
    from rich.live import Live

    console = wide(make_console())
    interrupted = False
    try:
        with Live(rollout_view(document), console=console, auto_refresh=False) as live:
            while document.get("status") not in _FINISHED:
                time.sleep(WATCH_INTERVAL_S)
                document = client.rollout(model)
                live.update(rollout_view(document), refresh=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        end_live(console)
    if interrupted:
        click.echo(
            f"stopped watching: the rollout of {model} continues on the server "
            f"(watch it again with: tidegate rollout {model}; stop it with: "
            f"tidegate rollback {model})",
            err=True,
        )
        raise click.exceptions.Exit(INTERRUPTED_EXIT)
    return document


def end_live(console: "Console") -> None:
    """Ends the line of the last view: to a file or pipe `Live` draws only that last view,
    once, and without a newline (a terminal gets its own)."""
    if not console.is_terminal:
        console.line()


def status_line(document: Mapping[str, Any]) -> str:
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


def rollout_view(document: Mapping[str, Any]) -> Any:
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


@click.command(short_help="Promote a model's rollout now.")
@click.argument("model")
@url_option
@token_option
@json_option
def promote(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Promote MODEL's rollout now, without waiting for the judge: the canary takes all
    the traffic and the old stable version is unloaded once its requests finish."""
    _act("promote", model, url, token, as_json)


@click.command(short_help="Roll a model's rollout back now.")
@click.argument("model")
@url_option
@token_option
@json_option
def rollback(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Roll MODEL's rollout back now: stable takes all the traffic again, and a canary
    that the rollout loaded is unloaded."""
    _act("rollback", model, url, token, as_json)


@click.command(short_help="Hold a model's rollout at its step.")
@click.argument("model")
@url_option
@token_option
@json_option
def pause(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Pause MODEL's rollout: the canary keeps its weight and the judge stops looking
    until `tidegate resume MODEL`."""
    _act("pause", model, url, token, as_json)


@click.command(short_help="Resume a model's paused rollout.")
@click.argument("model")
@url_option
@token_option
@json_option
def resume(model: str, url: str, token: str | None, as_json: bool) -> None:
    """Resume MODEL's paused rollout at its step; the step's traffic window starts
    afresh."""
    _act("resume", model, url, token, as_json)


def _act(action: "RolloutAction", model: str, url: str, token: str | None, as_json: bool) -> None:
    with control(url, token) as client:
        document = client.rollout_action(model, action)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(status_line(document))


@click.command(short_help="Show the audit log of control actions.")
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
    with control(url, token) as client:
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
    wide(make_console()).print(table)


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
