"""`tidegate canary`, `traffic`, `rollout`, `promote`, `rollback`, `pause`, `resume` and
`audit`, run as a user would against real servers (one per test: rollouts change
which versions serve); and `--token`, against a standard-library stub that records
what each command sends.

The rollouts run with fast settings (100 canary requests and half a second a step,
a look every 0.2 s) while a thread sends wine's reference rows, one per request."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer, free_port, sending_wine
from tests.shipped import ShippedVersion, json_request, reference_rows
from tidegate.auth import hash_token

StartServer = Callable[..., LiveServer]
FAST = ["--min-rows", "100", "--min-dwell", "0.5", "--epoch", "0.2", "--min-latency-samples", "20"]
CONTROL_COMMANDS = [
    "status",
    "load",
    "unload",
    "drift",
    "canary",
    "traffic",
    "rollout",
    "promote",
    "rollback",
    "pause",
    "resume",
    "audit",
]


def tidegate(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    # The developer's own TIDEGATE_URL and TIDEGATE_TOKEN must not leak into the tests.
    base = {k: v for k, v in os.environ.items() if k not in ("TIDEGATE_URL", "TIDEGATE_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **env},
    )


def ok(*args: str, **env: str) -> str:
    result = tidegate(*args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return result.stdout


def refused(*args: str, **env: str) -> str:
    """A command the server says no to: exit status 1, its message on stderr."""
    result = tidegate(*args, **env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    return result.stderr


def serving(live: LiveServer, name: str) -> list[str]:
    return list(live.client.get(f"/v2/models/{name}").json()["versions"])


# -- the commands against a real server ------------------------------------------------


def test_canary_set_show_and_clear(start_server: StartServer, models_dir: Path):
    live = start_server(models_dir)
    url = {"TIDEGATE_URL": live.url}

    out = ok("canary", "breast_cancer", "2", "--weight", "10", "--stable", "1", **url)
    assert out.startswith("breast_cancer: stable 1, canary 2 at 10 % (split)\n")
    assert re.search(r"^stable\s+0\s+0\s+-\s+-\s*$", out, re.MULTILINE), out
    assert re.search(r"^canary\s+0\s+0\s+-\s+-\s*$", out, re.MULTILINE), out

    rows = reference_rows(ShippedVersion("breast_cancer", 1), 200)["input"]
    for i in range(200):
        body = json_request("input", "FP32", rows[i : i + 1])
        assert live.client.post("/v2/models/breast_cancer/infer", json=body).status_code == 200
    document = json.loads(ok("traffic", "breast_cancer", "--json", **url))
    assert {k: document[k] for k in ("model_name", "stable", "canary", "weight", "mode")} == {
        "model_name": "breast_cancer",
        "stable": "1",
        "canary": "2",
        "weight": 10.0,
        "mode": "split",
    }
    window = document["window"]
    to_stable, to_canary = window["stable"]["requests"], window["canary"]["requests"]
    assert to_stable + to_canary == 200
    assert to_canary > 0  # at 10 %: P(none of 200) ~ 1e-9
    assert window["split"] == {"stable": to_stable, "canary": to_canary}
    table = ok("traffic", "breast_cancer", **url)
    assert table.startswith("breast_cancer: stable 1, canary 2 at 10 % (split)\n")
    assert re.search(rf"^stable\s+{to_stable}\s+0\s+\d+\.\d{{3}}\s", table, re.MULTILINE), table
    assert re.search(rf"^canary\s+{to_canary}\s+0\s+\d+\.\d{{3}}\s", table, re.MULTILINE), table
    assert f"random split of unkeyed requests: {to_canary} of 200 to the canary" in table

    document = json.loads(
        ok("canary", "breast_cancer", "2", "--weight", "50", "--shadow", "--json", **url)
    )
    assert (document["stable"], document["canary"], document["weight"], document["mode"]) == (
        "1",
        "2",
        50.0,
        "shadow",
    )
    body = json_request("input", "FP32", rows[:1])
    for _ in range(40):
        assert live.client.post("/v2/models/breast_cancer/infer", json=body).status_code == 200
    deadline = time.monotonic() + 20  # the mirrored copies run off the request path
    while live.client.get("/v2/models/breast_cancer/traffic").json()["window"]["shadow"][
        "rows"
    ] == 0 and (time.monotonic() < deadline):
        time.sleep(0.05)
    table = ok("traffic", "breast_cancer", **url)
    assert table.startswith("breast_cancer: stable 1, canary 2 at 50 % (shadow)\n")
    assert re.search(r"^shadow: [1-9]\d* mirrored, \d+ dropped; 0 of [1-9]\d* rows", table, re.M)

    document = json.loads(ok("canary", "breast_cancer", "--clear", "--json", **url))
    assert document == {
        "model_name": "breast_cancer",
        "stable": "1",
        "canary": None,
        "weight": 0.0,
        "mode": "shadow",
    }
    assert ok("traffic", "breast_cancer", **url) == "breast_cancer: stable 1, no canary\n"

    stderr = refused("canary", "wine", "3", "--weight", "5", **url)
    assert stderr == "error: canary version 3 of model 'wine' is not loaded\n"
    for args in (["2"], ["--weight", "5"], ["2", "--weight", "5", "--clear"]):
        result = tidegate("canary", "breast_cancer", *args, **url)
        assert result.returncode == 2, result.stderr
    assert tidegate("canary", "breast_cancer", "2", "--weight", "101", **url).returncode == 2


def test_a_bad_candidate_is_rolled_back_with_exit_status_4(
    start_server: StartServer, models_dir: Path
):
    live = start_server(models_dir)
    # A generous latency budget: p99 over a few dozen requests is noise on a busy machine,
    # and this test is about the predictions check.
    fast = [*FAST, "--latency-p99-ratio", "20"]
    with sending_wine([live]) as statuses:
        result = tidegate("rollout", "wine", "3", *fast, TIDEGATE_URL=live.url)
    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith(
        "started: wine: the rollout of version 3 (stable 1) is running at step 1/4, 5 %: "
        "canary 3 at 5.0 % (split)\n"
    )
    # The last view: where it stopped and the check that failed, with its numbers.
    assert "wine: version 3 against stable 1, split mode: rolled back\n" in out
    assert re.search(
        r"^predictions\s+fail \(critical\)\s+rows canary \d+, stable \d+, PSI \d", out, re.M
    ), out
    assert re.search(r"^errors\s+pass\s+canary 0/\d+, stable 0/\d+", out, re.MULTILINE), out
    last = out.splitlines()[-1]
    assert last.startswith("wine: the rollout of version 3 (stable 1) is rolled back at step ")
    assert "predictions fails: canary's predictions differ from stable's" in last
    assert set(statuses) == {200}, statuses  # nothing failed on the way

    assert serving(live, "wine") == ["1"]  # the canary the rollout loaded is unloaded
    assert ok("traffic", "wine", TIDEGATE_URL=live.url) == "wine: stable 1, no canary\n"
    # Watching a finished rollout shows how it ended, with the same exit status.
    again = tidegate("rollout", "wine", TIDEGATE_URL=live.url)
    assert again.returncode == 4
    assert again.stdout.splitlines()[-1] == last
    status = json.loads(ok("rollout", "wine", "--json", TIDEGATE_URL=live.url))
    assert status["status"] == "rolled_back"
    assert [c["name"] for c in status["judgement"]["checks"] if c["verdict"] == "fail"] == [
        "predictions"
    ]


def test_a_good_candidate_is_promoted_with_exit_status_0(
    start_server: StartServer, models_dir: Path
):
    live = start_server(models_dir)
    # A generous latency budget: on a busy test machine a p99 over ~100 requests is noisy.
    fast = [*FAST, "--steps", "10,50,100", "--latency-p99-ratio", "20"]
    started = time.monotonic()
    with sending_wine([live]) as statuses:
        result = tidegate("rollout", "wine", "2", *fast, TIDEGATE_URL=live.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    out = result.stdout
    assert out.startswith(
        "started: wine: the rollout of version 2 (stable 1) is running at step 1/3, 10 %"
    )
    assert "wine: version 2 against stable 1, split mode: promoted\n" in out
    for check in ("validity", "errors", "latency", "predictions"):
        assert re.search(rf"^{check}\s+pass\s", out, re.MULTILINE), out
    assert out.splitlines()[-1] == (
        "wine: the rollout of version 2 (stable 1) is promoted at step 3/3, 100 %: "
        "every check passes and the step is ready"
    )
    assert set(statuses) == {200}, statuses
    assert serving(live, "wine") == ["2"]  # the old stable is unloaded
    assert ok("traffic", "wine", TIDEGATE_URL=live.url) == "wine: stable 2, no canary\n"


def test_operator_actions_and_the_audit_log(start_server: StartServer, models_dir: Path):
    live = start_server(models_dir)
    url = {"TIDEGATE_URL": live.url}
    assert refused("rollout", "wine", **url) == "error: model 'wine' has no rollout\n"
    assert refused("pause", "wine", **url) == "error: model 'wine' has no rollout\n"

    # Default settings: with no traffic the judge holds at step 1 and leaves it to us.
    document = json.loads(ok("rollout", "wine", "2", "--json", **url))
    assert (document["status"], document["stable"], document["canary"]) == ("running", "1", "2")
    assert (document["step"], document["steps"], document["weight"]) == (
        1,
        [5.0, 25.0, 50.0, 100.0],
        5.0,
    )
    view = ok("rollout", "wine", "--detach", **url)
    assert view.startswith("wine: version 2 against stable 1, split mode: running\n")
    assert "step 1/4 at 5 % (steps 5, 25, 50, 100 %)" in view
    assert re.search(r"^canary\s+0\s+0\s", view, re.MULTILINE), view

    line = "wine: the rollout of version 2 (stable 1) is {} at step {}: by anonymous\n"
    assert ok("pause", "wine", **url) == line.format("paused", "1/4, 5 %")
    assert refused("pause", "wine", **url) == (
        "error: the rollout of model 'wine' is already paused\n"
    )
    assert ok("resume", "wine", **url) == line.format("running", "1/4, 5 %")
    assert refused("resume", "wine", **url) == (
        "error: the rollout of model 'wine' is running, not paused\n"
    )
    assert "has a rollout running" in refused("canary", "wine", "--clear", **url)
    assert ok("rollback", "wine", **url) == line.format("rolled back", "1/4, 5 %")
    assert serving(live, "wine") == ["1"]
    assert "already rolled_back" in refused("promote", "wine", **url)

    out = ok("rollout", "wine", "2", "--detach", **url)
    assert out == (
        "started: wine: the rollout of version 2 (stable 1) is running at step 1/4, 5 %: "
        "canary 2 at 5.0 % (split)\nwatch it with: tidegate rollout wine\n"
    )
    document = json.loads(ok("promote", "wine", "--json", **url))
    assert (document["status"], document["step"], document["weight"]) == ("promoted", 4, 100.0)
    assert [entry["action"] for entry in document["history"]] == ["start", "promote"]
    assert serving(live, "wine") == ["2"]

    actions = [
        ("anonymous", "load"),  # the rollout loads its canary
        ("anonymous", "rollout.start"),
        ("anonymous", "rollout.pause"),
        ("anonymous", "rollout.resume"),
        ("anonymous", "rollout.rollback"),
        ("anonymous", "unload"),  # the canary the rollout had loaded
        ("anonymous", "load"),
        ("anonymous", "rollout.start"),
        ("anonymous", "rollout.promote"),
        ("anonymous", "unload"),  # the old stable
    ]
    table = ok("audit", "--model", "wine", **url)
    rows = re.findall(r"^\d{4}-\d\d-\d\dT[\d:.]+Z\s+(\S+)\s+(\S+)\s+wine\s", table, re.MULTILINE)
    assert rows == actions, table
    start = next(line for line in table.splitlines() if "rollout.start" in line)
    assert re.search(r"stable 1, canary 2\s+1, 5 %\s+running\s+canary 2 at 5.0 %", start), start
    load, unload = (
        next(line for line in table.splitlines() if f" {a} " in line) for a in ("load", "unload")
    )
    assert re.search(r"version 2\s+done\s+the rollout's canary", load), load
    assert re.search(r"version 2\s+done\s+after the rollout", unload), unload

    document = json.loads(ok("audit", "--model", "wine", "--json", **url))
    assert [(e["actor"], e["action"]) for e in document["entries"]] == actions
    assert document["unreadable_lines"] == 0
    last_three = json.loads(ok("audit", "--model", "wine", "--limit", "3", "--json", **url))
    assert last_three["entries"] == document["entries"][-3:]
    assert ok("audit", "--model", "digits", **url) == "no audit entries for model digits\n"


def test_ctrl_c_stops_watching_and_the_rollout_goes_on(start_server: StartServer, models_dir: Path):
    live = start_server(models_dir)
    ok("rollout", "wine", "2", "--detach", TIDEGATE_URL=live.url)
    env = {k: v for k, v in os.environ.items() if k not in ("TIDEGATE_URL", "TIDEGATE_TOKEN")}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "rollout", "wine", "--url", live.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        time.sleep(1.5)  # started, and watching (a file gets the view only at the end)
        assert watcher.poll() is None
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=20)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 130, out + err
    assert err == (
        "stopped watching: the rollout of wine continues on the server (watch it again "
        "with: tidegate rollout wine; stop it with: tidegate rollback wine)\n"
    )
    assert out.startswith("wine: version 2 against stable 1, split mode: running\n")
    assert live.client.get("/v2/models/wine/rollout").json()["status"] == "running"


# -- without a server ----------------------------------------------------------------


def test_rollout_usage_errors_and_help():
    url = {"TIDEGATE_URL": f"127.0.0.1:{free_port()}"}
    result = tidegate("rollout", "wine", "--min-rows", "5", **url)
    assert result.returncode == 2
    assert "rollout settings take a VERSION" in result.stderr
    for steps in ("5,50", "50,5,100", "5,x,100"):
        result = tidegate("rollout", "wine", "2", "--steps", steps, **url)
        assert result.returncode == 2, result.stderr
        assert "'--steps'" in result.stderr
    result = tidegate("rollout", "wine", "2", **url)
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot reach tidegate at http://127.0.0.1:")

    help_text = ok("rollout", "--help")
    assert "4  it was rolled back" in help_text
    assert "Ctrl-C stops the watching only" in help_text
    for option in ("--steps", "--shadow / --split", "--min-rows", "--min-dwell", "--max-dwell"):
        assert option in help_text
    assert "--epoch" in help_text
    assert "--min-latency-samples" in help_text


@pytest.mark.parametrize("command", ["canary", "rollout", "audit", "promote"])
def test_help_of_the_new_commands_imports_nothing_heavy(command: str):
    heavy = {"rich", "tidegate.client", "onnxruntime", "numpy"}
    code = (
        "import sys; from click.testing import CliRunner; from tidegate.cli import main; "
        f"result = CliRunner().invoke(main, [{command!r}, '--help']); "
        "assert result.exit_code == 0 and 'TIDEGATE_TOKEN' in result.output; "
        f"print(sorted({heavy!r} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- --token, against a stub that records what it is sent ---------------------------------


class Stub(http.server.ThreadingHTTPServer):
    """Answers any request with a small JSON document, or 401 without a bearer token;
    records (method, path, Authorization, body) of each."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.seen: list[tuple[str, str, str | None, Any]] = []
        self.url = f"127.0.0.1:{self.server_address[1]}"


class StubHandler(http.server.BaseHTTPRequestHandler):
    server: Stub

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        auth = self.headers.get("Authorization")
        self.server.seen.append((self.command, self.path, auth, json.loads(data) if data else None))
        if auth is None:
            status, document = 401, {"error": "this server wants a bearer token"}
        elif self.path == "/v2/repository/index":
            status, document = 200, []
        elif self.path.endswith("/drift"):
            status, document = 200, {"model_name": "m", "versions": []}
        elif self.path.startswith("/v2/audit"):
            status, document = 200, {"entries": [], "unreadable_lines": 0}
        else:
            status, document = 200, {"model_name": "m", "name": "stub", "version": "0"}
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_token_is_sent_as_a_bearer_header(stub: Stub):
    result = tidegate("status", "--url", stub.url)
    assert result.returncode == 1
    assert result.stderr == (
        "error: this server wants a bearer token (give a token with --token or TIDEGATE_TOKEN)\n"
    )
    assert stub.seen == [("GET", "/v2", None, None)]

    stub.seen.clear()
    ok("status", "--url", stub.url, "--token", "s3cret-1")
    assert {auth for _, _, auth, _ in stub.seen} == {"Bearer s3cret-1"}

    # From the environment, on every control command, each sending what it should.
    calls: list[tuple[list[str], list[tuple[str, str, Any]]]] = [
        (["load", "m", "--version", "2"], [
            ("POST", "/v2/repository/models/m/load", {"parameters": {"version": "2"}}),
            ("GET", "/v2/models/m", None),
        ]),
        (["unload", "m"], [
            ("POST", "/v2/repository/models/m/unload", {}),
            ("GET", "/v2/models/m", None),
        ]),
        (["drift", "m"], [("GET", "/v2/models/m/drift", None)]),
        (["canary", "m", "2", "--weight", "7.5"], [
            ("PUT", "/v2/models/m/traffic", {"canary": "2", "weight": 7.5, "mode": "split"}),
        ]),
        (["canary", "m", "2", "--weight", "50", "--shadow", "--stable", "1"], [
            (
                "PUT",
                "/v2/models/m/traffic",
                {"canary": "2", "weight": 50.0, "mode": "shadow", "stable": "1"},
            ),
        ]),
        (["canary", "m", "--clear"], [
            ("PUT", "/v2/models/m/traffic", {"canary": None, "weight": 0}),
        ]),
        (["traffic", "a/b?"], [("GET", "/v2/models/a%2Fb%3F/traffic", None)]),
        (
            ["rollout", "m", "3", "--steps", "10,100", "--split", "--min-rows", "7",
             "--min-dwell", "0", "--max-dwell", "60", "--epoch", "0.5", "--alpha", "0.01",
             "--error-margin", "0.2", "--latency-p99-ratio", "2", "--min-latency-samples",
             "9", "--psi", "0.3", "--disagreement", "0.1", "--detach"],
            [(
                "POST",
                "/v2/models/m/rollout",
                {
                    "version": "3", "steps": [10.0, 100.0], "mode": "split", "min_rows": 7,
                    "min_dwell_s": 0.0, "max_dwell_s": 60.0, "epoch_s": 0.5, "alpha": 0.01,
                    "error_margin": 0.2, "latency_p99_ratio": 2.0, "min_latency_samples": 9,
                    "psi": 0.3, "disagreement": 0.1,
                },
            )],
        ),
        (["rollout", "m", "3", "--shadow", "--json"], [
            ("POST", "/v2/models/m/rollout", {"version": "3", "mode": "shadow"}),
        ]),
        (["rollout", "m", "--json"], [("GET", "/v2/models/m/rollout", None)]),
        (["promote", "m"], [("POST", "/v2/models/m/rollout/promote", {})]),
        (["rollback", "m"], [("POST", "/v2/models/m/rollout/rollback", {})]),
        (["pause", "m"], [("POST", "/v2/models/m/rollout/pause", {})]),
        (["resume", "m"], [("POST", "/v2/models/m/rollout/resume", {})]),
        (["audit"], [("GET", "/v2/audit", None)]),
        (["audit", "--model", "m&x", "--limit", "5"], [
            ("GET", "/v2/audit?model=m%26x&limit=5", None),
        ]),
    ]  # fmt: skip
    for args, expected in calls:
        stub.seen.clear()
        ok(*args, "--url", stub.url, TIDEGATE_TOKEN="s3cret-2")
        assert stub.seen == [(m, p, "Bearer s3cret-2", b) for m, p, b in expected], args

    # --token wins over the environment; neither is ever shown.
    stub.seen.clear()
    ok("audit", "--url", stub.url, "--token", "s3cret-3", TIDEGATE_TOKEN="s3cret-2")
    assert stub.seen[0][2] == "Bearer s3cret-3"
    for command in CONTROL_COMMANDS:
        help_text = ok(command, "--help", TIDEGATE_TOKEN="s3cret-2")
        assert "--token TOKEN" in help_text
        assert "TIDEGATE_TOKEN" in help_text
        assert "s3cret" not in help_text

    # A token that cannot be a header is a usage error that does not repeat it.
    stub.seen.clear()
    result = tidegate("status", "--url", stub.url, "--token", "two words")
    assert result.returncode == 2
    assert "--token" in result.stderr
    assert "two words" not in result.stderr
    assert stub.seen == []


def test_the_token_against_a_server_with_an_auth_file(
    start_server: StartServer, models_dir: Path, tmp_path: Path
):
    tokens = {  # name: (token, roles)
        "watcher": ("reader-s3cret", ["reader"]),
        "deployer": ("operator-s3cret", ["operator", "reader"]),
        "root": ("admin-s3cret", ["admin"]),
    }
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(
        "".join(
            f'[tokens.{name}]\nsha256 = "{hash_token(token)}"\nroles = {json.dumps(roles)}\n'
            for name, (token, roles) in tokens.items()
        )
    )
    live = start_server(models_dir, "--auth-file", str(auth_file), probe_token="reader-s3cret")
    url = {"TIDEGATE_URL": live.url}

    stderr = refused("traffic", "wine", **url)
    assert stderr.endswith(" (give a token with --token or TIDEGATE_TOKEN)\n"), stderr
    assert ok("traffic", "wine", **url, TIDEGATE_TOKEN="reader-s3cret") == (
        "wine: stable 1, no canary\n"
    )
    stderr = refused("rollout", "wine", "2", **url, TIDEGATE_TOKEN="reader-s3cret")
    assert "watcher" in stderr  # the token's name, never the secret
    assert "--token" not in stderr

    deployer = {**url, "TIDEGATE_TOKEN": "operator-s3cret"}
    ok("rollout", "wine", "2", "--detach", **deployer)
    assert ok("pause", "wine", **deployer).endswith(" is paused at step 1/4, 5 %: by deployer\n")
    ok("rollback", "wine", "--url", live.url, "--token", "operator-s3cret")
    document = json.loads(
        ok("audit", "--model", "wine", "--json", **url, TIDEGATE_TOKEN="admin-s3cret")
    )
    assert [(e["actor"], e["action"]) for e in document["entries"]] == [
        ("deployer", "load"),
        ("deployer", "rollout.start"),
        ("deployer", "rollout.pause"),
        ("deployer", "rollout.rollback"),
        ("deployer", "unload"),
    ]
    assert "s3cret" not in json.dumps(document)
