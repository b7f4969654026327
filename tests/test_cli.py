"""The command line, run as a user would: `python -m tidegate ...`."""

import subprocess
import sys
from pathlib import Path

from tidegate import __version__


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *args], capture_output=True, text=True, timeout=60
    )


def test_version_and_help():
    assert _run("--version").stdout.strip() == f"tidegate, version {__version__}"
    help_text = _run("serve", "--help").stdout
    for option in ("--host", "--port", "--max-body-size", "--threads"):
        assert option in help_text


def test_serve_refuses_a_missing_repository(tmp_path: Path):
    result = _run("serve", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_serve_refuses_a_bad_port():
    result = _run("serve", "--port", "70000")
    assert result.returncode == 2
    assert "70000" in result.stderr


def test_token_prints_a_secret_and_an_entry_the_auth_file_accepts(tmp_path: Path):
    from tidegate.auth import AuthFile, Role

    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidegate",
            "token",
            "ci.bot",
            "--role",
            "operator",
            "--role",
            "reader",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    secret = made.stderr.strip().rsplit(" ", 1)[-1]
    assert secret not in made.stdout  # only the hash goes to the file
    auth = tmp_path / "auth.toml"
    auth.write_text(made.stdout)
    principal = AuthFile(auth).authenticate(f"Bearer {secret}")
    assert principal.name == "ci.bot"
    assert principal.roles == frozenset({Role.OPERATOR, Role.READER})
    refused = subprocess.run(
        [sys.executable, "-m", "tidegate", "token", "bad name", "--role", "reader"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "NAME" in refused.stderr
