"""The request log and JSON-lines logs of a live server: with sampling at 100 % every
request appears exactly once; with the log's disk full, serving goes on and the drop
is counted in /metrics; every log line of `--log-format json` is a JSON object."""

import json
import os
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, json_request, reference_rows

WINE = ShippedVersion("wine", 1)


def _body(request_id: str) -> dict:
    body = json_request("input", "FP32", reference_rows(WINE, 2)["input"])
    body["id"] = request_id
    return body


def _counter(server: LiveServer, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(server.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no {name} {labels} in /metrics")


def _lines(directory: Path, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        path = directory / "requests.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def test_every_request_appears_once_with_its_outcome(
    models_dir: Path, tmp_path: Path, start_server
):
    directory = tmp_path / "requests"
    server: LiveServer = start_server(
        models_dir, "--request-log", str(directory), "--request-log-payload"
    )
    for i in range(40):
        response = server.client.post("/v2/models/wine/infer", json=_body(f"r{i}"))
        assert response.status_code == 200
    bad = server.client.post("/v2/models/wine/infer", json={"id": "bad", "inputs": []})
    assert bad.status_code == 400
    entries = _lines(directory, 41)
    assert len(entries) == 41
    good = [e for e in entries if e["outcome"] == "success"]
    assert sorted(e["request_id"] for e in good) == sorted(f"r{i}" for i in range(40))
    first = next(e for e in good if e["request_id"] == "r0")
    assert (first["model"], first["version"], first["variant"], first["status"]) == (
        "wine",
        "1",
        "stable",
        200,
    )
    assert first["latency_ms"] > 0
    assert json.loads(first["request"])["id"] == "r0"
    assert json.loads(first["response"])["model_version"] == "1"
    failed = next(e for e in entries if e["outcome"] == "error")
    assert failed["status"] == 400
    assert "input" in failed["error"]
    assert _counter(server, "tidegate_request_log_written_total") == 41


def test_a_full_disk_drops_entries_and_serving_goes_on(
    models_dir: Path, tmp_path: Path, start_server
):
    directory = tmp_path / "requests"
    directory.mkdir()
    os.symlink("/dev/full", directory / "requests.jsonl")  # every write: ENOSPC
    server: LiveServer = start_server(models_dir, "--request-log", str(directory))
    for i in range(20):
        assert server.client.post("/v2/models/wine/infer", json=_body(f"r{i}")).status_code == 200
    deadline = time.monotonic() + 10
    while _counter(server, "tidegate_request_log_dropped_total", reason="write_error") < 20:
        assert time.monotonic() < deadline, "the drops were not counted"
        time.sleep(0.05)
    assert server.client.get("/v2/health/ready").status_code == 200
    assert "requestlog" in server.log()


def test_json_log_lines(models_dir: Path, tmp_path: Path, start_server):
    server: LiveServer = start_server(models_dir, "--log-format", "json")
    assert server.client.post("/v2/models/wine/infer", json={"inputs": []}).status_code == 400
    assert server.client.post("/v2/repository/models/nothing/load").status_code == 404
    server.stop()
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    loads = [r for r in records if r["logger"] == "tidegate.registry"]
    assert any("wine" in r["message"] for r in loads)
    errors = [r for r in records if r.get("status") == 400]
    assert errors[0]["model"] == "wine"
    assert any(r.get("status") == 404 for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)
