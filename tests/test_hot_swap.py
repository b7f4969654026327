"""Hot swaps under load: 20 swaps while 16 clients send requests without pause.

Versions alternate between two different models (breast_cancer's logistic
regression and gradient boosting), so every answer can be checked against
onnxruntime for the version that says it answered."""

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, expected_outputs, json_request, reference_rows

SWAPS = 20
CLIENTS = 16
SOURCES = {1: ShippedVersion("breast_cancer", 1), 0: ShippedVersion("breast_cancer", 2)}


def _source(version: int) -> ShippedVersion:
    """Odd versions are the logistic regression, even ones the gradient boosting."""
    return SOURCES[version % 2]


def _add_version(repository: Path, version: int) -> None:
    shutil.copytree(_source(version).path.parent, repository / "swap" / str(version))


@pytest.fixture
def swap_repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    (repository / "swap").mkdir(parents=True)
    _add_version(repository, 1)
    return repository


def _body(rows: dict[str, np.ndarray]) -> dict:
    return json_request("input", "FP32", rows["input"])


def test_twenty_swaps_under_load_lose_nothing(swap_repository: Path, start_server):
    live: LiveServer = start_server(swap_repository)
    row_sets = [reference_rows(SOURCES[1], 3, start=3 * i) for i in range(CLIENTS)]
    expected = {
        (i, kind): expected_outputs(source, rows)["probabilities"]
        for i, rows in enumerate(row_sets)
        for kind, source in SOURCES.items()
    }
    records: list[list[tuple[float, int, str, list]]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    stop = threading.Event()

    def client(index: int) -> None:
        body = _body(row_sets[index])
        with httpx.Client(base_url=live.base, timeout=30) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post("/v2/models/swap/infer", json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                    continue
                outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
                version = response.headers["tidegate-model-version"]
                records[index].append(
                    (sent, response.status_code, version, outputs["probabilities"])
                )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    load_returned: dict[int, float] = {1: 0.0}
    try:
        time.sleep(0.3)
        for new in range(2, SWAPS + 2):
            _add_version(swap_repository, new)
            load = live.client.post(
                "/v2/repository/models/swap/load", json={"parameters": {"version": str(new)}}
            )
            assert load.status_code == 200, load.text
            load_returned[new] = time.monotonic()
            unload = live.client.post(
                "/v2/repository/models/swap/unload",
                json={"parameters": {"version": str(new - 1)}},
            )
            assert unload.status_code == 200, unload.text
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert failures == []
    answered = [r for per_client in records for r in per_client]
    assert len(answered) > 20 * CLIENTS
    versions_seen = {int(version) for _, _, version, _ in answered}
    assert len(versions_seen) > SWAPS // 2  # traffic really flowed across the swaps
    for index, per_client in enumerate(records):
        for sent, _, version, probabilities in per_client:
            served = int(version)
            want = expected[(index, served % 2)]
            np.testing.assert_allclose(np.reshape(probabilities, want.shape), want, rtol=1e-5)
            # Sent after version k's load returned: answered by version k or newer.
            newest_loaded = max(v for v, at in load_returned.items() if at <= sent)
            assert served >= newest_loaded, (sent, served, newest_loaded)
    stats = live.client.get("/v2/models/swap/stats").json()["model_stats"]
    assert [s["version"] for s in stats] == [str(SWAPS + 1)]
    assert stats[0]["inference_stats"]["fail"]["count"] == 0


def test_unload_last_version_then_load_again(swap_repository: Path, start_server):
    live: LiveServer = start_server(swap_repository)
    rows = reference_rows(SOURCES[1], 2)
    post = live.client.post
    response = post("/v2/repository/models/swap/unload", json={"parameters": {"version": "1"}})
    assert response.status_code == 200
    refused = post("/v2/models/swap/infer", json=_body(rows))
    assert refused.status_code == 404
    assert "model 'swap' is not loaded" in refused.json()["error"]
    assert live.client.get("/v2/models/swap/ready").status_code == 404
    assert live.client.get("/v2/health/ready").status_code == 200
    assert post("/v2/repository/models/swap/load").status_code == 200
    served = post("/v2/models/swap/infer", json=_body(rows))
    assert served.status_code == 200
    want = expected_outputs(SOURCES[1], rows)["probabilities"]
    np.testing.assert_allclose(
        np.reshape(served.json()["outputs"][1]["data"], want.shape), want, rtol=1e-5
    )
