"""`tidegate bench` against real servers: a live tidegate (its counts must agree with
the server's own /stats) and a stand-in server that stalls every 100th request
(the open loop must show the stall, the closed loop must say it hides it)."""

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer, free_port
from tidegate import bench as runner
from tidegate.loadgen import Plan, Target
from tidegate.workload import InputSpec, random_requests

HERE = Path(__file__).resolve().parent


def _served(server: LiveServer, outcome: str) -> float:
    """diabetes v1's request count by outcome, scraped from /metrics and parsed."""
    text = server.client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tidegate_inference_requests_total" and sample.labels == {
                "model": "diabetes",
                "version": "1",
                "variant": "stable",
                "outcome": outcome,
            }:
                return sample.value
    raise AssertionError("no tidegate_inference_requests sample for diabetes v1")


def test_closed_loop_counts_agree_with_the_servers_stats(server: LiveServer):
    target = Target.parse(server.url)
    prepared = runner.prepare(target, "diabetes", "1", "random", 3, binary=True)
    before = runner.server_stats(target, "diabetes", "1")
    scraped = _served(server, "success"), _served(server, "failure")
    result = runner.run(target, "diabetes", "1", prepared, Plan(concurrency=4, max_requests=300))
    after = runner.server_stats(target, "diabetes", "1")
    assert _served(server, "success") - scraped[0] == 300
    assert _served(server, "failure") - scraped[1] == 0
    times = runner.server_times(before, after)
    assert result.tally.errors == {}
    assert result.tally.ok == 300
    assert result.tally.rows == 900
    assert times is not None
    assert times.success == 300
    # What the client waited includes what the server spent.
    assert result.tally.latency.mean_ns / 1e6 >= times.total_ms
    row = runner.summary(result, times)
    assert row["excludes_waiting"] is True
    assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]


def _duration_buckets(server: LiveServer) -> dict[float, float]:
    """diabetes v1's cumulative request-duration buckets (le in seconds -> count)."""
    text = server.client.get("/metrics").text
    buckets = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "tidegate_request_duration_seconds_bucket"
                and labels["model"] == "diabetes"
                and labels["version"] == "1"
                and labels["variant"] == "stable"
            ):
                buckets[float(labels["le"])] = sample.value
    return buckets


def test_client_percentiles_cover_the_servers_latency_histogram(server: LiveServer):
    """Each request's time at the client includes its time in the server, so at any
    latency x the server's share of requests within x is at least the client's: the
    server's histogram, at the bucket bound above the client's p50 (p99), holds at
    least half (99 %) of the requests."""
    target = Target.parse(server.url)
    prepared = runner.prepare(target, "diabetes", "1", "random", 1, binary=False)
    before = _duration_buckets(server)
    result = runner.run(target, "diabetes", "1", prepared, Plan(concurrency=2, max_requests=400))
    after = _duration_buckets(server)
    assert result.tally.ok == 400
    counts = {bound: after[bound] - before.get(bound, 0) for bound in after}
    assert counts[math.inf] == 400
    for q in (50, 99):
        client_s = result.tally.latency.percentile(q) / 1e9
        bound = min(b for b in counts if b >= client_s)
        assert counts[bound] >= 400 * q / 100, (q, client_s, counts)


def test_open_loop_sends_at_the_rate(server: LiveServer):
    target = Target.parse(server.url)
    prepared = runner.prepare(target, "breast_cancer", None, "random", 1, binary=False)
    plan = Plan(rate=200, duration=1.5, warmup=0.2)
    result = runner.run(target, "breast_cancer", None, prepared, plan)
    assert result.tally.errors == {}
    assert result.tally.ok == pytest.approx(300, abs=3)  # 1.5 s at 200/s, after the warm-up
    assert result.client.late.count == result.tally.ok
    # Timers fire up to 1 ms late, so the client wakes early: sends leave on time.
    assert result.client.late.percentile(90) < 500_000


def test_errors_are_counted_by_kind(server: LiveServer, tmp_path: Path):
    target = Target.parse(server.url)
    bad = tmp_path / "bad.json"
    bad.write_bytes(
        orjson.dumps(
            {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        )
    )
    prepared = runner.prepare(target, "breast_cancer", None, str(bad), 1, binary=False)
    result = runner.run(
        target, "breast_cancer", None, prepared, Plan(concurrency=2, max_requests=20)
    )
    assert result.tally.ok == 0
    assert result.tally.errors == {"http 400": 20}
    unreachable = Target("127.0.0.1", free_port(), "")
    plan = Plan(concurrency=1, max_requests=3)
    result = runner.run(unreachable, "m", None, prepared, plan)
    assert result.tally.errors == {"connection": 3}


def test_processes_split_the_load_and_merge(server: LiveServer):
    target = Target.parse(server.url)
    prepared = runner.prepare(target, "diabetes", "1", "random", 1, binary=False)
    plan = Plan(concurrency=3, max_requests=100)
    result = runner.run(target, "diabetes", "1", prepared, plan, processes=2)
    assert result.tally.ok == 200  # each process sends its own 100
    assert result.tally.latency.count == 200


@pytest.fixture(scope="module")
def stalling() -> Iterator[Target]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(HERE / "stall_server.py"), str(port)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/", content=b"{}", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield Target("127.0.0.1", port, "")
    finally:
        process.terminate()
        process.wait(10)


def _requests() -> list:
    return random_requests([InputSpec("x", "FP32", (-1, 4))], 1, binary=False)


def test_open_loop_shows_a_stall_that_the_closed_loop_hides(stalling: Target):
    closed = runner.run(stalling, "m", None, _requests(), Plan(concurrency=1, max_requests=400))
    closed_row = runner.summary(closed, None)
    # One request in 100 waited 200 ms: the closed loop's p90 does not show it ...
    assert closed_row["p90_ms"] < 20
    assert closed_row["max_ms"] >= 200
    assert closed_row["excludes_waiting"] is True
    # ... while at 200 requests/s every stall holds up the 40 requests due meanwhile.
    opened = runner.run(stalling, "m", None, _requests(), Plan(rate=200, duration=2.0))
    open_row = runner.summary(opened, None)
    assert open_row["excludes_waiting"] is False
    assert open_row["p99_ms"] >= 150
    assert open_row["p90_ms"] >= 50


def _tidegate(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tidegate", "bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_command_line_writes_json_csv_and_a_comparison(server: LiveServer, tmp_path: Path):
    out_json, out_csv = tmp_path / "run.json", tmp_path / "run.csv"
    short = ["--duration", "0.5", "--warmup", "0.1"]
    done = _tidegate(
        server.url,
        "--model",
        "digits",
        "--concurrency",
        "1,4",
        *short,
        "--protocol",
        "binary",
        "--json",
        str(out_json),
        "--csv",
        str(out_csv),
    )
    assert done.returncode == 0, done.stderr
    assert "p99 ms" in done.stdout
    document = runner.read_json(out_json)
    assert [level["level"] for level in document["levels"]] == [1, 4]
    assert all(level["errors"] == 0 and level["ok"] > 0 for level in document["levels"])
    assert out_csv.read_text().count("\n") == 3  # header and two levels
    # A second run, then both side by side, drawn too.
    again, picture = tmp_path / "again.json", tmp_path / "both.png"
    done = _tidegate(
        server.url, "--model", "digits", "--concurrency", "4", *short, "--json", str(again)
    )
    assert done.returncode == 0, done.stderr
    compared = _tidegate("--compare", str(out_json), str(again), "--plot", str(picture))
    assert compared.returncode == 0, compared.stderr
    assert "B/A" in compared.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_line_needs_a_url_and_model_or_compare():
    done = _tidegate("--concurrency", "1")
    assert done.returncode == 2
    assert "a load needs URL and --model" in done.stderr


def test_pipelined_requests_come_back_in_order_and_all_count(server: LiveServer):
    target = Target.parse(server.url)
    prepared = runner.prepare(target, "diabetes", "1", "random", 1, binary=False)
    before = _served(server, "success")
    plan = Plan(concurrency=8, pipeline=4, max_requests=400)
    result = runner.run(target, "diabetes", "1", prepared, plan)
    assert result.tally.errors == {}
    assert result.tally.ok == 400
    assert _served(server, "success") - before == 400
