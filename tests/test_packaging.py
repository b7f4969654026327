"""The container and CI entry points stay tied to the Makefile that CI runs."""

import re
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
    assert re.search(r"^test: check$", makefile, re.MULTILINE)
    assert re.search(r"^check: install-test$", makefile, re.MULTILINE)
    # Installs compile the drift kernels ahead of time; no compiler is not an install error.
    assert makefile.count("\t-$(BIN)/tidegate kernels build\n") == 2
    assert "make test" in (ROOT / ".ci" / "run").read_text()
