"""`GET /metrics` after a known sequence of requests, scraped over HTTP and parsed with
prometheus-client's own parser: counters and histogram counts equal what was sent, and
sums equal what `/stats` reports."""

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, json_request, reference_rows

CANCER = ShippedVersion("breast_cancer", 2)
WINE = ShippedVersion("wine", 1)


def _scrape(server: LiveServer) -> dict[tuple[str, tuple], float]:
    response = server.client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _stats(server: LiveServer, model: str, version: str) -> dict:
    return server.client.get(f"/v2/models/{model}/versions/{version}/stats").json()["model_stats"][
        0
    ]


@pytest.fixture
def live(models_dir: Path, tmp_path: Path, start_server) -> LiveServer:
    return start_server(models_dir, "--state-dir", str(tmp_path / "state"))


def test_counters_and_histograms_equal_what_was_sent(live: LiveServer):
    body = json_request("input", "FP32", reference_rows(CANCER, 3)["input"])
    for _ in range(7):
        assert live.client.post("/v2/models/breast_cancer/infer", json=body).status_code == 200
    for _ in range(3):
        response = live.client.post("/v2/models/breast_cancer/versions/1/infer", json=body)
        assert response.status_code == 200
    for bad in ({"inputs": []}, {"inputs": [{"name": "nope"}]}):
        assert live.client.post("/v2/models/breast_cancer/infer", json=bad).status_code == 400

    samples = _scrape(live)
    stable = {"model": "breast_cancer", "version": "2", "variant": "stable"}
    other = {"model": "breast_cancer", "version": "1", "variant": "other"}
    requests = "tidegate_inference_requests_total"
    assert _value(samples, requests, **stable, outcome="success") == 7
    assert _value(samples, requests, **stable, outcome="failure") == 2
    assert _value(samples, requests, **other, outcome="success") == 3
    assert _value(samples, requests, **other, outcome="failure") == 0

    stats = _stats(live, "breast_cancer", "2")["inference_stats"]
    for part, field in (("duration", "success"), ("queue", "queue")):
        name = f"tidegate_request_{part}_seconds"
        assert _value(samples, f"{name}_count", **stable) == 7
        assert _value(samples, f"{name}_bucket", **stable, le="+Inf") == 7
        assert _value(samples, f"{name}_sum", **stable) == pytest.approx(
            stats[field]["ns"] / 1e9, rel=1e-9
        )
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (sample, labels), value in samples.items()
            if sample == f"{name}_bucket" and dict(labels).get("version") == "2"
        )
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)  # cumulative
    compute = sum(stats[f]["ns"] for f in ("compute_input", "compute_infer", "compute_output"))
    assert _value(samples, "tidegate_request_compute_seconds_sum", **stable) == pytest.approx(
        compute / 1e9, rel=1e-9
    )

    version = {"model": "breast_cancer", "version": "2"}
    runs = _stats(live, "breast_cancer", "2")["execution_count"]
    assert _value(samples, "tidegate_batch_size_rows_count", **version) == runs
    assert _value(samples, "tidegate_batch_size_rows_sum", **version) == 7 * 3
    assert _value(samples, "tidegate_inference_rows_total", **version) == 7 * 3
    assert _value(samples, "tidegate_inference_runs_total", **version) == runs
    assert _value(samples, "tidegate_queue_depth", **version) == 0
    assert _value(samples, "tidegate_inflight_requests") == 0
    assert _value(samples, "tidegate_model_load_seconds", **version) > 0


def test_load_failures_are_counted(live: LiveServer, models_dir: Path):
    (models_dir / "digits" / "1" / "model.onnx").write_bytes(b"not onnx")
    assert live.client.post("/v2/repository/models/digits/load").status_code == 400
    samples = _scrape(live)
    assert _value(samples, "tidegate_model_load_failures_total", model="digits") == 1
    # The serving version stayed.
    assert _value(samples, "tidegate_model_load_seconds", model="digits", version="1") > 0


def test_shadow_and_rollout_series(live: LiveServer):
    loaded = live.client.post(
        "/v2/repository/models/wine/load", json={"parameters": {"version": "2"}}
    )
    assert loaded.status_code == 200
    policy = {"stable": "1", "canary": "2", "weight": 100, "mode": "shadow"}
    assert live.client.put("/v2/models/wine/traffic", json=policy).status_code == 200
    body = json_request("input", "FP32", reference_rows(WINE, 2)["input"])
    for _ in range(5):
        assert live.client.post("/v2/models/wine/infer", json=body).status_code == 200
    for _ in range(100):
        samples = _scrape(live)
        shadow = (
            "tidegate_request_duration_seconds_count",
            (("model", "wine"), ("variant", "shadow"), ("version", "2")),
        )
        if samples.get(shadow) == 5:
            break
    assert _value(samples, "tidegate_shadow_mirrored_requests_total", model="wine") == 5
    assert _value(samples, "tidegate_shadow_dropped_requests_total", model="wine") == 0
    assert samples[shadow] == 5
    requests = "tidegate_inference_requests_total"
    stable = {"model": "wine", "version": "1", "variant": "stable"}
    assert _value(samples, requests, **stable, outcome="success") == 5

    assert (
        live.client.put("/v2/models/wine/traffic", json={"canary": None, "weight": 0}).status_code
        == 200
    )
    started = live.client.post("/v2/models/wine/rollout", json={"version": "2", "min_rows": 10**6})
    assert started.status_code == 200
    samples = _scrape(live)
    assert _value(samples, "tidegate_rollout_step", model="wine") == 1
    assert _value(samples, "tidegate_rollout_weight_percent", model="wine") == 5
    assert _value(samples, "tidegate_rollout_status", model="wine", status="running") == 1
    assert _value(samples, "tidegate_rollout_status", model="wine", status="promoted") == 0
