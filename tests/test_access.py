"""Access control against a live server started with an auth file: every endpoint
refuses a request without a token (401) and one without the role it needs (403), the
right roles work, a rotated token works without a restart while the old one stops,
and the audit log names the token behind each action."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, json_request, reference_rows
from tidegate.auth import hash_token

TOKENS = {
    "watcher": ("reader-secret", ["reader"]),
    "checkout": ("inference-secret", ["inference"]),
    "deployer": ("operator-secret", ["operator"]),
    "root": ("admin-secret", ["admin"]),
}
ROLE_OF = {"reader": "watcher", "inference": "checkout", "operator": "deployer", "admin": "root"}
WINE = ShippedVersion("wine", 1)
INFER_BODY = json_request("input", "FP32", reference_rows(WINE, 2)["input"])

# (method, path, body, role it needs): every route of the server.
ENDPOINTS = [
    ("GET", "/v2/health/live", None, "reader"),
    ("GET", "/v2/health/ready", None, "reader"),
    ("GET", "/v2", None, "reader"),
    ("GET", "/metrics", None, "reader"),
    ("GET", "/v2/models/stats", None, "reader"),
    ("GET", "/v2/models/wine", None, "reader"),
    ("GET", "/v2/models/wine/ready", None, "reader"),
    ("GET", "/v2/models/wine/config", None, "reader"),
    ("GET", "/v2/models/wine/stats", None, "reader"),
    ("GET", "/v2/models/wine/drift", None, "reader"),
    ("GET", "/v2/models/wine/versions/1", None, "reader"),
    ("GET", "/v2/models/wine/versions/1/drift/state", None, "reader"),
    ("GET", "/v2/models/wine/traffic", None, "reader"),
    ("GET", "/v2/models/wine/rollout", None, "reader"),
    ("POST", "/v2/repository/index", {}, "reader"),
    ("POST", "/v2/models/wine/infer", INFER_BODY, "inference"),
    ("POST", "/v2/models/wine/versions/1/infer", INFER_BODY, "inference"),
    ("POST", "/v2/repository/models/wine/load", {}, "operator"),
    ("PUT", "/v2/models/wine/traffic", {"stable": "1"}, "operator"),
    ("POST", "/v2/models/wine/rollout", {"version": "2", "min_rows": 10**6}, "operator"),
    ("POST", "/v2/models/wine/rollout/pause", {}, "operator"),
    ("POST", "/v2/models/wine/rollout/resume", {}, "operator"),
    ("POST", "/v2/models/wine/rollout/rollback", {}, "operator"),
    ("POST", "/v2/repository/models/digits/unload", {}, "operator"),
    ("GET", "/v2/audit", None, "admin"),
]


def write_auth_file(path: Path, tokens: dict[str, tuple[str, list[str]]]) -> None:
    lines = []
    for name, (token, roles) in tokens.items():
        lines += [f"[tokens.{name}]", f'sha256 = "{hash_token(token)}"', f"roles = {roles!r}", ""]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join(lines).replace("'", '"'))
    os.replace(temporary, path)  # as an operator should: never a half-written file


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.toml"
    write_auth_file(path, TOKENS)
    return path


@pytest.fixture
def live(models_dir: Path, tmp_path: Path, auth_file: Path, start_server) -> LiveServer:
    return start_server(
        models_dir,
        "--state-dir",
        str(tmp_path / "state"),
        "--auth-file",
        str(auth_file),
        probe_token="reader-secret",
    )


def _send(server: LiveServer, method: str, path: str, body, headers) -> httpx.Response:
    return server.client.request(method, path, json=body, headers=headers)


def test_every_endpoint_needs_a_token_and_its_role(live: LiveServer):
    for method, path, body, role in ENDPOINTS:
        anonymous = _send(live, method, path, body, {})
        assert anonymous.status_code == 401, (method, path)
        assert "bearer token" in anonymous.json()["error"]
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        unknown = _send(live, method, path, body, _bearer("guessed"))
        assert unknown.status_code == 401, (method, path)
        for other_role, name in ROLE_OF.items():
            if other_role in (role, "admin"):
                continue
            refused = _send(live, method, path, body, _bearer(TOKENS[name][0]))
            assert refused.status_code == 403, (method, path, other_role)
            message = refused.json()["error"]
            assert f"'{name}'" in message
            assert f"'{role}'" in message
            assert TOKENS[name][0] not in message
        allowed = _send(live, method, path, body, _bearer(TOKENS[ROLE_OF[role]][0]))
        assert allowed.status_code not in (401, 403), (method, path, allowed.text)
        assert allowed.status_code < 500, (method, path, allowed.text)


def test_admin_may_do_everything(live: LiveServer):
    for method, path, body, _ in ENDPOINTS:
        response = _send(live, method, path, body, _bearer("admin-secret"))
        assert response.status_code not in (401, 403), (method, path)


def test_inference_and_metadata_work_with_the_right_roles(live: LiveServer):
    inference = _bearer("inference-secret")
    response = live.client.post("/v2/models/wine/infer", json=INFER_BODY, headers=inference)
    assert response.status_code == 200
    assert response.json()["model_version"] == "1"
    assert live.client.get("/v2/models/wine", headers=inference).status_code == 403
    metadata = live.client.get("/v2/models/wine", headers=_bearer("reader-secret"))
    assert metadata.status_code == 200
    assert metadata.json()["name"] == "wine"


def test_a_rotated_token_works_without_a_restart_and_the_old_one_stops(
    live: LiveServer, auth_file: Path, tmp_path: Path
):
    old, new = _bearer("operator-secret"), _bearer("operator-secret-2")
    assert live.client.get("/v2/models/wine/traffic", headers=old).status_code == 403
    assert live.client.post("/v2/repository/index", headers=old).status_code == 403
    assert live.client.post("/v2/repository/models/wine/load", headers=old).status_code == 200
    rotated = dict(TOKENS, deployer=("operator-secret-2", ["operator", "reader"]))
    write_auth_file(auth_file, rotated)
    deadline = time.monotonic() + 10
    while live.client.get("/v2/models/wine/traffic", headers=new).status_code != 200:
        assert time.monotonic() < deadline, "the new token never started to work"
        time.sleep(0.2)
    assert live.client.post("/v2/repository/models/wine/load", headers=old).status_code == 401
    assert live.client.post("/v2/repository/models/wine/load", headers=new).status_code == 200
    entries = live.client.get("/v2/audit", headers=_bearer("admin-secret")).json()["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("deployer", "load"),
        ("auth-file", "auth.reload"),
        ("deployer", "load"),
    ]
    assert entries[1]["outcome"] == "done"


def test_a_broken_rewrite_keeps_the_tokens_and_is_audited(live: LiveServer, auth_file: Path):
    auth_file.write_text("[tokens.deployer\n")
    stat = auth_file.stat()
    os.utime(auth_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    time.sleep(1.2)  # past the check interval
    reader = _bearer("reader-secret")
    assert live.client.get("/v2/health/ready", headers=reader).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        entries = live.client.get("/v2/audit", headers=_bearer("admin-secret")).json()["entries"]
        reloads = [e for e in entries if e["action"] == "auth.reload"]
        if reloads or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reloads[-1]["outcome"] == "failed"
    assert "auth.toml" in reloads[-1]["reason"]


def _serve(*arguments: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "serve", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_serving_beyond_loopback_needs_an_auth_file_or_an_explicit_flag(models_dir: Path):
    # 192.0.2.1 (TEST-NET-1) is never this machine's: the check comes before any bind.
    refused = _serve(str(models_dir), "--host", "192.0.2.1", "--port", "8000")
    assert refused.returncode != 0
    assert "without an auth file" in refused.stderr
    assert "--insecure-no-auth" in refused.stderr


def test_a_broken_auth_file_stops_the_start_with_its_name(models_dir: Path, tmp_path: Path):
    broken = tmp_path / "auth.toml"
    broken.write_text('[tokens.x]\nsha256 = "zz"\nroles = ["reader"]\n')
    result = _serve(str(models_dir), "--auth-file", str(broken), "--port", "8000")
    assert result.returncode != 0
    assert "auth.toml" in result.stderr
    assert "tokens.x" in result.stderr


def test_the_audit_log_survives_a_restart(
    models_dir: Path, tmp_path: Path, auth_file: Path, start_server
):
    options = ("--state-dir", str(tmp_path / "state"), "--auth-file", str(auth_file))
    first: LiveServer = start_server(models_dir, *options, probe_token="reader-secret")
    assert (
        first.client.post(
            "/v2/repository/models/wine/load", headers=_bearer("operator-secret")
        ).status_code
        == 200
    )
    first.stop()
    second: LiveServer = start_server(models_dir, *options, probe_token="reader-secret")
    assert (
        second.client.post(
            "/v2/repository/models/digits/unload", headers=_bearer("admin-secret")
        ).status_code
        == 200
    )
    lines = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(entry["actor"], entry["action"]) for entry in entries] == [
        ("deployer", "load"),
        ("root", "unload"),
    ]
