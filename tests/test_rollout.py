"""Progressive rollouts against a live server: a good candidate promotes through every
step, a bad one and an erring one roll back on the right check (status and audit log
say why, with the numbers), a step without traffic holds, and the state survives a
killed server; a corrupt state file is set aside."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import onnx_models
from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, expected_outputs, json_request, reference_rows

STABLE = ShippedVersion("wine", 1)
# Fast steps for tests: a few hundred requests and a fraction of a second each. The
# latency budget is wide: p99 of a few dozen 50-us runs is one scheduler hiccup, and
# latency is not what these tests are about (tests/test_judge.py covers it).
FAST = {
    "steps": [10, 50, 100],
    "min_rows": 60,
    "min_dwell_s": 0.2,
    "epoch_s": 0.1,
    "min_latency_samples": 30,
    "latency_p99_ratio": 50,
}


class Traffic:
    """Sends requests from a thread until stopped: rows of wine's reference data."""

    def __init__(self, server: LiveServer, model: str, bodies: list[dict]) -> None:
        self.base, self.model, self.bodies = server.base, model, bodies
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                body = self.bodies[i % len(self.bodies)]
                status = client.post(f"/v2/models/{self.model}/infer", json=body).status_code
                self.statuses[status] = self.statuses.get(status, 0) + 1
                i += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


BODIES = [reference_rows(STABLE, 8, start)["input"] for start in range(0, 120, 8)]


def _wine_bodies() -> list[dict]:
    return [json_request("input", "FP32", rows) for rows in BODIES]


def _disagreeing_rows(rows: np.ndarray, candidate: ShippedVersion) -> int:
    """Rows on which onnxruntime's labels from `candidate` and stable differ."""
    feeds = {"input": rows}
    stable, other = expected_outputs(STABLE, feeds), expected_outputs(candidate, feeds)
    return int(np.count_nonzero(stable["label"] != other["label"]))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def live(models_dir: Path, state_dir: Path, start_server) -> LiveServer:
    server: LiveServer = start_server(models_dir, "--state-dir", str(state_dir))
    return server


@pytest.fixture
def wine_traffic(live: LiveServer) -> Iterator[Traffic]:
    traffic = Traffic(live, "wine", _wine_bodies())
    yield traffic
    traffic.close()


def _start(server: LiveServer, model: str, version: str, **options: object) -> dict:
    response = server.client.post(
        f"/v2/models/{model}/rollout", json={"version": version, **options}
    )
    assert response.status_code == 200, response.text
    return response.json()


def _wait_until(server: LiveServer, model: str, done, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.client.get(f"/v2/models/{model}/rollout").json()
        if done(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"rollout did not get there in {timeout} s: {status}")


def _finished(status: dict) -> bool:
    return status["status"] in ("promoted", "rolled_back")


def _audit(state_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()]


def _check(status_or_entry: dict, name: str) -> dict:
    checks = status_or_entry.get("checks") or status_or_entry["judgement"]["checks"]
    return next(check for check in checks if check["name"] == name)


def test_an_equivalent_version_promotes_through_every_step(
    live: LiveServer, state_dir: Path, wine_traffic: Traffic
):
    _start(live, "wine", "2", **FAST)
    status = _wait_until(live, "wine", _finished)
    assert status["status"] == "promoted", status["reason"]
    actions = [(entry["action"], entry["weight"]) for entry in status["history"]]
    assert actions == [("start", 10.0), ("advance", 50.0), ("promote", 100.0)]
    assert all(check["verdict"] == "pass" for check in status["judgement"]["checks"])
    # The canary is stable now, and the old stable is unloaded.
    response = live.client.post("/v2/models/wine/infer", json=_wine_bodies()[0])
    assert response.headers["tidegate-model-version"] == "2"
    assert live.client.get("/v2/models/wine/versions/1/ready").status_code == 404
    assert live.client.get("/v2/models/wine/traffic").json()["stable"] == "2"
    audit = [(e["actor"], e["action"]) for e in _audit(state_dir) if e["model"] == "wine"]
    assert audit == [
        ("anonymous", "load"),
        ("anonymous", "rollout.start"),
        ("judge", "rollout.advance"),
        ("judge", "rollout.promote"),
        ("judge", "unload"),
    ]
    wine_traffic.close()
    assert set(wine_traffic.statuses) == {200}  # no request failed across the swaps


def test_the_bad_version_rolls_back_with_its_reason_and_numbers(
    live: LiveServer, state_dir: Path, wine_traffic: Traffic
):
    _start(live, "wine", "3", **FAST)
    status = _wait_until(live, "wine", _finished)
    assert status["status"] == "rolled_back"
    failing = _check(status, "predictions")
    assert failing["verdict"] == "fail"
    assert failing["numbers"]["psi"] >= 0.1
    assert failing["numbers"]["p_value"] < FAST_ALPHA_STEP
    assert "predictions" in status["reason"]
    rollback = next(e for e in _audit(state_dir) if e["action"] == "rollout.rollback")
    assert rollback["actor"] == "judge"
    assert rollback["versions"] == {"stable": "1", "canary": "3"}
    assert _check(rollback, "predictions")["numbers"] == failing["numbers"]
    # Stable answers everything again, and the candidate the rollout loaded is gone.
    response = live.client.post("/v2/models/wine/infer", json=_wine_bodies()[0])
    assert response.headers["tidegate-model-version"] == "1"
    assert live.client.get("/v2/models/wine/versions/3/ready").status_code == 404


FAST_ALPHA_STEP = 0.05 / 2  # alpha over the two judged steps of FAST


def test_a_version_that_errs_on_some_inputs_rolls_back_on_the_error_check(
    tmp_path: Path, state_dir: Path, start_server
):
    repository = tmp_path / "repo"
    onnx_models.save(onnx_models.gather(rows=10), repository, "lookup", 1)
    onnx_models.save(onnx_models.gather(rows=4), repository, "lookup", 2)  # index >= 4 fails
    (repository / "lookup" / "config.toml").write_text("[versions]\npolicy = [1]\n")
    server: LiveServer = start_server(repository, "--state-dir", str(state_dir))
    rng = np.random.default_rng(0)
    bodies = [json_request("index", "INT64", rng.integers(0, 10, 1)) for _ in range(50)]
    traffic = Traffic(server, "lookup", bodies)
    try:
        _start(server, "lookup", "2", **{**FAST, "min_rows": 10_000})
        status = _wait_until(server, "lookup", _finished)
    finally:
        traffic.close()
    assert status["status"] == "rolled_back"
    errors = _check(status, "errors")
    assert errors["verdict"] == "fail"
    assert errors["numbers"]["canary_errors"] > 0
    assert errors["numbers"]["stable_errors"] == 0
    assert errors["numbers"]["likelihood_ratio"] >= 1 / FAST_ALPHA_STEP
    assert status["reason"].startswith("errors")


def test_a_step_without_traffic_holds(live: LiveServer):
    _start(live, "wine", "2", **{**FAST, "min_dwell_s": 0, "max_dwell_s": 0.3})
    time.sleep(1.0)  # ten epochs, three past the maximum dwell
    status = live.client.get("/v2/models/wine/rollout").json()
    assert status["status"] == "running"
    assert status["step"] == 1
    assert status["judgement"]["action"] == "hold"
    assert "maximum dwell" in status["judgement"]["reason"]
    assert {c["verdict"] for c in status["judgement"]["checks"]} == {"continue"}


def test_a_killed_server_resumes_the_rollout_at_its_step(
    models_dir: Path, state_dir: Path, start_server
):
    first: LiveServer = start_server(models_dir, "--state-dir", str(state_dir))
    traffic = Traffic(first, "wine", _wine_bodies())
    try:
        _start(first, "wine", "2", **{**FAST, "steps": [10, 40, 70, 100]})
        _wait_until(first, "wine", lambda status: status["step"] == 2)
    finally:
        traffic.close()
    first.process.kill()  # no graceful shutdown: what a crash leaves
    first.process.wait()
    second: LiveServer = start_server(models_dir, "--state-dir", str(state_dir))
    status = second.client.get("/v2/models/wine/rollout").json()
    assert (status["status"], status["step"], status["weight"]) == ("running", 2, 40.0)
    # Version 2 is not in wine's version policy: the restore loaded it for the canary.
    assert second.client.get("/v2/models/wine/versions/2/ready").status_code == 200
    versions = [
        second.client.post(
            "/v2/models/wine/infer",
            json=_wine_bodies()[0],
            headers={"tidegate-routing-key": str(i)},
        ).headers["tidegate-model-version"]
        for i in range(200)
    ]
    assert 0.25 < versions.count("2") / 200 < 0.55


def test_a_corrupt_state_file_is_set_aside_and_every_model_serves_stable(
    models_dir: Path, state_dir: Path, start_server
):
    state_dir.mkdir()
    (state_dir / "state.json").write_text('{"format": 1, "state": {"traffic": ')
    server: LiveServer = start_server(models_dir, "--state-dir", str(state_dir))
    assert server.client.get("/v2/health/ready").status_code == 200
    assert server.client.get("/v2/models/wine/rollout").status_code == 404
    response = server.client.post("/v2/models/wine/infer", json=_wine_bodies()[0])
    assert response.headers["tidegate-model-version"] == "1"
    assert not (state_dir / "state.json").exists()
    aside = list(state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    restore = [e for e in _audit(state_dir) if e["action"] == "restore"]
    assert restore[-1]["outcome"] == "failed"
    assert str(aside[0]) in restore[-1]["reason"]
    assert "unreadable" in server.log()


def test_operator_actions_and_their_conflicts(live: LiveServer, state_dir: Path):
    missing = live.client.post("/v2/models/wine/rollout", json={"version": "9"})
    assert missing.status_code == 404
    assert "version 9" in missing.json()["error"]
    bad = live.client.post("/v2/models/wine/rollout", json={"version": "2", "steps": [50, 10]})
    assert bad.status_code == 400
    assert "rollout.steps" in bad.json()["error"]
    unknown = live.client.post("/v2/models/wine/rollout", json={"version": "2", "speed": 3})
    assert unknown.status_code == 400
    assert "rollout.speed" in unknown.json()["error"]
    _start(live, "wine", "2", min_rows=10**6)
    again = live.client.post("/v2/models/wine/rollout", json={"version": "3"})
    assert again.status_code == 409
    put = live.client.put("/v2/models/wine/traffic", json={"weight": 50})
    assert put.status_code == 409
    assert live.client.post("/v2/models/wine/rollout/resume").status_code == 409
    assert live.client.post("/v2/models/wine/rollout/launch").status_code == 404
    paused = live.client.post("/v2/models/wine/rollout/pause").json()
    assert paused["status"] == "paused"
    for body in _wine_bodies()[:5]:
        assert live.client.post("/v2/models/wine/infer", json=body).status_code == 200
    window = live.client.get("/v2/models/wine/rollout").json()["window"]
    assert window["stable"]["requests"] + window["canary"]["requests"] == 5
    resumed = live.client.post("/v2/models/wine/rollout/resume").json()
    assert resumed["status"] == "running"
    # What was served while paused is not judged.
    assert resumed["window"]["stable"]["requests"] + resumed["window"]["canary"]["requests"] == 0
    rolled_back = live.client.post("/v2/models/wine/rollout/rollback").json()
    assert rolled_back["status"] == "rolled_back"
    assert live.client.post("/v2/models/wine/rollout/promote").status_code == 409
    _start(live, "wine", "2", min_rows=10**6)
    promoted = live.client.post("/v2/models/wine/rollout/promote").json()
    assert promoted["status"] == "promoted"
    assert live.client.get("/v2/models/wine/traffic").json()["stable"] == "2"
    actions = [e["action"] for e in _audit(state_dir) if e["actor"] == "anonymous"]
    assert actions == [
        "load",
        "rollout.start",
        "rollout.pause",
        "rollout.resume",
        "rollout.rollback",
        "unload",
        "load",
        "rollout.start",
        "rollout.promote",
        "unload",
    ]
    listed = live.client.get("/v2/audit", params={"model": "wine", "limit": 3}).json()
    assert [e["action"] for e in listed["entries"]] == [
        "rollout.start",
        "rollout.promote",
        "unload",
    ]


def test_a_truncated_audit_line_does_not_stop_the_server(
    models_dir: Path, state_dir: Path, start_server
):
    state_dir.mkdir()
    (state_dir / "audit.jsonl").write_text('{"time": "x", "actor": "a", "action": "lo')
    server: LiveServer = start_server(models_dir, "--state-dir", str(state_dir))
    assert server.client.post("/v2/repository/models/wine/load").status_code == 200
    listed = server.client.get("/v2/audit").json()
    assert listed["unreadable_lines"] == 1
    assert [e["action"] for e in listed["entries"]] == ["load"]


def test_a_shadow_rollout_of_the_bad_version_rolls_back_on_disagreement(
    live: LiveServer, state_dir: Path, wine_traffic: Traffic
):
    _start(live, "wine", "3", **{**FAST, "mode": "shadow", "min_rows": 10_000})
    status = _wait_until(live, "wine", _finished)
    assert status["status"] == "rolled_back"
    failing = _check(status, "disagreement")
    assert failing["verdict"] == "fail"
    assert status["reason"].startswith("disagreement")
    numbers = failing["numbers"]
    # Which requests were mirrored is sampled (the traffic cycles through BODIES), so
    # the count is checked against what onnxruntime says of each request: as many
    # disagreeing rows as that many requests of 8 rows could have.
    per_request = [_disagreeing_rows(body, ShippedVersion("wine", 3)) for body in BODIES]
    assert sum(per_request) / (8 * len(BODIES)) > 0.2  # v3 differs on ~32 % of rows
    mirrored, partial = divmod(numbers["rows"], 8)
    assert partial == 0
    assert mirrored * min(per_request) <= numbers["disagreeing"] <= mirrored * max(per_request)
    assert numbers["disagreeing"] / numbers["rows"] > numbers["budget"]
    # Stable answered every request throughout.
    wine_traffic.close()
    assert set(wine_traffic.statuses) == {200}
    rollback = next(e for e in _audit(state_dir) if e["action"] == "rollout.rollback")
    assert _check(rollback, "disagreement")["numbers"] == numbers


def test_a_rollout_whose_canary_is_unloaded_pauses_and_says_why(live: LiveServer):
    _start(live, "wine", "2", **FAST)
    unloaded = live.client.post(
        "/v2/repository/models/wine/unload", json={"parameters": {"version": "2"}}
    )
    assert unloaded.status_code == 200
    status = _wait_until(live, "wine", lambda status: status["status"] != "running", timeout=10)
    assert status["status"] == "paused"
    assert status["reason"] == "canary version 2 is no longer loaded: load it, then resume"
    # Every request goes to stable meanwhile; loading the canary again lets it resume.
    response = live.client.post("/v2/models/wine/infer", json=_wine_bodies()[0])
    assert response.headers["tidegate-model-version"] == "1"
    loaded = live.client.post(
        "/v2/repository/models/wine/load", json={"parameters": {"version": "2"}}
    )
    assert loaded.status_code == 200
    assert live.client.post("/v2/models/wine/rollout/resume").json()["status"] == "running"
