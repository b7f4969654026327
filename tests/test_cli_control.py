"""`tidegate status`, `load` and `unload`, run as a user would against a real server.

One server serves the whole module (starting one per test would dominate the
run time); each test that changes which models serve puts them back, and the
`live` fixture reloads anything a failed test left unloaded.
"""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import LiveServer, free_port, serving_a_copy
from tests.shipped import ShippedVersion, json_request, reference_rows

SHIPPED = [
    ("breast_cancer", "1"),
    ("breast_cancer", "2"),
    ("dataset_topic", "1"),
    ("diabetes", "1"),
    ("digits", "1"),
]


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serving_a_copy(tmp_path_factory.mktemp("control")) as live:
        yield live


@pytest.fixture
def live(module_server: LiveServer) -> Iterator[LiveServer]:
    yield module_server
    rows = module_server.client.post("/v2/repository/index").json()
    for name in sorted({row["name"] for row in rows if row["state"] != "READY"}):
        module_server.client.post(f"/v2/repository/models/{name}/load").raise_for_status()


def tidegate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # The developer's own TIDEGATE_URL must not leak into the tests.
    base = {k: v for k, v in os.environ.items() if k != "TIDEGATE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
    )


def ok(*args: str, **env: str) -> str:
    result = tidegate(*args, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def state_in_table(table: str, name: str, version: str) -> str:
    match = re.search(rf"^{name}\s+{version}\s+([A-Z]+)\b", table, re.MULTILINE)
    assert match, f"no row for {name} {version} in:\n{table}"
    return match.group(1)


def serving(live: LiveServer, name: str) -> list[str] | None:
    response = live.client.get(f"/v2/models/{name}")
    return None if response.status_code == 404 else response.json()["versions"]


def test_status_shows_the_server_and_every_shipped_version_ready(live: LiveServer):
    out = ok("status", "--url", live.url)
    assert out.startswith(f"tidegate 0.1.0 at {live.base}\n")
    assert "extensions: binary_tensor_data, model_repository" in out
    for name, version in SHIPPED:
        assert state_in_table(out, name, version) == "READY"
    assert "MiB" in out  # the server reports memory_bytes: the memory column shows


def test_status_json_is_the_server_metadata_and_the_index(live: LiveServer):
    document = json.loads(ok("status", "--url", live.base, "--json"))
    assert document == {
        "server": live.client.get("/v2").json(),
        "models": live.client.post("/v2/repository/index").json(),
    }


def test_unload_then_load_a_model(live: LiveServer):
    out = ok("unload", "digits", "--url", live.url)
    assert out == "unloaded digits\nserving versions: none\n"
    assert state_in_table(ok("status", "--url", live.url), "digits", "1") == "UNAVAILABLE"
    assert live.client.get("/v2/models/digits").status_code == 404

    out = ok("load", "digits", "--url", live.url)
    assert out == "loaded digits\nserving versions: 1\n"
    assert state_in_table(ok("status", "--url", live.url), "digits", "1") == "READY"
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]
    }
    assert live.client.post("/v2/models/digits/infer", json=request).status_code == 200


def test_one_version_leaves_the_others_serving(live: LiveServer):
    out = ok("unload", "breast_cancer", "--version", "2", "--url", live.url)
    assert out == "unloaded breast_cancer (version 2)\nserving versions: 1\n"
    assert serving(live, "breast_cancer") == ["1"]

    document = json.loads(
        ok("load", "breast_cancer", "--version", "2", "--url", live.url, "--json")
    )
    assert document == {
        "action": "load",
        "model": "breast_cancer",
        "version": "2",
        "versions": ["1", "2"],
    }
    assert serving(live, "breast_cancer") == ["1", "2"]


def test_a_server_error_is_reported_with_exit_code_1(live: LiveServer):
    result = tidegate("load", "no_such_model", "--url", live.url)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "no_such_model" in result.stderr
    assert result.stdout == ""


def test_unloading_what_is_not_loaded_says_so_and_succeeds(live: LiveServer):
    out = ok("unload", "digits", "--version", "7", "--url", live.url)
    assert out == "model 'digits' version 7 is already unloaded\nserving versions: 1\n"

    assert ok("unload", "digits", "--url", live.url).startswith("unloaded digits\n")
    out = ok("unload", "digits", "--url", live.url)
    assert out == "model 'digits' is already unloaded\nserving versions: none\n"

    document = json.loads(ok("unload", "no_such_model", "--url", live.url, "--json"))
    assert document == {
        "action": "unload",
        "model": "no_such_model",
        "version": None,
        "versions": [],
        "message": "model 'no_such_model' is not loaded, nor in the repository: nothing to unload",
    }


def test_no_server_is_reported_with_exit_code_3():
    url = f"127.0.0.1:{free_port()}"
    result = tidegate("status", "--url", url)
    assert result.returncode == 3
    assert result.stderr == f"error: cannot reach tidegate at http://{url}: connection refused\n"


def test_a_bad_url_is_a_usage_error():
    result = tidegate("status", "--url", "ftp://127.0.0.1:8000")
    assert result.returncode == 2
    assert "--url" in result.stderr


def test_the_url_comes_from_the_environment(live: LiveServer):
    out = ok("status", "--json", TIDEGATE_URL=live.url)
    assert json.loads(out)["server"]["name"] == "tidegate"
    # An explicit --url wins over the environment.
    result = tidegate("status", "--url", live.url, TIDEGATE_URL=f"127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr


def test_help_names_the_options():
    for command in ("status", "load", "unload"):
        help_text = ok(command, "--help")
        assert "--url" in help_text
        assert "TIDEGATE_URL" in help_text
        assert "--json" in help_text
    assert "--version" in ok("load", "--help")


def test_drift_prints_the_report(live: LiveServer):
    rows = reference_rows(ShippedVersion("diabetes", 1), 200)["input"]
    body = json_request("input", "FP64", rows)
    assert live.client.post("/v2/models/diabetes/infer", json=body).status_code == 200
    deadline = time.monotonic() + 20  # the drift observer applies the batch off the request path
    while (
        live.client.get("/v2/models/diabetes/versions/1/drift").json()["summary"]["window_rows"]
        < 200
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    document = json.loads(ok("drift", "diabetes", "--json", "--url", live.base))
    (report,) = document["versions"]
    assert document["model_name"] == "diabetes"
    assert [row["name"] for row in report["inputs"]] == [f"input[{j}]" for j in range(10)]
    table = ok("drift", "diabetes", "--version", "1", "--url", live.base)
    first_line = table.splitlines()[0]
    assert first_line.startswith("diabetes version 1: no_drift | 200 rows in window")
    assert "reference 331 rows from reference.npz" in first_line
    assert re.search(r"^input\[3\]\s+200\s+\d\.\d{3}\s", table, re.MULTILINE), table
    assert re.search(r"^variable\s+200\s", table, re.MULTILINE), table
    missing = tidegate("drift", "no_such_model", "--url", live.base)
    assert missing.returncode == 1
    assert "no_such_model" in missing.stderr
