"""A real server process: start-up with broken models, limits, the repository
extension (load/unload), overload and graceful shutdown."""

import gzip
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.shipped import ShippedVersion, expected_outputs, reference_rows

DIGITS = ShippedVersion("digits", 1)


def _digits_body(rows: int) -> bytes:
    feeds = reference_rows(DIGITS, rows)
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [rows, 64],
                    "data": feeds["input"].ravel().tolist(),
                }
            ]
        }
    )


def test_broken_models_at_start_are_reported_and_others_serve(models_dir: Path, start_server):
    garbage = models_dir / "garbage" / "1" / "model.onnx"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"this is not an onnx file")
    truncated = models_dir / "truncated" / "1" / "model.onnx"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes((models_dir / "digits" / "1" / "model.onnx").read_bytes()[:3000])
    typo = models_dir / "typo"
    shutil.copytree(models_dir / "diabetes", typo)
    (typo / "config.toml").write_text("[batching]\nmax_batchsize = 8\n")

    live = start_server(models_dir)

    log = live.log()
    assert f"{garbage}: cannot load the model" in log
    assert f"{truncated}: cannot load the model" in log
    assert f"{typo / 'config.toml'}: unknown key batching.max_batchsize" in log
    index = {row["name"]: row for row in live.client.post("/v2/repository/index").json()}
    for name, path in (("garbage", garbage), ("truncated", truncated)):
        assert index[name]["state"] == "UNAVAILABLE"
        assert str(path) in index[name]["reason"]
    assert "max_batchsize" in index["typo"]["reason"]
    response = live.client.get("/v2/models/garbage/ready")
    assert response.status_code == 404
    assert "model 'garbage' is not loaded" in response.json()["error"]
    assert live.client.post("/v2/models/digits/infer", content=_digits_body(2)).status_code == 200


def test_body_limit(models_dir: Path, start_server):
    live = start_server(models_dir, "--max-body-size", "4096")
    small = live.client.post("/v2/models/digits/infer", content=_digits_body(1))
    assert small.status_code == 200
    big = live.client.post("/v2/models/digits/infer", content=_digits_body(64))
    assert big.status_code == 413
    assert "over the limit of 4096 bytes" in big.json()["error"]
    bomb = gzip.compress(b" " * 100_000 + _digits_body(1))
    assert len(bomb) < 4096
    inflated = live.client.post(
        "/v2/models/digits/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert inflated.status_code == 413
    assert "decompressed body" in inflated.json()["error"]
    assert live.client.post("/v2/models/digits/infer", content=_digits_body(1)).status_code == 200


def test_unload_and_load_with_tritonclient(models_dir: Path, start_server):
    live = start_server(models_dir)
    triton = httpclient.InferenceServerClient(live.url)

    triton.unload_model("digits")
    assert not triton.is_model_ready("digits")
    assert triton.is_server_ready()
    response = live.client.post("/v2/models/digits/infer", content=_digits_body(1))
    assert response.status_code == 404
    assert "model 'digits' is not loaded" in response.json()["error"]
    states = {r["name"]: r["state"] for r in triton.get_model_repository_index()}
    assert states["digits"] == "UNAVAILABLE"

    triton.load_model("digits")
    response = live.client.post("/v2/models/digits/infer", content=_digits_body(3))
    assert response.status_code == 200
    expected = expected_outputs(DIGITS, reference_rows(DIGITS, 3))
    assert response.json()["outputs"][0]["data"] == expected["label"].tolist()

    triton.unload_model("no_such_model")  # unloading what is not loaded succeeds, as in Triton
    with pytest.raises(InferenceServerException, match="not in the repository"):
        triton.load_model("no_such_model")


def test_unloading_what_is_not_loaded_is_a_no_op_that_is_audited(models_dir: Path, start_server):
    """Triton's unload is idempotent ("unloading a model that is not loaded on server
    has no affect and success code will be returned"): a retried unload never fails."""
    live = start_server(models_dir)
    post = live.client.post
    assert post("/v2/repository/models/digits/unload").json() == {}
    again = post("/v2/repository/models/digits/unload")
    assert again.status_code == 200
    assert again.json() == {"message": "model 'digits' is already unloaded"}
    version = post("/v2/repository/models/digits/unload", json={"parameters": {"version": "1"}})
    assert version.status_code == 200
    assert version.json() == {"message": "model 'digits' version 1 is already unloaded"}
    unknown = post("/v2/repository/models/no_such_model/unload")
    assert unknown.status_code == 200
    assert "not loaded, nor in the repository" in unknown.json()["message"]
    not_a_version = post(
        "/v2/repository/models/digits/unload", json={"parameters": {"version": "x"}}
    )
    assert not_a_version.status_code == 404
    assert "has no version 'x'" in not_a_version.json()["error"]

    entries = live.client.get("/v2/audit").json()["entries"]
    unloads = [
        (e["model"], e["version"], e["outcome"], e["reason"])
        for e in entries
        if e["action"] == "unload"
    ]
    assert unloads == [
        ("digits", None, "done", ""),
        ("digits", None, "no-op", "model 'digits' is already unloaded"),
        ("digits", "1", "no-op", "model 'digits' version 1 is already unloaded"),
        (
            "no_such_model",
            None,
            "no-op",
            "model 'no_such_model' is not loaded, nor in the repository: nothing to unload",
        ),
        ("digits", "x", "failed", "model 'digits' has no version 'x'"),
    ]
    assert live.client.get("/v2/health/ready").status_code == 200


def test_versions_load_and_unload_one_at_a_time(models_dir: Path, start_server):
    live = start_server(models_dir)
    post = live.client.post

    def answering_version() -> str:
        body = orjson.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [0] * 30}]}
        )
        response = post("/v2/models/breast_cancer/infer", content=body)
        assert response.status_code == 200
        assert response.json()["model_version"] == response.headers["tidegate-model-version"]
        return response.headers["tidegate-model-version"]

    assert answering_version() == "2"
    unload = post(
        "/v2/repository/models/breast_cancer/unload", json={"parameters": {"version": "2"}}
    )
    assert unload.status_code == 200
    assert answering_version() == "1"
    assert live.client.get("/v2/models/breast_cancer/versions/2/ready").status_code == 404
    assert live.client.get("/v2/models/breast_cancer/versions/1/ready").status_code == 200
    assert (
        post(
            "/v2/repository/models/breast_cancer/load", json={"parameters": {"version": 2}}
        ).status_code
        == 200
    )
    assert answering_version() == "2"

    missing = post(
        "/v2/repository/models/breast_cancer/load", json={"parameters": {"version": "5"}}
    )
    assert missing.status_code == 404
    assert "no version 5" in missing.json()["error"]
    gone = post("/v2/repository/models/breast_cancer/unload", json={"parameters": {"version": "5"}})
    assert gone.status_code == 200
    assert gone.json() == {"message": "model 'breast_cancer' version 5 is already unloaded"}

    # A new version directory is served once loaded; the policy "latest" drops version 1.
    shutil.copytree(models_dir / "digits" / "1", models_dir / "digits" / "2")
    assert post("/v2/repository/models/digits/load").status_code == 200
    meta = live.client.get("/v2/models/digits").json()
    assert meta["versions"] == ["2"]


def test_failed_load_leaves_the_serving_version(models_dir: Path, start_server):
    live = start_server(models_dir)
    (models_dir / "digits" / "2").mkdir()
    (models_dir / "digits" / "2" / "model.onnx").write_bytes(b"\x08\x01garbage")
    response = live.client.post("/v2/repository/models/digits/load")
    assert response.status_code == 400
    assert "digits/2/model.onnx: cannot load the model" in response.json()["error"]
    assert live.client.get("/v2/models/digits/ready").status_code == 200
    served = live.client.post("/v2/models/digits/infer", content=_digits_body(2))
    assert served.headers["tidegate-model-version"] == "1"
    index = live.client.post("/v2/repository/index").json()
    digits = {(r["version"], r["state"]) for r in index if r["name"] == "digits"}
    assert digits == {("1", "READY"), ("2", "UNAVAILABLE")}


def _slow_repository(root: Path, config: str = "") -> Path:
    onnx_models.save(onnx_models.slow(), root, "slow")
    (root / "slow" / "config.toml").write_text(config)
    return root


def _slow_request(base: str, results: list, index: int) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
    try:
        response = httpx.post(f"{base}/v2/models/slow/infer", json=body, timeout=60)
        results[index] = (response.status_code, response.headers, response.json())
    except httpx.HTTPError as exc:
        results[index] = exc


def test_overload_answers_503_with_retry_after(tmp_path: Path, start_server):
    repository = _slow_repository(tmp_path / "repo", "[batching]\nmax_queue_size = 1\n")
    live = start_server(repository, "--threads", "1")
    results: list = [None] * 4
    threads = [
        threading.Thread(target=_slow_request, args=(live.base, results, i)) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r[0] for r in results)
    assert statuses[0] == 200
    assert 503 in statuses
    refused = next(r for r in results if r[0] == 503)
    assert refused[1]["retry-after"] == "1"
    assert "already waiting for this model version" in refused[2]["error"]
    # Nothing was lost: every request was answered, and the next one is served.
    assert all(r[0] in (200, 503) for r in results)
    after: list = [None]
    _slow_request(live.base, after, 0)
    assert after[0][0] == 200
    np.testing.assert_allclose(after[0][2]["outputs"][0]["data"], [1.0], rtol=1e-4)


def test_a_request_past_its_timeout_gets_503_without_running(tmp_path: Path, start_server):
    live = start_server(_slow_repository(tmp_path / "repo"), "--threads", "1")
    results: list = [None]
    thread = threading.Thread(target=_slow_request, args=(live.base, results, 0))
    thread.start()
    time.sleep(0.3)  # the slow request (about a second) now holds the only thread
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
        "parameters": {"timeout": 100_000},
    }
    started = time.monotonic()
    response = live.client.post("/v2/models/slow/infer", json=body)
    waited = time.monotonic() - started
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": "the request waited its timeout of 100000 us without running"
    }
    assert waited < 0.5  # answered at its deadline, not when the thread came free
    thread.join()
    assert results[0][0] == 200
    assert live.client.get("/v2/health/ready").status_code == 200
    stats = live.client.get("/v2/models/slow/stats").json()["model_stats"][0]
    assert stats["execution_count"] == 1  # the timed-out request never ran
    assert stats["inference_stats"]["fail"]["count"] == 1


def test_graceful_shutdown_finishes_requests_in_flight(tmp_path: Path, start_server):
    live = start_server(_slow_repository(tmp_path / "repo"))
    results: list = [None]
    thread = threading.Thread(target=_slow_request, args=(live.base, results, 0))
    thread.start()
    # The request reaches the idle server within milliseconds; the model takes about
    # a second, so at this point it is being computed (checked below by the stats).
    time.sleep(0.4)
    stats = live.client.get("/v2/models/slow/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 0
    # uvicorn finishes its graceful shutdown, then re-raises SIGTERM so the exit status
    # tells process managers the truth.
    assert live.stop() == -signal.SIGTERM
    assert "Application shutdown complete" in live.log()
    thread.join()
    status, _, body = results[0]
    assert status == 200
    np.testing.assert_allclose(body["outputs"][0]["data"], [1.0], rtol=1e-4)


def test_slow_inference_does_not_block_the_event_loop(tmp_path: Path, start_server):
    live = start_server(_slow_repository(tmp_path / "repo"))
    results: list = [None]
    thread = threading.Thread(target=_slow_request, args=(live.base, results, 0))
    thread.start()
    time.sleep(0.3)  # the slow request (about a second) is now running on a pool thread
    started = time.monotonic()
    assert live.client.get("/v2/health/live").status_code == 200
    assert live.client.get("/v2/models/slow").status_code == 200
    answered_in = time.monotonic() - started
    thread.join()
    assert results[0][0] == 200
    assert live.client.get("/v2/health/ready").status_code == 200
    stats = live.client.get("/v2/models/slow/stats").json()["model_stats"][0]
    infer_seconds = stats["inference_stats"]["compute_infer"]["ns"] / 1e9
    assert answered_in < infer_seconds / 4
