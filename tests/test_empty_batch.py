"""A request of zero rows is answered the same way by every model: 200 and outputs of
zero rows of the declared datatypes and shapes, built from the metadata without a run
(see `runtime._empty_outputs`); or a 400 naming the output whose size only a run can
tell. Checked over JSON and binary, raw and through tritonclient."""

import re
import shutil
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from tests import onnx_models
from tests.conftest import MODELS, SHIPPED_ONLY, LiveServer
from tests.shipped import ONNX_TO_V2, SHIPPED, ShippedVersion, session, split_binary
from tidegate.protocol import DATATYPES


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shipped models and a model whose output size besides the batch is dynamic."""
    root = tmp_path_factory.mktemp("empty")
    shutil.copytree(MODELS, root / "models", ignore=SHIPPED_ONLY)
    onnx_models.save(onnx_models.identity("FP32", ["batch", "n"]), root / "models", "ragged")
    server = LiveServer(root / "models", log_path=root / "server.log")
    yield server
    server.stop()


def _path(shipped: ShippedVersion) -> str:
    return f"/v2/models/{shipped.model}/versions/{shipped.version}/infer"


def _empty_inputs(shipped: ShippedVersion, binary: bool) -> list[dict[str, object]]:
    inputs = []
    for arg in session(shipped.path).get_inputs():
        entry: dict[str, object] = {
            "name": arg.name,
            "datatype": ONNX_TO_V2[arg.type],
            "shape": [0, *arg.shape[1:]],
        }
        if binary:
            entry["parameters"] = {"binary_data_size": 0}
        else:
            entry["data"] = []
        inputs.append(entry)
    return inputs


def _expected(shipped: ShippedVersion) -> list[dict[str, object]]:
    """onnxruntime's own output metadata: the declared shape with 0 rows."""
    return [
        {"name": arg.name, "datatype": ONNX_TO_V2[arg.type], "shape": [0, *arg.shape[1:]]}
        for arg in session(shipped.path).get_outputs()
    ]


@pytest.mark.parametrize("shipped", SHIPPED, ids=str)
def test_every_shipped_model_answers_an_empty_batch_in_json(live: LiveServer, shipped):
    body = {"id": "empty", "inputs": _empty_inputs(shipped, binary=False)}
    response = live.client.post(_path(shipped), json=body)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["id"] == "empty"
    assert document["outputs"] == [{**o, "data": []} for o in _expected(shipped)]


@pytest.mark.parametrize("shipped", SHIPPED, ids=str)
def test_every_shipped_model_answers_an_empty_batch_in_binary(live: LiveServer, shipped):
    header = orjson.dumps(
        {
            "inputs": _empty_inputs(shipped, binary=True),
            "parameters": {"binary_data_output": True},
        }
    )
    response = live.client.post(
        _path(shipped),
        content=header,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    document, blobs = split_binary(response.content, length, "outputs")
    expected = [{**o, "parameters": {"binary_data_size": 0}} for o in _expected(shipped)]
    assert document["outputs"] == expected
    assert blobs == [b""] * len(expected)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("shipped", SHIPPED, ids=str)
def test_tritonclient_reads_empty_outputs(live: LiveServer, shipped, binary):
    triton = httpclient.InferenceServerClient(live.url)
    inputs = []
    for arg in session(shipped.path).get_inputs():
        datatype = ONNX_TO_V2[arg.type]
        empty = np.empty((0, *arg.shape[1:]), DATATYPES[datatype].numpy)
        infer_input = httpclient.InferInput(arg.name, list(empty.shape), datatype)
        infer_input.set_data_from_numpy(empty, binary_data=binary)
        inputs.append(infer_input)
    outputs = [
        httpclient.InferRequestedOutput(arg.name, binary_data=binary)
        for arg in session(shipped.path).get_outputs()
    ]
    result = triton.infer(
        shipped.model, inputs, model_version=str(shipped.version), outputs=outputs
    )
    for expected in _expected(shipped):
        array = result.as_numpy(str(expected["name"]))
        assert array is not None
        assert list(array.shape) == expected["shape"]
    triton.close()


def test_an_output_only_a_run_can_size_gets_a_named_400(live: LiveServer):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 3], "data": []}]}
    response = live.client.post("/v2/models/ragged/infer", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert "0 rows" in error
    assert "output 'y'" in error
    one_row = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert live.client.post("/v2/models/ragged/infer", json=one_row).json()["outputs"][0][
        "data"
    ] == [1, 2, 3]


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name}{{{labels}}} in /metrics"
    return float(match.group(1))


def test_empty_batches_count_as_requests_but_run_nothing_and_feed_no_drift(live: LiveServer):
    shipped = ShippedVersion("digits", 1)
    labels = 'model="digits",version="1"'  # as prometheus_client renders them: sorted
    success = 'model="digits",outcome="success",variant="stable",version="1"'

    def observe() -> tuple[float, ...]:
        metrics = live.client.get("/metrics").text
        drift = live.client.get("/v2/models/digits/versions/1/drift").json()
        return (
            _metric(metrics, "tidegate_inference_requests_total", success),
            _metric(metrics, "tidegate_inference_rows_total", labels),
            _metric(metrics, "tidegate_inference_runs_total", labels),
            drift["summary"]["window_rows"],
        )

    before = observe()
    body = {"inputs": _empty_inputs(shipped, binary=False)}
    for _ in range(3):
        assert live.client.post(_path(shipped), json=body).status_code == 200
    after = observe()
    assert after == (before[0] + 3, *before[1:])
    stats = live.client.get("/v2/models/digits/versions/1/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] == 0


@pytest.mark.parametrize("mode", ["split", "shadow"])
def test_an_empty_batch_under_a_canary_is_answered_and_not_judged(live: LiveServer, mode):
    """No rows, no evidence: the canary's windows and the shadow mirror skip it."""
    policy = {"stable": "1", "canary": "2", "weight": 100, "mode": mode}
    assert live.client.put("/v2/models/breast_cancer/traffic", json=policy).status_code == 200
    try:
        body = {"inputs": _empty_inputs(ShippedVersion("breast_cancer", 1), binary=False)}
        for _ in range(3):
            response = live.client.post("/v2/models/breast_cancer/infer", json=body)
            assert response.status_code == 200, response.text
        window = live.client.get("/v2/models/breast_cancer/traffic").json()["window"]
        assert window["stable"]["requests"] == window["canary"]["requests"] == 0
    finally:
        reset = {"stable": None, "canary": None, "weight": 0}
        assert live.client.put("/v2/models/breast_cancer/traffic", json=reset).status_code == 200


def test_the_server_log_has_no_traceback(live: LiveServer):
    # Runs last in this module: after every empty request above.
    assert "Traceback" not in live.log()
