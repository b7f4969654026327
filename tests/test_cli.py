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
