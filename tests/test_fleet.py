"""A fleet on one machine: three replicas (`tidegate serve`, each on its own copy of
the shipped models and its own loopback port) sharing one state directory, with a
client spreading requests over them round-robin, and `tidegate fleet` run as a user
would. What each test checks is independent of tidegate's own sums: the versions the
client saw in the answers' headers, a fourth server that saw all the traffic, the
audit log's lines."""

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODELS, SHIPPED_ONLY, LiveServer, sending_wine
from tests.shipped import ShippedVersion, json_request, reference_rows
from tidegate.access import required_role
from tidegate.auth import Role
from tidegate.fleet import replica_urls

StartServer = Callable[..., LiveServer]
REPLICAS = 3
# Fast rollouts: 100 canary requests and a second a step, a look every 0.2 s; a generous
# latency budget, since a p99 over a few dozen requests is noise on a busy machine.
FAST = [
    "--min-rows", "100", "--min-dwell", "1", "--epoch", "0.2",
    "--min-latency-samples", "20", "--latency-p99-ratio", "20",
]  # fmt: skip
WINE_ROWS = reference_rows(ShippedVersion("wine", 1), 1000)["input"]
BODIES = [json_request("input", "FP32", WINE_ROWS[i : i + 1]) for i in range(len(WINE_ROWS))]


def start_fleet(
    start_server: StartServer, root: Path, replicas: int = REPLICAS, *extra: str
) -> list[LiveServer]:
    """`replicas` servers sharing root/state, each serving its own copy of the models."""
    fleet = []
    for index in range(replicas):
        repository = copy_models(root / f"replica{index}")
        fleet.append(start_server(repository, "--state-dir", str(root / "state"), *extra))
    return fleet


def copy_models(target: Path) -> Path:
    """A copy of the shipped models whose drift windows never decay: servers close
    their epochs at different rows, and the tests compare the counts themselves."""
    shutil.copytree(MODELS, target, ignore=SHIPPED_ONLY)
    with (target / "wine" / "config.toml").open("a") as config:
        config.write("\n[drift]\nhalf_life = 1_000_000_000_000_000\n")
    return target


def replicas_option(fleet: list[LiveServer]) -> str:
    return ",".join(live.url for live in fleet)


def tidegate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *args], capture_output=True, text=True, timeout=timeout
    )


def audit(root: Path) -> list[dict[str, Any]]:
    """The fleet's one audit log, in the shared state directory."""
    lines = (root / "state" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def served_versions(fleet: list[LiveServer]) -> list[list[str]]:
    return [live.client.get("/v2/models/wine").json()["versions"] for live in fleet]


def version_served(answer: httpx.Response | None) -> str:
    """The version that answered; "failed" for an error, "no answer" for none."""
    if answer is None:
        return "no answer"
    return answer.headers["tidegate-model-version"] if answer.is_success else "failed"


def wait_until(condition: Callable[[], bool], limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_split_holds_over_the_fleet_and_keys_stick_on_every_replica(
    start_server: StartServer, tmp_path: Path
):
    fleet = start_fleet(start_server, tmp_path)
    # One replica changes the policy; the others follow the shared desired state.
    put = {"stable": "1", "canary": "2", "weight": 10}
    fleet[0].client.post("/v2/repository/models/wine/load", json={"parameters": {"version": "2"}})
    answer = fleet[0].client.put("/v2/models/wine/traffic", json=put)
    assert answer.status_code == 200, answer.text
    wait_until(lambda: all(v == ["1", "2"] for v in served_versions(fleet)))

    seen: dict[str, int] = {}
    clients = [live.client for live in fleet]
    for sent in range(5000):
        answer = clients[sent % REPLICAS].post("/v2/models/wine/infer", json=BODIES[sent % 133])
        version = answer.headers["tidegate-model-version"]
        seen[version] = seen.get(version, 0) + 1
    share = 100 * seen["2"] / 5000
    assert 8.5 <= share <= 11.5, seen

    # The fleet's window: every replica's counts added up, as the client counted them.
    result = tidegate("fleet", "traffic", "wine", "--replicas", replicas_option(fleet), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["window"]["canary"]["requests"] == seen["2"]
    assert document["window"]["stable"]["requests"] == seen["1"]
    assert {view["generation"] for view in document["replicas"].values()} == {2}
    text = tidegate("fleet", "traffic", "wine", "--replicas", replicas_option(fleet)).stdout
    assert f"all 3 replicas: 5000 requests, canary {seen['2']} ({share:.2f} %)" in text

    # A routing key sees the same version on every replica.
    on_canary = 0
    for key in range(300):
        headers = {"tidegate-routing-key": f"user-{key}"}
        versions = {
            client.post("/v2/models/wine/infer", json=BODIES[0], headers=headers).headers[
                "tidegate-model-version"
            ]
            for client in clients
        }
        assert len(versions) == 1, (key, versions)
        on_canary += versions == {"2"}
    assert 12 <= on_canary <= 48, on_canary  # 10 % of 300 keys, within 3.5 sigma


def test_a_bad_version_rolls_back_on_the_merged_windows_and_a_good_one_promotes(
    start_server: StartServer, tmp_path: Path
):
    fleet = start_fleet(start_server, tmp_path)
    replicas = replicas_option(fleet)
    with sending_wine(fleet, version_served) as seen:
        bad = tidegate("fleet", "rollout", "wine", "3", *FAST, "--replicas", replicas)
    assert bad.returncode == 4, bad.stdout + bad.stderr
    assert "rollback: predictions fails: canary's predictions differ" in bad.stdout
    assert set(seen) <= {"1", "3"}, seen  # nothing failed on the way
    assert served_versions(fleet) == [["1"]] * REPLICAS  # the canary is gone everywhere
    rollbacks = [e for e in audit(tmp_path) if e["action"] == "rollout.rollback"]
    assert len(rollbacks) == 1, rollbacks  # decided once, for the whole fleet
    assert rollbacks[0]["actor"] == "fleet judge (anonymous)"
    predictions = next(c for c in rollbacks[0]["checks"] if c["name"] == "predictions")
    assert predictions["verdict"] == "fail"

    with sending_wine(fleet, version_served) as seen:
        good = tidegate(
            "fleet", "rollout", "wine", "2", *FAST, "--steps", "10,50,100", "--replicas", replicas
        )
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines()[-1] == (
        "wine: the rollout of version 2 (stable 1) is promoted at step 3/3, 100 %: "
        "every check passes and the step is ready"
    )
    assert set(seen) <= {"1", "2"}, seen
    assert served_versions(fleet) == [["2"]] * REPLICAS
    entries = audit(tmp_path)
    judged = [e["action"] for e in entries if e["actor"] == "fleet judge (anonymous)"]
    assert judged == ["rollout.rollback", "unload", "rollout.advance", "rollout.promote", "unload"]
    # The servers' own judges left both rollouts alone.
    assert not [e for e in entries if e["actor"] == "judge"]
    status = json.loads(tidegate("fleet", "status", "--replicas", replicas, "--json").stdout)
    assert len({answer["generation"] for answer in status["replicas"].values()}) == 1
    assert status["failures"] == {}


def test_the_merged_drift_report_equals_one_server_that_saw_all_the_traffic(
    start_server: StartServer, tmp_path: Path
):
    fleet = start_fleet(start_server, tmp_path)
    single = start_server(copy_models(tmp_path / "alone"))
    drifted = WINE_ROWS[:120].copy()
    drifted[:, 3] += 4.0  # one feature shifted by several standard deviations
    for index in range(len(drifted)):
        body = json_request("input", "FP32", drifted[index : index + 1])
        for live in (fleet[index % REPLICAS], single):
            assert live.client.post("/v2/models/wine/infer", json=body).status_code == 200

    # Drift statistics are updated off the requests' path: wait until each server's are.
    for live, rows in [*((live, 40) for live in fleet), (single, 120)]:
        wait_until(lambda live=live, rows=rows: window_rows(live) == pytest.approx(rows))
    result = tidegate("fleet", "drift", "wine", "--replicas", replicas_option(fleet), "--json")
    assert result.returncode == 0, result.stderr
    (merged,) = json.loads(result.stdout)["versions"]
    reference = single.client.get("/v2/models/wine/versions/1/drift").json()
    assert merged["summary"]["window_rows"] == pytest.approx(120, rel=1e-9)
    assert reference["summary"]["window_rows"] == pytest.approx(120, rel=1e-9)
    for ours, theirs in zip(merged["inputs"], reference["inputs"], strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["rows"] == pytest.approx(theirs["rows"], rel=1e-9)
        assert ours["psi"] == pytest.approx(theirs["psi"], rel=1e-9, abs=1e-12)
        assert ours["ks"] == pytest.approx(theirs["ks"], rel=1e-9, abs=1e-12)
    assert merged["summary"]["max_psi_feature"] == "input[3]"
    assert "input[3]" in merged["summary"]["over_alert"]


def window_rows(live: LiveServer) -> float:
    report = live.client.get("/v2/models/wine/versions/1/drift").json()
    return float(report["summary"]["window_rows"])


def test_a_replica_that_does_not_answer_pauses_the_rollout_and_its_return_resumes_it(
    start_server: StartServer, tmp_path: Path
):
    fleet = start_fleet(start_server, tmp_path)
    replicas = replicas_option(fleet)
    # Steps long enough that the rollout is still at its first one when a replica dies.
    slow = ["--min-dwell", "600", "--max-dwell", "900", "--epoch", "0.2"]
    judge = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "fleet", "rollout", "wine", "2", *slow,
         "--replicas", replicas, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with sending_wine(fleet[:2], version_served):
            wait_until(lambda: fleet[0].client.get("/v2/models/wine/rollout").status_code == 200)
            victim = fleet[2]
            victim.process.kill()  # a replica crashes
            victim.process.wait()
            rollout = lambda: fleet[0].client.get("/v2/models/wine/rollout").json()  # noqa: E731
            wait_until(lambda: rollout()["status"] == "paused")
            reason = rollout()["reason"]
            assert reason.startswith("the fleet is incomplete: 1 replica(s) did not answer: ")
            assert f"http://{victim.url}" in reason

            # The replica comes back on its port and catches up with the desired state.
            back = start_server(
                tmp_path / "replica2", "--state-dir", str(tmp_path / "state"), port=victim.port
            )
            assert back.client.get("/v2/models/wine").json()["versions"] == ["1", "2"]
            wait_until(lambda: rollout()["status"] == "running")
        entries = [e for e in audit(tmp_path) if e["actor"] == "fleet judge (anonymous)"]
        assert [e["action"] for e in entries] == ["rollout.pause", "rollout.resume"]
        assert f"http://{victim.url}" in entries[0]["reason"]
    finally:
        judge.send_signal(signal.SIGINT)
        judge.communicate(timeout=30)


def test_judgements_that_do_not_fit_are_refused_by_name(start_server: StartServer, tmp_path: Path):
    (live,) = start_fleet(start_server, tmp_path, 1)
    judgement = "/v2/models/wine/rollout/judgement"
    answer = live.client.post(judgement, json={"step": 1, "action": "advance"})
    assert answer.status_code == 404
    assert "has no rollout" in answer.json()["error"]
    # A rollout its server judges is no fleet's to decide.
    assert live.client.post("/v2/models/wine/rollout", json={"version": "2"}).status_code == 200
    answer = live.client.post(judgement, json={"step": 1, "action": "advance"})
    assert answer.status_code == 409
    assert "judged by its server" in answer.json()["error"]
    assert live.client.post("/v2/models/wine/rollout/rollback").status_code == 200
    started = {"version": "2", "judge": "fleet"}
    assert live.client.post("/v2/models/wine/rollout", json=started).status_code == 200
    for body, status, words in [
        ({"step": 1, "action": "hold"}, 400, "'action' must be one of"),
        ({"step": "1", "action": "advance"}, 400, "'step'"),
        ({"step": 1, "action": "advance", "checks": "x"}, 400, "'checks'"),
        ({"step": 2, "action": "advance"}, 409, "is of step 2"),
        ({"step": 1, "action": "resume"}, 409, "is running: no resume"),
    ]:
        answer = live.client.post(judgement, json=body)
        assert answer.status_code == status, answer.text
        assert words in answer.json()["error"]
    assert live.client.post(judgement, json={"step": 1, "action": "advance"}).status_code == 200
    rollout = live.client.get("/v2/models/wine/rollout").json()
    assert (rollout["step"], rollout["status"]) == (2, "running")
    bad = live.client.post("/v2/models/wine/rollout", json={"version": "3", "judge": "me"})
    assert bad.status_code == 400
    assert "'judge' must be one of server, fleet" in bad.text
    assert live.client.get("/v2/health/ready").status_code == 200


def test_drift_states_from_another_reference_are_refused(start_server: StartServer, tmp_path: Path):
    (live,) = start_fleet(start_server, tmp_path, 1)
    for index in range(20):
        body = json_request("input", "FP32", WINE_ROWS[index : index + 1])
        assert live.client.post("/v2/models/wine/infer", json=body).status_code == 200
    wait_until(lambda: window_rows(live) == 20)  # observed off the requests' path
    state = live.client.get("/v2/models/wine/versions/1/drift/state").json()
    drift = "/v2/models/wine/versions/1/drift"
    merged = live.client.post(drift, json={"states": [state]}).json()
    assert merged["summary"]["window_rows"] == 40  # its own 20 rows, and 20 more
    other = {**state, "reference": {"source": "served", "digest": "0" * 16}}
    answer = live.client.post(drift, json={"states": [state, other]})
    assert answer.status_code == 400
    assert "states[1] was counted against another reference" in answer.json()["error"]
    broken = {**state, "windows": {"inputs": {}}}
    answer = live.client.post(drift, json={"states": [broken]})
    assert answer.status_code == 400
    assert "do not merge" in answer.json()["error"]
    assert live.client.post(drift, json={"states": "x"}).status_code == 400
    assert live.client.get("/v2/health/ready").status_code == 200


def test_replica_names_resolve_to_one_address_per_replica():
    assert replica_urls(["127.0.0.1:8000", "http://127.0.0.1:8001/", " "]) == [
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8001",
    ]
    # A name: its IPv4 addresses (a dual-stack name's IPv6 ones would count it twice).
    assert replica_urls(["localhost:8000"]) == ["http://127.0.0.1:8000"]
    with pytest.raises(ValueError, match="needs a host and a port"):
        replica_urls(["127.0.0.1"])
    with pytest.raises(ValueError, match="does not resolve"):
        replica_urls(["no-such-replica.invalid:8000"])
    result = tidegate("fleet", "status", "--replicas", "no-such-replica.invalid:8000")
    assert result.returncode == 2
    assert "does not resolve" in result.stderr


def test_a_replica_that_does_not_answer_is_named(start_server: StartServer, tmp_path: Path):
    (live,) = start_fleet(start_server, tmp_path, 1)
    from tests.conftest import free_port

    down = f"127.0.0.1:{free_port()}"
    result = tidegate("fleet", "status", "--replicas", f"{live.url},{down}")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"http://{down}" in result.stdout
    assert "did not answer" in result.stdout
    result = tidegate("fleet", "traffic", "wine", "--replicas", f"{live.url},{down}")
    assert result.returncode == 3
    assert result.stderr.startswith("error: 1 replica(s) did not answer: http://" + down)


def test_the_fleet_endpoints_take_the_roles_of_their_kind():
    assert required_role("GET", "/v2/state") is Role.READER
    assert required_role("GET", "/v2/models/wine/traffic/state") is Role.READER
    assert required_role("POST", "/v2/models/wine/versions/1/drift") is Role.READER
    assert required_role("POST", "/v2/models/wine/rollout/judgement") is Role.OPERATOR
