"""The container and CI entry points stay tied to the Makefile that CI runs."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_installs_with_the_makefile_and_runs_unprivileged():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("FROM python:3.11-slim") == 1
    assert re.search(r"^RUN make install\b", dockerfile, re.MULTILINE)
    assert "pip install" not in dockerfile  # no second, drifting install recipe
    assert re.search(r"^USER tidegate$", dockerfile, re.MULTILINE)
    assert "useradd" in dockerfile
    assert re.search(r"^HEALTHCHECK .*\n?.*/v2/health/ready", dockerfile, re.MULTILINE)
    assert "NUMBA_CACHE_DIR=" in dockerfile
    # The drift kernels are compiled ahead of time in the image, and a failure fails it.
    assert re.search(r"^\s*&& tidegate kernels build$", dockerfile, re.MULTILINE)
    assert "g++" in dockerfile
    assert "chown -R tidegate:tidegate /var/cache/tidegate" in dockerfile
    assert "COPY models ./models" in dockerfile
    # The container binds every interface, so it must not serve without access control.
    command = re.search(r"^CMD (.*)$", dockerfile, re.MULTILINE)
    assert command is not None
    assert '"0.0.0.0"' in command.group(1)
    assert '"--auth-file"' in command.group(1)
    assert "--insecure-no-auth" not in command.group(1)


def test_make_targets_do_their_own_setup():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve: install$", makefile, re.MULTILINE)
    assert re.search(r"^test: check system-deps$", makefile, re.MULTILINE)
    assert re.search(r"^check: install-test$", makefile, re.MULTILINE)
    # Installs compile the drift kernels ahead of time; no compiler is not an install error.
    assert makefile.count("\t-$(BIN)/tidegate kernels build\n") == 3
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _constraints() -> dict[str, tuple[str, str]]:
    """constraints.txt as {normalised name: (version, marker)}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        pin, _, marker = line.partition(";")
        name, version = pin.strip().split("==")
        pins[_normalise(name)] = (version, marker.strip())
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_install_takes_its_versions_from_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.MULTILINE)
    assert re.search(
        r"^PIP := \$\(BIN\)/python -m pip install -c \$\(CONSTRAINTS\)$", makefile, re.M
    )
    for stamp in (".installed", ".installed-test", ".installed-bench"):
        rule = re.search(rf"^\$\(VENV\)/{re.escape(stamp)}: (.*)$", makefile, re.MULTILINE)
        assert rule is not None, stamp
        assert "$(CONSTRAINTS)" in rule.group(1), f"{stamp} must re-run pip when the pins change"
    # Every pip install but `make lock`'s own (which resolves afresh) goes through $(PIP).
    lock = makefile.index("\nlock:")
    assert "pip install" not in makefile[:lock].replace("$(BIN)/python -m pip install -c", "")
    assert (
        "COPY pyproject.toml README.md Makefile constraints.txt ./"
        in (ROOT / "Dockerfile").read_text()
    )


def test_the_constraints_pin_every_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
    pins = _constraints()
    assert "tidegate" not in pins
    assert "pip" in pins  # the pip that installs is pinned too
    for requirement in declared:
        name = _normalise(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0])
        if name != "tidegate":
            assert name in pins, f"{requirement!r} is not pinned: run make lock"
    assert pins["uvloop"][1] == "sys_platform != 'win32'"


def test_the_suite_runs_on_the_pinned_versions():
    """What `make test` installed is what constraints.txt says (pip honoured the pins)."""
    pins = _constraints()
    installed = {
        _normalise(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }
    wrong = {
        name: (installed[name], version)
        for name, (version, _) in pins.items()
        if name in installed and installed[name] != version
    }
    assert not wrong, f"installed and pinned versions differ (run make install-test): {wrong}"
    assert {"numpy", "onnxruntime", "pytest"} <= installed.keys()
