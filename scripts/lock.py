"""Write constraints.txt: the exact versions of everything a full install resolved to.

`make lock` runs this with the interpreter of a fresh, temporary virtual environment
in which pip has just installed `.[test,bench]` (every extra) without constraints.
It pins each installed distribution but tidegate itself: pip, so the pip that installs
is pinned too, and setuptools, which Python's venv module brings and the drift
kernels' ahead-of-time build needs. A marker that pyproject.toml puts on one of
tidegate's own dependencies (uvloop: not on Windows) is kept on its pin.

pip only applies a constraint to a package an install needs, so one file serves
`make install`, `make install-test` and `make install-bench` alike.

Usage: ``python scripts/lock.py OUT_FILE`` (run by `make lock`; Python 3.11).
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tidegate"}

HEADER = """\
# Exact versions of every package tidegate's installs use: `make install`,
# `make install-test`, `make install-bench` (and so `make serve`, `make test`, the
# Dockerfile) install with `pip install -c constraints.txt`. pyproject.toml keeps the
# ranges tidegate supports; this file is what CI tested.
#
# Made by `make lock` (scripts/lock.py): a fresh Python {python} venv on {platform},
# `pip install '.[test,bench]'` without constraints, then every installed version but
# tidegate's. Refresh it with `make lock`, run `make test`, and commit
# it with what changed. Do not edit it by hand.
"""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_markers(pyproject: Path) -> dict[str, str]:
    """The environment markers on tidegate's own requirements, by normalised name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    markers = {}
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
        if marker.strip() and name is not None:
            markers[_normalise(name.group(0))] = marker.strip()
    return markers


def pins() -> list[str]:
    """`name==version` of every installed distribution but those in SKIP, sorted."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = [line.strip() for line in frozen.splitlines()]
    kept = [line for line in lines if line and not line.startswith("#")]
    for line in kept:
        if "==" not in line:  # a direct URL or a local path: not reproducible
            raise SystemExit(f"lock: cannot pin {line!r}")
    return sorted(
        (line for line in kept if _normalise(line.split("==")[0]) not in SKIP),
        key=lambda line: _normalise(line.split("==")[0]),
    )


def main(out: Path) -> None:
    markers = declared_markers(ROOT / "pyproject.toml")
    lines = []
    for pin in pins():
        marker = markers.get(_normalise(pin.split("==")[0]))
        lines.append(pin if marker is None else f"{pin} ; {marker}")
    python = ".".join(map(str, sys.version_info[:3]))
    header = HEADER.format(python=python, platform=sys.platform)
    out.write_text(header + "\n" + "\n".join(lines) + "\n")
    print(f"lock: {len(lines)} pins written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
