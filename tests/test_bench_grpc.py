"""`tidegate bench --protocol grpc` against a real `tidegate serve --grpc-port P`: its
counts agree with the server's own statistics (over gRPC and over HTTP), errors count
by status code, the open loop keeps its rate, client processes merge, and the
command line runs a level end to end."""

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests import test_grpc
from tests.conftest import LiveServer, free_port
from tidegate import bench as runner
from tidegate.loadgen import Plan, Target

# test_grpc's server (shipped models, gRPC on a free port), one for this module.
live = test_grpc.live


@pytest.fixture(scope="module")
def target(live: LiveServer) -> Target:
    return Target.parse(live.grpc_url, grpc=True)  # type: ignore[attr-defined]


def test_a_grpc_target_is_host_and_port():
    assert Target.parse("127.0.0.1:9001", grpc=True) == Target("127.0.0.1", 9001, "", True)
    assert Target.parse("grpc://localhost", grpc=True).port == 8001
    assert Target.parse("[::1]:5", grpc=True).address == "[::1]:5"
    for wrong in ("http://127.0.0.1:9001", "127.0.0.1:9001/prefix"):
        with pytest.raises(ValueError, match="grpc://host:port"):
            Target.parse(wrong, grpc=True)


def test_closed_loop_counts_agree_with_the_servers_stats(live: LiveServer, target: Target):
    http = Target.parse(live.url)
    prepared = runner.prepare(target, "breast_cancer", "1", "random", 3, binary=False)
    before = runner.server_stats(target, "breast_cancer", "1")
    before_http = runner.server_stats(http, "breast_cancer", "1")
    plan = Plan(concurrency=4, max_requests=300)
    result = runner.run(target, "breast_cancer", "1", prepared, plan)
    after = runner.server_stats(target, "breast_cancer", "1")
    after_http = runner.server_stats(http, "breast_cancer", "1")
    assert result.tally.errors == {}
    assert (result.tally.ok, result.tally.rows, result.tally.latency.count) == (300, 900, 300)
    times = runner.server_times(before, after)
    assert times is not None
    assert times.success == 300
    assert runner.server_times(before_http, after_http) == times
    assert result.tally.latency.mean_ns / 1e6 >= times.total_ms
    row = runner.summary(result, times)
    assert row["server_success"] == 300
    assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]


def test_errors_count_by_status_code(live: LiveServer, target: Target, tmp_path: Path):
    prepared = runner.prepare(target, "breast_cancer", None, "random", 1, binary=False)
    plan = Plan(concurrency=4, max_requests=40)
    result = runner.run(target, "no_such_model", None, prepared, plan)
    assert (result.tally.ok, result.tally.errors) == (0, {"NOT_FOUND": 40})
    assert runner.server_stats(target, "no_such_model", None) is None
    # Requests from a JSON file: one the model takes, one it does not.
    rows = [[0.5] * 30, [1.0] * 30]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_bytes(
        orjson.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 30], "data": rows}]}
        )
    )
    bad.write_bytes(
        orjson.dumps({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1]}]})
    )
    for path, outcome in ((good, (40, {})), (bad, (0, {"INVALID_ARGUMENT": 40}))):
        prepared = runner.prepare(target, "breast_cancer", None, str(path), 1, binary=False)
        result = runner.run(target, "breast_cancer", None, prepared, plan)
        assert (result.tally.ok, result.tally.errors) == outcome
    assert result.tally.rows == 0
    # Nothing listens: every call fails to connect, as over HTTP, and the level still ends.
    nobody = Target("127.0.0.1", free_port(), "", grpc=True)
    result = runner.run(nobody, "m", None, prepared, Plan(concurrency=2, max_requests=6))
    assert result.tally.errors == {"connection": 6}


def test_open_loop_sends_at_the_rate(target: Target):
    prepared = runner.prepare(target, "wine", None, "random", 1, binary=False)
    result = runner.run(target, "wine", None, prepared, Plan(rate=200, duration=1.5, warmup=0.2))
    assert result.tally.errors == {}
    assert result.tally.ok == pytest.approx(300, abs=3)


def test_processes_split_the_load_and_merge(target: Target):
    prepared = runner.prepare(target, "digits", None, "random", 1, binary=False)
    plan = Plan(concurrency=20, max_requests=100)
    result = runner.run(target, "digits", None, prepared, plan, processes=2)
    assert result.tally.ok == 200  # each process sends its own 100
    assert result.tally.latency.count == 200


def test_the_command_line_runs_grpc_levels(live: LiveServer, tmp_path: Path):
    out = tmp_path / "run.json"
    command = [sys.executable, "-m", "tidegate", "bench", live.grpc_url]  # type: ignore[attr-defined]
    options = ["--model", "digits", "--concurrency", "1,16", "--duration", "0.5"]
    done = subprocess.run(
        [*command, "--protocol", "grpc", *options, "--warmup", "0.1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "closed loop at 16 calls in flight" in done.stdout
    document = runner.read_json(out)
    assert (document["protocol"], document["encoding"]) == ("grpc", "raw")
    for level in document["levels"]:
        assert (level["ok"] > 0, level["errors"]) == (True, 0)
        assert level["server_success"] >= level["ok"]  # the warm-up counts there too
    # The HTTP port is no gRPC server.
    http = subprocess.run(
        [sys.executable, "-m", "tidegate", "bench", live.url, "--protocol", "grpc", *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert http.returncode != 0
    assert "no gRPC server answers" in http.stderr
