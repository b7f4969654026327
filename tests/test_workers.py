"""`tidegate serve --workers 2` as real processes: one desired state that every worker
reconciles to, reads that answer for the whole server, one judge, and a supervisor
that restarts a killed worker, stops on SIGTERM and gives up on a crash loop.

Each worker is also asked directly, over its private socket (found in its
environment), so that "every worker" is checked, not "the workers the kernel
happened to pick"."""

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, json_request, reference_rows
from tests.test_rollout import FAST
from tidegate.config import GRPC_GRACE_S, ServerConfig
from tidegate.server import serve
from tidegate.supervisor import Supervisor

WINE = ShippedVersion("wine", 1)


def _workers(server: LiveServer) -> dict[str, int]:
    """Slot name -> pid of the supervisor's live workers."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    found = {}
    for pid in children.read_text().split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # it has just exited
            continue
        variables = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        if "TIDEGATE_WORKER" not in variables:
            continue  # forked for a restart, not yet a worker: its environ is still ours
        found[variables["TIDEGATE_WORKER"]] = int(pid)
        found["run_dir"] = variables["TIDEGATE_RUN_DIR"]  # type: ignore[assignment]
    return found


def _wait_for_workers(server: LiveServer, count: int, timeout: float = 60) -> dict[str, int]:
    """The workers once `count` of them accept on their private sockets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = _workers(server)
        slots = [k for k in workers if k != "run_dir"]
        if len(slots) == count and all(
            _accepts(Path(str(workers["run_dir"])) / f"{slot}.sock") for slot in slots
        ):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"{count} workers not ready in {timeout} s:\n{server.log()}")


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _ask(run_dir: Path, slot: str, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request to one worker, over its private socket."""
    transport = httpx.HTTPTransport(uds=str(run_dir / f"{slot}.sock"))
    with httpx.Client(transport=transport, base_url="http://worker", timeout=60) as client:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]


def _each_worker(
    server: LiveServer, method: str, path: str, **kwargs: object
) -> list[httpx.Response]:
    workers = _wait_for_workers(server, 2)
    run_dir = Path(str(workers["run_dir"]))
    return [_ask(run_dir, slot, method, path, **kwargs) for slot in ("w0", "w1")]


def _fresh(server: LiveServer, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on a connection of its own (the kernel picks the worker)."""
    return httpx.request(method, server.base + path, timeout=60, **kwargs)  # type: ignore[arg-type]


def _wine_body(rows: int = 4, start: int = 0) -> dict:
    return json_request("input", "FP32", reference_rows(WINE, rows, start)["input"])


class Load:
    """Threads sending wine requests, each on connections of its own, until stopped."""

    def __init__(self, server: LiveServer, threads: int, fresh_every: int = 5) -> None:
        self.base, self.fresh_every = server.base, fresh_every
        self.stop = threading.Event()
        self.statuses: dict[int, int] = {}
        self.lock = threading.Lock()
        # Built here, not in the threads: np.load parses headers with ast.literal_eval, and
        # CPython 3.11's parser fails under concurrent use ("AST constructor recursion
        # depth mismatch", gh-106905).
        self.bodies = [_wine_body(8, start) for start in range(0, 120, 8)]
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        sent = 0
        while not self.stop.is_set():
            # A new connection every few requests: the kernel spreads them over workers.
            with httpx.Client(base_url=self.base, timeout=60) as client:
                for _ in range(self.fresh_every):
                    try:
                        status = client.post("/v2/models/wine/infer", json=self.bodies[sent % 15])
                        code = status.status_code
                    except httpx.TransportError:
                        code = 0  # the connection broke: its worker was killed
                    sent += 1
                    with self.lock:
                        self.statuses[code] = self.statuses.get(code, 0) + 1
                    if code == 0:
                        break

    def close(self) -> dict[int, int]:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        return self.statuses


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def two(models_dir: Path, state_dir: Path, start_server) -> LiveServer:
    server: LiveServer = start_server(models_dir, "--workers", "2", "--state-dir", str(state_dir))
    _wait_for_workers(server, 2)
    return server


def _versions(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return list(response.json()["versions"])


def test_a_load_through_one_connection_is_visible_on_every_worker(two: LiveServer):
    assert _each_worker(two, "GET", "/v2/models/breast_cancer")[0].json()["versions"] == ["1", "2"]
    unloaded = two.client.post(
        "/v2/repository/models/breast_cancer/unload", json={"parameters": {"version": "2"}}
    )
    assert unloaded.status_code == 200, unloaded.text
    assert [_versions(r) for r in _each_worker(two, "GET", "/v2/models/breast_cancer")] == [
        ["1"],
        ["1"],
    ]
    assert all(
        _versions(_fresh(two, "GET", "/v2/models/breast_cancer")) == ["1"] for _ in range(20)
    )
    loaded = two.client.post(
        "/v2/repository/models/breast_cancer/load", json={"parameters": {"version": "2"}}
    )
    assert loaded.status_code == 200, loaded.text
    assert [_versions(r) for r in _each_worker(two, "GET", "/v2/models/breast_cancer")] == [
        ["1", "2"],
        ["1", "2"],
    ]


def test_statistics_count_every_request_whichever_worker_answered(two: LiveServer):
    sent = 200
    for i in range(sent):
        answer = _fresh(two, "POST", "/v2/models/wine/infer", json=_wine_body(1, i % 100))
        assert answer.status_code == 200
    per_worker = []
    for response in _each_worker(two, "GET", "/internal/stats"):
        counts = {(n, v): s["durations"]["success"][0] for n, v, s in response.json()}
        per_worker.append(counts["wine", 1])
    assert sum(per_worker) == sent
    assert all(count > 0 for count in per_worker), per_worker  # both workers served
    for response in [_fresh(two, "GET", "/v2/models/wine/stats") for _ in range(6)]:
        stats = response.json()["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == sent
        assert stats["inference_count"] == sent


def test_twenty_swaps_under_load_fail_no_request(two: LiveServer):
    load = Load(two, threads=16)
    try:
        for _ in range(20):
            swapped = two.client.post("/v2/repository/models/wine/load", json={})
            assert swapped.status_code == 200, swapped.text
    finally:
        statuses = load.close()
    assert set(statuses) == {200}, statuses
    assert sum(statuses.values()) > 100


def test_a_canary_split_holds_over_both_workers(two: LiveServer):
    loaded = two.client.post(
        "/v2/repository/models/wine/load", json={"parameters": {"version": "2"}}
    )
    assert loaded.status_code == 200, loaded.text
    put = two.client.put(
        "/v2/models/wine/traffic", json={"stable": "1", "canary": "2", "weight": 10}
    )
    assert put.status_code == 200, put.text
    for response in _each_worker(two, "GET", "/v2/models/wine/traffic"):
        assert (response.json()["canary"], response.json()["weight"]) == ("2", 10)
    load = Load(two, threads=8, fresh_every=25)
    try:
        deadline = time.monotonic() + 120
        while sum(load.statuses.values()) < 5000 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        statuses = load.close()
    assert set(statuses) == {200}, statuses
    served = {}
    for version in ("1", "2"):
        stats = two.client.get(f"/v2/models/wine/versions/{version}/stats").json()
        served[version] = stats["model_stats"][0]["inference_stats"]["success"]["count"]
    total = sum(served.values())
    assert total == sum(statuses.values())
    assert served["2"] / total == pytest.approx(0.10, abs=0.015)
    # The traffic status's window counts the requests of both workers too.
    window = _fresh(two, "GET", "/v2/models/wine/traffic").json()["window"]
    assert window["split"] == {"stable": served["1"], "canary": served["2"]}
    assert window["canary"]["requests"] == served["2"]


def test_a_bad_canary_rolls_back_once_on_the_traffic_of_both_workers(
    two: LiveServer, state_dir: Path
):
    load = Load(two, threads=4, fresh_every=10)
    try:
        started = two.client.post("/v2/models/wine/rollout", json={"version": "3", **FAST})
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 90
        status = {}
        while time.monotonic() < deadline:
            status = two.client.get("/v2/models/wine/rollout").json()
            if status["status"] in ("promoted", "rolled_back"):
                break
            time.sleep(0.1)
    finally:
        statuses = load.close()
    assert status["status"] == "rolled_back", status
    assert set(statuses) == {200}, statuses
    audit = [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()]
    rollbacks = [entry for entry in audit if entry["action"] == "rollout.rollback"]
    assert len(rollbacks) == 1, rollbacks
    assert rollbacks[0]["actor"] == "judge"
    for response in _each_worker(two, "GET", "/v2/models/wine/rollout"):
        assert response.json()["status"] == "rolled_back"
    for response in _each_worker(two, "GET", "/v2/models/wine/versions/3/ready"):
        assert response.status_code == 404


def test_a_killed_worker_comes_back_serving_the_current_state(two: LiveServer):
    # A rollout in progress: it holds at its first step (10 %) for an hour.
    slow = {**FAST, "min_dwell_s": 3600, "max_dwell_s": 7200}
    started = two.client.post("/v2/models/wine/rollout", json={"version": "2", **slow})
    assert started.status_code == 200, started.text
    before = _wait_for_workers(two, 2)
    load = Load(two, threads=8)
    try:
        time.sleep(0.5)
        os.kill(before["w1"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = _workers(two)
            if after.get("w1") not in (None, before["w1"]):
                break
            time.sleep(0.1)
        _wait_for_workers(two, 2)
        time.sleep(0.5)  # the restarted worker answers its share of the load
    finally:
        statuses = load.close()
    assert after["w1"] != before["w1"]
    # Only requests on the killed worker's connections may fail: report how many.
    failed = sum(count for code, count in statuses.items() if code != 200)
    print(f"requests: {sum(statuses.values())}, failed when w1 was killed: {failed}")
    assert set(statuses) <= {200, 0}, statuses
    assert failed <= 8  # at most one in flight per client thread
    for response in _each_worker(two, "GET", "/v2/models/wine/rollout"):
        document = response.json()
        assert (document["status"], document["step"], document["weight"]) == ("running", 1, 10)
    for response in _each_worker(two, "GET", "/v2/models/wine/traffic"):
        document = response.json()
        assert (document["stable"], document["canary"], document["weight"]) == ("1", "2", 10)
    assert "worker w1 (pid" in two.log()
    assert "restarting it in" in two.log()


def test_a_corrupt_desired_state_keeps_every_worker_serving(two: LiveServer, state_dir: Path):
    loaded = two.client.post(
        "/v2/repository/models/wine/load", json={"parameters": {"version": "2"}}
    )
    assert loaded.status_code == 200, loaded.text
    assert two.client.put("/v2/models/wine/traffic", json={"stable": "1"}).status_code == 200
    (state_dir / "state.json").write_text('{"format": 2, "generation": 9, "state": ')
    time.sleep(1.2)  # the workers look for changes every 0.5 s
    assert "desired state not applied" in two.log()
    assert "is unreadable" in two.log()
    for response in _each_worker(two, "GET", "/v2/models/wine/traffic"):
        assert response.json()["stable"] == "1"
    # The next change starts from the last good state and sets the broken file aside.
    put = two.client.put("/v2/models/wine/traffic", json={"stable": "2"})
    assert put.status_code == 200, put.text
    assert list(state_dir.glob("state.json.corrupt-*"))
    for response in _each_worker(two, "GET", "/v2/models/wine/traffic"):
        assert response.json()["stable"] == "2"


def test_a_stale_desired_state_is_refused_by_name(two: LiveServer, state_dir: Path):
    assert two.client.put("/v2/models/wine/traffic", json={"stable": "1"}).status_code == 200
    document = json.loads((state_dir / "state.json").read_text())
    document["generation"] = 0
    document["state"]["traffic"] = {}
    (state_dir / "state.json").write_text(json.dumps(document))
    time.sleep(1.2)
    assert "older than the" in two.log()
    assert "a stale file" in two.log()
    for response in _each_worker(two, "GET", "/v2/models/wine/traffic"):
        assert response.json()["stable"] == "1"


def test_a_worker_that_cannot_build_a_version_undoes_the_load_everywhere(
    two: LiveServer, models_dir: Path
):
    workers = _wait_for_workers(two, 2)
    run_dir = Path(str(workers["run_dir"]))
    # w1 is held still while w0 loads version 3; the file then breaks before w1 reads it.
    os.kill(workers["w1"], signal.SIGSTOP)
    result: dict[str, httpx.Response] = {}

    def load() -> None:
        result["load"] = _ask(
            run_dir,
            "w0",
            "POST",
            "/v2/repository/models/wine/load",
            json={"parameters": {"version": "3"}},
        )

    loading = threading.Thread(target=load)
    loading.start()
    try:
        deadline = time.monotonic() + 30
        while "serving versions [1, 2, 3]" not in two.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        (models_dir / "wine" / "3" / "model.onnx").write_bytes(b"not an onnx file")
    finally:
        os.kill(workers["w1"], signal.SIGCONT)
        loading.join()
    response = result["load"]
    assert response.status_code == 500
    assert "worker w1" in response.json()["error"]
    assert "undone" in response.json()["error"]
    for answer in _each_worker(two, "GET", "/v2/models/wine"):
        assert "3" not in _versions(answer)


def test_sigterm_drains_and_stops_every_worker(two: LiveServer):
    workers = _wait_for_workers(two, 2)
    run_dir = Path(str(workers["run_dir"]))
    assert two.stop() == 0
    for slot in ("w0", "w1"):
        assert not Path(f"/proc/{workers[slot]}").exists()
    assert not run_dir.exists()


def test_a_worker_that_keeps_dying_stops_the_server_with_status_1(two: LiveServer):
    deadline = time.monotonic() + 60
    killed: set[int] = set()
    while two.process.poll() is None and time.monotonic() < deadline:
        pid = _workers(two).get("w0")
        if pid is not None and pid not in killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    assert two.process.wait(30) == 1
    assert len(killed) == 5  # CRASH_LIMIT deaths within the window
    assert "died 5 times" in two.log()
    assert "stopping the server" in two.log()


def test_a_broken_auth_file_is_refused_before_any_worker_starts(tmp_path: Path, models_dir: Path):
    auth = tmp_path / "auth.toml"
    auth.write_text("this is not toml [")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidegate",
            "serve",
            str(models_dir),
            "--workers",
            "2",
            "--port",
            "0",
            "--auth-file",
            str(auth),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "auth.toml" in result.stderr
    assert "worker w0 started" not in result.stderr


def test_the_drift_report_counts_the_rows_of_every_worker(two: LiveServer):
    requests, rows = 60, 5
    for i in range(requests):
        body = _wine_body(rows, (i * rows) % 100)
        assert _fresh(two, "POST", "/v2/models/wine/infer", json=body).status_code == 200
    time.sleep(1.2)  # each worker's drift observer drains every 0.5 s
    own = [
        np.asarray(r.json()["windows"]["inputs"]["counts"]).sum(axis=1)
        for r in _each_worker(two, "GET", "/internal/drift/wine/1")
    ]
    assert all(counts.min() > 0 for counts in own)  # both workers observed some
    assert (own[0] + own[1] == requests * rows).all()  # every feature counted every row
    for _ in range(4):
        report = _fresh(two, "GET", "/v2/models/wine/versions/1/drift").json()
        assert report["summary"]["window_rows"] == requests * rows
        state = _fresh(two, "GET", "/v2/models/wine/versions/1/drift/state").json()
        counts = np.asarray(state["windows"]["inputs"]["counts"]).sum(axis=1)
        assert (counts == requests * rows).all()


@pytest.mark.parametrize("grpc_port", [0, 8001])
def test_the_supervisor_waits_out_a_workers_whole_drain(grpc_port: int):
    """A worker told to stop drains HTTP (uvicorn's graceful timeout), then gRPC calls
    when it serves gRPC: the supervisor must not kill it before both could finish."""
    supervisor = Supervisor(ServerConfig(Path("models"), port=0, grpc_port=grpc_port), 2)
    try:
        http = inspect.signature(serve).parameters["graceful_timeout"].default
        drain = http + (GRPC_GRACE_S if grpc_port else 0)
        assert drain < supervisor.drain_limit_s() <= drain + 10
    finally:
        supervisor._reserved.close()
        shutil.rmtree(supervisor.run_dir)
