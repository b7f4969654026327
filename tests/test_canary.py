"""Canary traffic against a live server: the split's accuracy, sticky routing keys,
shadow mirroring compared with onnxruntime run offline, and the traffic API's errors."""

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer
from tests.shipped import (
    ShippedVersion,
    assert_same_output,
    expected_outputs,
    json_request,
    reference_rows,
)
from tidegate import bench as runner
from tidegate.loadgen import Plan, Target

STABLE = ShippedVersion("wine", 1)
GOOD = ShippedVersion("wine", 2)
BAD = ShippedVersion("wine", 3)


def _wine_request(rows: int = 4, start: int = 0) -> dict[str, object]:
    feeds = reference_rows(STABLE, rows, start)
    return json_request("input", "FP32", feeds["input"])


@pytest.fixture
def live(models_dir: Path, tmp_path: Path, start_server) -> LiveServer:
    server: LiveServer = start_server(models_dir, "--state-dir", str(tmp_path / "state"))
    for version in ("2", "3"):
        loaded = server.client.post(
            "/v2/repository/models/wine/load", json={"parameters": {"version": version}}
        )
        assert loaded.status_code == 200, loaded.text
    # Loaded beside it, the candidates would answer (the highest version does): keep 1.
    assert _put(server, stable="1").status_code == 200
    return server


def _put(server: LiveServer, **policy: object) -> httpx.Response:
    return server.client.put("/v2/models/wine/traffic", json=policy)


def _served(server: LiveServer, version: str) -> int:
    stats = server.client.get(f"/v2/models/wine/versions/{version}/stats").json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def test_keyless_share_matches_the_weight(live: LiveServer):
    assert _put(live, canary="2", weight=10).status_code == 200
    target = Target.parse(live.url)
    prepared = runner.prepare(target, "wine", None, "random", 2, binary=True)
    result = runner.run(target, "wine", None, prepared, Plan(concurrency=8, max_requests=20_000))
    assert result.tally.ok == 20_000
    stable, canary = _served(live, "1"), _served(live, "2")
    assert stable + canary == 20_000
    # Binomial(20,000, 0.1): sd 0.21 %, so +-1 % is over 4.7 sd.
    assert canary / 20_000 == pytest.approx(0.10, abs=0.01)
    window = live.client.get("/v2/models/wine/traffic").json()["window"]
    assert window["split"] == {"stable": stable, "canary": canary}
    assert window["canary"]["requests"] == canary
    assert window["stable"]["requests"] == stable


def _versions_by_key(server: LiveServer, keys: list[str], as_header: bool) -> dict[str, str]:
    seen = {}
    for key in keys:
        body = _wine_request(1)
        headers = {}
        if as_header:
            headers["tidegate-routing-key"] = key
        else:
            body["parameters"] = {"routing_key": key}
        response = server.client.post("/v2/models/wine/infer", json=body, headers=headers)
        assert response.status_code == 200, response.text
        version = response.headers["tidegate-model-version"]
        assert response.json()["model_version"] == version
        variant = response.headers["tidegate-variant"]
        assert variant == ("canary" if version == "2" else "stable")
        seen[key] = version
    return seen


def test_a_key_keeps_its_version_and_a_higher_weight_only_moves_keys_to_the_canary(
    live: LiveServer,
):
    keys = [f"customer-{i}" for i in range(300)]
    assert _put(live, canary="2", weight=20).status_code == 200
    first = _versions_by_key(live, keys, as_header=True)
    assert _versions_by_key(live, keys, as_header=True) == first
    # The parameter and the header are the same key.
    assert _versions_by_key(live, keys, as_header=False) == first
    assert 0.12 < sum(v == "2" for v in first.values()) / len(keys) < 0.28
    assert _put(live, weight=60).status_code == 200
    raised = _versions_by_key(live, keys, as_header=True)
    assert all(raised[key] == "2" for key, version in first.items() if version == "2")
    assert sum(v == "2" for v in raised.values()) > sum(v == "2" for v in first.values())


def test_an_explicit_version_bypasses_the_split(live: LiveServer):
    assert _put(live, canary="2", weight=100).status_code == 200
    for version, variant in (("1", "stable"), ("2", "canary"), ("3", "other")):
        response = live.client.post(
            f"/v2/models/wine/versions/{version}/infer", json=_wine_request()
        )
        assert response.headers["tidegate-model-version"] == version
        assert response.headers["tidegate-variant"] == variant


def test_shadow_answers_with_stable_and_compares_like_an_offline_run(live: LiveServer):
    assert _put(live, canary="3", weight=100, mode="shadow").status_code == 200
    offline_rows = offline_disagreeing = 0
    for start in range(0, 120, 8):
        feeds = reference_rows(STABLE, 8, start)
        response = live.client.post("/v2/models/wine/infer", json=_wine_request(8, start))
        assert response.headers["tidegate-model-version"] == "1"
        assert response.headers["tidegate-variant"] == "stable"
        expected = expected_outputs(STABLE, feeds)
        for output in response.json()["outputs"]:
            got = np.asarray(output["data"]).reshape(output["shape"])
            assert_same_output(got.astype(expected[output["name"]].dtype), expected[output["name"]])
        stable_labels = expected["label"]
        bad_labels = expected_outputs(BAD, feeds)["label"]
        offline_rows += len(stable_labels)
        offline_disagreeing += int((stable_labels != bad_labels).sum())
    assert offline_disagreeing > 0  # version 3 is the bad one: they must differ somewhere
    shadow = _wait_for_shadow(live, offline_rows)
    assert shadow["mirrored"] == 15
    assert shadow["dropped"] == 0
    assert shadow["disagreeing"] == offline_disagreeing


def _wait_for_shadow(server: LiveServer, rows: int) -> dict[str, int]:
    for _ in range(200):
        shadow = server.client.get("/v2/models/wine/traffic").json()["window"]["shadow"]
        if shadow["rows"] >= rows:
            return shadow
        time.sleep(0.02)
    raise AssertionError(f"the mirror compared {shadow['rows']} rows, not {rows}")


BAD_POLICIES = [
    ({"weight": 10}, 400, "needs a canary"),
    ({"canary": "9", "weight": 10}, 404, "canary version 9"),
    ({"canary": "2", "weight": 101}, 400, "'weight' must be between 0 and 100"),
    ({"canary": "2", "weight": "ten"}, 400, "'weight' must be a number"),
    ({"canary": "2", "mode": "mirror"}, 400, "'mode' must be one of"),
    ({"canary": "1"}, 400, "both stable and canary"),
    ({"canary": "x"}, 400, "'canary' must be a version number"),
    ({"colour": "blue"}, 400, "unknown traffic field 'colour'"),
]


def test_bad_traffic_policies_are_refused_by_name(live: LiveServer):
    for policy, status, words in BAD_POLICIES:
        response = _put(live, stable="1", **policy)
        assert response.status_code == status, policy
        assert words in response.json()["error"]
        assert live.client.get("/v2/models/wine/traffic").json()["canary"] is None
        assert live.client.post("/v2/models/wine/infer", json=_wine_request()).status_code == 200


def test_clearing_the_canary_sends_everything_to_stable(live: LiveServer):
    assert _put(live, canary="2", weight=100).status_code == 200
    response = live.client.post("/v2/models/wine/infer", json=_wine_request())
    assert response.headers["tidegate-model-version"] == "2"
    cleared = _put(live, canary=None, weight=0)
    assert cleared.status_code == 200
    assert cleared.json()["canary"] is None
    response = live.client.post("/v2/models/wine/infer", json=_wine_request())
    assert response.headers["tidegate-model-version"] == "1"


def test_a_pinned_stable_serves_although_a_higher_version_is_loaded(live: LiveServer):
    # wine 3 is loaded and highest; without a pinned stable it answers.
    assert _put(live, stable=None).status_code == 200
    assert (
        live.client.post("/v2/models/wine/infer", json=_wine_request()).headers[
            "tidegate-model-version"
        ]
        == "3"
    )
    assert _put(live, stable="1").status_code == 200
    assert (
        live.client.post("/v2/models/wine/infer", json=_wine_request()).headers[
            "tidegate-model-version"
        ]
        == "1"
    )


def test_a_canary_that_is_the_implied_stable_is_refused(live: LiveServer):
    assert _put(live, stable=None).status_code == 200  # stable: the highest, version 3
    response = _put(live, canary="3", weight=10)
    assert response.status_code == 400
    assert "both stable and canary" in response.json()["error"]
    pinned = _put(live, canary="2", weight=10).json()
    assert (pinned["stable"], pinned["canary"]) == ("3", "2")


def test_a_regressors_predictions_are_counted_in_bins_of_stables_reference_outputs(
    models_dir: Path, tmp_path: Path, start_server
):
    shutil.copytree(models_dir / "diabetes" / "1", models_dir / "diabetes" / "2")
    (models_dir / "diabetes" / "config.toml").write_text('[versions]\npolicy = "all"\n')
    server: LiveServer = start_server(models_dir, "--state-dir", str(tmp_path / "state"))
    policy = {"stable": "1", "canary": "2", "weight": 50}
    assert server.client.put("/v2/models/diabetes/traffic", json=policy).status_code == 200
    diabetes = ShippedVersion("diabetes", 1)
    reference = reference_rows(diabetes, 10_000)["input"]  # all of reference.npz
    sent = reference[:120]
    for start in range(0, len(sent), 4):
        body = json_request(
            "input", "FP64" if sent.dtype == np.float64 else "FP32", sent[start : start + 4]
        )
        assert server.client.post("/v2/models/diabetes/infer", json=body).status_code == 200
    # Offline: 16 equal-mass bins of the model's outputs on its reference data.
    (name,) = expected_outputs(diabetes, {"input": reference}).keys()
    edges = np.quantile(
        expected_outputs(diabetes, {"input": reference})[name][:, 0], np.linspace(0, 1, 17)[1:-1]
    )
    offline = np.searchsorted(
        edges, expected_outputs(diabetes, {"input": sent})[name][:, 0], side="right"
    )
    window = server.client.get("/v2/models/diabetes/traffic").json()["window"]
    served: dict[str, int] = {}
    for side in ("stable", "canary"):
        for label, count in window[side]["predictions"].items():
            served[label] = served.get(label, 0) + count
    values, counts = np.unique(offline, return_counts=True)
    assert served == {f"bin {v}": int(c) for v, c in zip(values, counts, strict=True)}
