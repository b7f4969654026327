"""The docs stay true to the code where that is cheap to check: every `tidegate`
command and option they show exists, and every link between pages lands."""

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.conftest import ROOT
from tidegate.cli import main

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# A command line that runs `tidegate CMD` (after a prompt, a path, or `docker run ... IMAGE`,
# the image being called tidegate too); not a message that mentions tidegate.
INVOCATION = re.compile(
    r"^\s*(?:\$ )?(?:docker run .* tidegate )?(?:\S*/)?tidegate ([a-z][a-z|-]*)"
)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _cut(line: str) -> str:
    """A line of code up to its comment, its description column (three spaces or more
    after the text) or the next command."""
    indent = line[: len(line) - len(line.lstrip())]
    return indent + re.split(r"\s#\s|\s{3,}|&&|;|\s\|\|?\s", line.strip())[0]


def _code(text: str) -> list[str]:
    """The command lines of a page: each line of its fenced blocks, with the lines that
    continue it (after a backslash, or indented options) joined to it, and each inline
    code span."""
    lines = []
    for block in FENCE.findall(text):
        previous = None
        for raw in re.sub(r"\\\n\s*", " ", block).splitlines():
            if previous is not None and re.match(r"\s+\[?--", raw):
                lines[previous] += " " + _cut(raw).strip()
            else:
                previous = len(lines)
                lines.append(_cut(raw))
    spans = re.findall(r"`([^`]+)`", FENCE.sub("", text))
    return lines + [_cut(" ".join(span.split())) for span in spans]


def _invocations() -> list[tuple[str, str, list[str]]]:
    """(page, command, options on its line) for each `tidegate CMD` in the docs."""
    found = []
    for page in PAGES:
        for line in _code(page.read_text()):
            match = INVOCATION.match(line)
            if match is not None:
                options = OPTION.findall(line[match.end() :])
                found += [(page.name, command, options) for command in match.group(1).split("|")]
    return found


INVOCATIONS = _invocations()


def test_the_docs_name_the_commands():
    named = {command for _, command, _ in INVOCATIONS}
    assert named >= {"serve", "status", "load", "unload", "rollout", "audit", "token", "bench"}
    assert set(main.commands) <= named, "a command the docs do not show"


@pytest.mark.parametrize(
    ("page", "command", "options"), INVOCATIONS, ids=[f"{p}:{c}" for p, c, _ in INVOCATIONS]
)
def test_each_command_and_option_shown_exists(page: str, command: str, options: list[str]):
    assert command in main.commands, f"{page}: 'tidegate {command}' is not a command"
    cli_command = main.commands[command]
    known = {"--help"}
    # A group's options are those of its subcommands too (`tidegate kernels build --force`).
    commands = [cli_command]
    if isinstance(cli_command, click.Group):
        commands += cli_command.commands.values()
    for param in (param for each in commands for param in each.params):
        if isinstance(param, click.Option):
            known.update(param.opts + param.secondary_opts)
    unknown = [option for option in options if option not in known]
    assert not unknown, f"{page}: 'tidegate {command}' has no {unknown}"


def test_every_command_has_help():
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _links() -> list[tuple[Path, str]]:
    links = []
    for page in PAGES:
        targets = re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text()))
        # Not http: or mailto:
        links += [(page, target) for target in targets if not re.match(r"[a-z]+:", target)]
    return links


@pytest.mark.parametrize(("page", "target"), _links(), ids=[f"{p.name}->{t}" for p, t in _links()])
def test_each_link_lands(page: Path, target: str):
    path, _, anchor = target.partition("#")
    file = page if not path else (page.parent / path).resolve()
    assert file.exists(), f"{page.name}: {target} does not exist"
    if anchor:
        headings = re.findall(r"^#+ (.*)$", FENCE.sub("", file.read_text()), re.MULTILINE)
        assert anchor in {_slug(heading) for heading in headings}, f"{page.name}: {target}"


def test_the_readme_links_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not linked"
