"""Drift statistics end to end: the shipped models and their reference.npz, a real
server, the report endpoint and the Prometheus gauges."""

import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, json_request, reference_rows

BREAST_CANCER = ShippedVersion("breast_cancer", 1)


def _send(live: LiveServer, path: str, rows: np.ndarray, batch: int = 50) -> None:
    for start in range(0, len(rows), batch):
        body = json_request("input", "FP32", rows[start : start + batch])
        response = live.client.post(f"/v2/models/{path}/infer", json=body)
        assert response.status_code == 200, response.text


def _report_after(live: LiveServer, path: str, rows: int) -> dict:
    """The report once the observer has applied `rows` rows (it runs off the request path)."""
    deadline = time.monotonic() + 20
    while True:
        report = live.client.get(f"/v2/models/{path}/drift").json()
        if report.get("state") == "ready" and report["summary"]["window_rows"] >= rows:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.05)


def test_reference_traffic_is_quiet_and_a_shift_is_named(models_dir: Path, start_server):
    live: LiveServer = start_server(models_dir)
    reference = reference_rows(BREAST_CANCER, 426)["input"]
    rng = np.random.default_rng(5)
    quiet = reference[rng.permutation(len(reference))]
    _send(live, "breast_cancer/versions/2", np.concatenate([quiet, quiet]))
    report = _report_after(live, "breast_cancer/versions/2", 852)
    assert report["model_version"] == "2"
    assert report["reference"] == {"source": "reference.npz", "rows": 426}
    assert report["dropped_batches"] == 0
    assert report["summary"]["verdict"] == "no_drift"
    assert len(report["inputs"]) == 30
    assert {row["name"] for row in report["classes"]} == {"label", "probabilities"}

    shifted = np.concatenate([quiet, quiet]).copy()
    sigma = reference[:, 0].std()
    shifted[:, 0] += 0.5 * sigma
    _send(live, "breast_cancer/versions/1", shifted)
    report = _report_after(live, "breast_cancer/versions/1", 852)
    drifted_inputs = [row["name"] for row in report["inputs"] if row["verdict"] == "drift"]
    assert drifted_inputs == ["input[0]"]
    first = report["inputs"][0]
    assert first["mean_shift_sigma"] == pytest.approx(0.5, abs=0.05)

    state = live.client.get("/v2/models/breast_cancer/versions/1/drift/state").json()
    assert state["inputs"] == [f"input[{j}]" for j in range(30)]
    counts = np.array(state["windows"]["inputs"]["counts"])
    assert counts.shape == (30, 16)
    np.testing.assert_allclose(counts.sum(axis=1), 852)  # every row, in one bin per feature
    assert sorted(state["windows"]) == [
        "classes/label",
        "classes/probabilities",
        "inputs",
        "outputs",
    ]

    both = live.client.get("/v2/models/breast_cancer/drift").json()
    assert [v["model_version"] for v in both["versions"]] == ["1", "2"]
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(live.client.get("/metrics").text)
        for sample in family.samples
    }
    version = (("model", "breast_cancer"), ("version", "1"))
    assert samples["tidegate_drift_verdict", version] == 1.0
    assert samples["tidegate_drift_verdict", (("model", "breast_cancer"), ("version", "2"))] == 0.0
    psi_labels = tuple(sorted((*version, ("tensor_kind", "input"), ("feature", "input[0]"))))
    assert samples["tidegate_drift_psi", psi_labels] == pytest.approx(first["psi"], rel=1e-3)


def _numba_or_llvm_mapped(live: LiveServer) -> list[str]:
    """numba's and llvmlite's shared libraries that the server process has mapped: what
    importing numba loads (its _helperlib, llvmlite's libllvmlite), seen from outside."""
    maps = Path(f"/proc/{live.process.pid}/maps").read_text().splitlines()
    paths = {line.split(maxsplit=5)[-1] for line in maps if line.count(" ") >= 5}
    return sorted(p for p in paths if "/numba/" in p or "/llvmlite/" in p)


def _close(a: object, b: object) -> bool:
    """Equal, floats within 1e-9 relative: the same report from two servers."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_drift_runs_without_numba_and_falls_back_to_it_when_it_cannot_be_built(
    models_dir: Path, tmp_path: Path, start_server
):
    # Decay so slow that when each server's epochs close makes no difference.
    config = models_dir / "breast_cancer" / "config.toml"
    config.write_text(config.read_text() + "\n[drift]\nhalf_life = 1000000000000000\n")
    aot: LiveServer = start_server(models_dir, "--state-dir", str(tmp_path / "aot"))
    # No C compiler (distutils compiles with $CC) and an empty kernel cache: the build
    # fails and the server runs Numba's JIT, saying so.
    no_compiler = {"CC": "/bin/false", "CXX": "/bin/false"}
    jit: LiveServer = start_server(
        models_dir,
        "--state-dir",
        str(tmp_path / "jit"),
        env={**no_compiler, "TIDEGATE_KERNEL_CACHE": str(tmp_path / "empty-cache")},
    )
    assert "drift kernels: ahead of time, from " in aot.log()
    assert "the ahead-of-time build is not available (" in jit.log()
    assert "no working C/C++ compiler" in jit.log()

    reference = reference_rows(BREAST_CANCER, 426)["input"]
    shifted = reference.copy()
    shifted[:, 0] += 0.5 * reference[:, 0].std()
    reports = []
    for live in (aot, jit):
        _send(live, "breast_cancer/versions/1", np.concatenate([shifted, shifted]))
        reports.append(_report_after(live, "breast_cancer/versions/1", 852))
    from_aot, from_jit = reports
    assert (from_aot.pop("kernels"), from_jit.pop("kernels")) == ("aot", "jit")
    assert _close(from_aot, from_jit), (from_aot["summary"], from_jit["summary"])
    assert [row["name"] for row in from_aot["inputs"] if row["verdict"] == "drift"] == ["input[0]"]
    assert from_aot["inputs"][0]["mean_shift_sigma"] == pytest.approx(0.5, abs=0.05)

    assert _numba_or_llvm_mapped(aot) == []
    assert any("libllvmlite" in path for path in _numba_or_llvm_mapped(jit))
    for live, backend in ((aot, "aot"), (jit, "jit")):
        families = text_string_to_metric_families(live.client.get("/metrics").text)
        (info,) = [f for f in families if f.name == "tidegate_drift_kernels_info"]
        assert [(s.labels, s.value) for s in info.samples] == [({"backend": backend}, 1.0)]


def test_text_model_and_first_rows_as_reference(models_dir: Path, start_server):
    (models_dir / "digits" / "1" / "reference.npz").unlink()
    (models_dir / "digits" / "config.toml").write_text("[drift]\nreference_rows = 100\n")
    (models_dir / "diabetes" / "config.toml").write_text("[drift]\nenabled = false\n")
    live: LiveServer = start_server(models_dir)

    digits = reference_rows(ShippedVersion("digits", 1), 60)["input"]
    _send(live, "digits", digits, batch=20)
    deadline = time.monotonic() + 20
    while (report := live.client.get("/v2/models/digits/drift").json()["versions"][0])[
        "state"
    ] != "collecting_reference" or report["reference"]["rows"] < 60:
        assert time.monotonic() < deadline, report
        time.sleep(0.05)
    assert report["reference_rows_needed"] == 100
    _send(live, "digits", reference_rows(ShippedVersion("digits", 1), 60, start=60)["input"])
    deadline = time.monotonic() + 20
    while live.client.get("/v2/models/digits/versions/1/drift").json()["state"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    report = live.client.get("/v2/models/digits/versions/1/drift").json()
    assert report["reference"]["source"] == "served"
    assert len(report["inputs"]) == 64

    none = live.client.get("/v2/models/diabetes/versions/1/drift/state")
    assert none.status_code == 404
    assert "has no drift state" in none.json()["error"]
    assert live.client.get("/v2/models/diabetes/versions/1/drift").json() == {
        "model_name": "diabetes",
        "model_version": "1",
        "state": "disabled",
    }

    text = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["iris petals", "a"]}
        ]
    }
    assert live.client.post("/v2/models/dataset_topic/infer", json=text).status_code == 200
    report = _report_after(live, "dataset_topic/versions/1", 2)
    assert [row["name"] for row in report["inputs"]] == ["len(text)"]
    labels = next(row for row in report["classes"] if row["name"] == "label")
    assert "iris" in labels["reference_shares"]


def test_a_request_of_no_rows_is_answered_and_not_observed(models_dir: Path, start_server):
    server: LiveServer = start_server(models_dir)
    empty = json_request("input", "FP32", np.zeros((0, 30), dtype=np.float32))
    response = server.client.post("/v2/models/breast_cancer/versions/1/infer", json=empty)
    assert response.status_code == 200
    assert all(output["shape"][0] == 0 for output in response.json()["outputs"])
    time.sleep(1.2)  # two drains of the observer: the empty batch is drained on its own
    rows = reference_rows(ShippedVersion("breast_cancer", 1), 5)
    served = json_request("input", "FP32", rows["input"])
    assert server.client.post("/v2/models/breast_cancer/versions/1/infer", json=served).is_success
    time.sleep(1.2)  # two drains of the observer
    server.stop()
    assert "drift observation failed" not in server.log()
    assert "Traceback" not in server.log()
