"""The README's quick start, run as a reader would run it.

The code blocks of the README's `## Quick start` section are taken as written: the
first holds `make serve` and `make test`; `make serve` is started in the background
(`make test` is what runs this suite, so it is only checked to be there), then every
other shell block runs in bash and every Python block in this interpreter, against
that server. The server gets a free loopback port (the Makefile's `PORT ?= 8000`
yields to the environment; `127.0.0.1:8000` in the blocks is rewritten to it, and the
CLI finds it through `$TIDEGATE_URL`) and a copy of the shipped models (`REPO`), so
that no state left in `models/.tidegate` changes the answers and the test leaves
none. The inference answer is checked against onnxruntime run directly on the same
input. The server is stopped through its process group.
"""

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import MODELS, ROOT, SHIPPED_ONLY, free_port
from tests.shipped import ShippedVersion, session
from tidegate.protocol import DATATYPES

HEADING = "## Quick start"
# make passes its own state to the commands it runs (`make test` runs this suite): a
# `make serve` started here must not inherit it, nor a VENV other than the README's.
MAKE_STATE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VENV")


def quick_start_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's quick start section."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{HEADING}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : None if end == -1 else end]
    blocks = re.finditer(r"^```(\w*)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    return [(block.group(1), block.group(2)) for block in blocks]


def test_the_quick_start_has_the_two_commands():
    language, code = quick_start_blocks()[0]
    assert language == "sh"
    commands = [line.split("#")[0].strip() for line in code.splitlines()]
    assert commands == ["make serve", "make test"]


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    # `make serve` may install first (pip, when the stamps are older than the pins).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"make serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"make serve not ready in 300 s:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group (make and tidegate), then wait for all of it."""
    group = process.pid  # the session leader: start_new_session=True
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        process.poll()  # reap make, so that the group empties
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(group, signal.SIGKILL)
    process.wait()


def _check_status(stdout: str) -> None:
    """`tidegate status` lists every shipped model, each with a version that serves."""
    for model_dir in sorted(MODELS.iterdir()):
        if model_dir.is_dir() and not model_dir.name.startswith("."):
            assert re.search(rf"^{re.escape(model_dir.name)}\s+\d+\s+READY\b", stdout, re.M), (
                f"{model_dir.name} does not serve:\n{stdout}"
            )


def _check_answer(body: dict[str, Any], answer: dict[str, Any]) -> None:
    """The server's answer equals onnxruntime's on the version that answered."""
    shipped = ShippedVersion(answer["model_name"], int(answer["model_version"]))
    feeds = {
        tensor["name"]: np.array(tensor["data"], dtype=DATATYPES[tensor["datatype"]].numpy).reshape(
            tensor["shape"]
        )
        for tensor in body["inputs"]
    }
    model = session(shipped.path)
    names = [output.name for output in model.get_outputs()]
    expected = dict(zip(names, model.run(names, feeds), strict=True))
    assert sorted(output["name"] for output in answer["outputs"]) == sorted(names)
    for output in answer["outputs"]:
        got = np.array(output["data"]).reshape(output["shape"])
        np.testing.assert_allclose(got, expected[output["name"]], rtol=1e-6, atol=1e-7)


def test_the_quick_start_runs_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (serve_language, serve_block), *blocks = quick_start_blocks()
    serve = next(line for line in serve_block.splitlines() if line.startswith("make serve"))
    shutil.copytree(MODELS, tmp_path / "models", ignore=SHIPPED_ONLY)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key not in MAKE_STATE}
    env |= {"HOST": "127.0.0.1", "PORT": str(port), "REPO": str(tmp_path / "models")}
    env |= {"TIDEGATE_URL": url, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["bash", "-c", serve],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ran = {"status": False, "answer": False}
    try:
        _wait_ready(url, process, log)
        for language, block in blocks:
            code = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            if language == "sh":
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", code],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
                if "tidegate status" in code:
                    _check_status(done.stdout)
                    ran["status"] = True
            elif language == "python":
                namespace: dict[str, Any] = {"__name__": "__main__"}
                exec(compile(code, "README.md (quick start)", "exec"), namespace)
                if "answer" in namespace:
                    _check_answer(namespace["body"], namespace["answer"])
                    # The README says so: without a version, the stable version answers.
                    assert namespace["answer"]["model_version"] == "2"
                    printed = capsys.readouterr().out
                    assert printed.startswith("2 [{'name': 'label'"), printed
                    ran["answer"] = True
            else:
                raise AssertionError(f"a quick-start block in {language!r}: run it here")
    finally:
        _stop(process)
    assert ran == {"status": True, "answer": True}, "the quick start lost a step"
    assert serve_language == "sh"
