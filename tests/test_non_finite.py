"""NaN and infinities in JSON, both ways, as Triton writes and reads them: bare NaN,
Infinity and -Infinity tokens (rapidjson's kWriteNanAndInfFlag and
kParseNanAndInfFlag), never null. Read back by tritonclient and by Python's json."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests import onnx_models
from tests.conftest import LiveServer
from tidegate.protocol import DATATYPES

FLOATS = ["FP16", "FP32", "FP64"]
FINITE_INPUT = [[1.0, 0.0, -1.0]]  # ln: 0, -inf, NaN; 1 / x: 1, inf, -1


def _raw_body(token: str) -> bytes:
    """An FP32 request whose second value is `token`, as written, not as JSON allows."""
    entry = '{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.5, ' + token + ", 2]}"
    return ('{"inputs": [' + entry + "]}").encode()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("non_finite")
    for datatype in FLOATS:
        model = onnx_models.log_and_reciprocal(datatype)
        onnx_models.save(model, root / "models", f"log_{datatype.lower()}")
        onnx_models.save(onnx_models.identity(datatype), root / "models", f"id_{datatype.lower()}")
    refusing = onnx_models.save(onnx_models.identity("FP32"), root / "models", "refuses_nan")
    (refusing.parent.parent / "config.toml").write_text("[validation]\nreject_nan = true\n")
    server = LiveServer(root / "models", log_path=root / "server.log")
    yield server
    server.stop()


def _request(datatype: str, data: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 3], "data": data}]}


@pytest.mark.parametrize("datatype", FLOATS)
def test_non_finite_outputs_are_written_as_tokens(live: LiveServer, datatype):
    response = live.client.post(
        f"/v2/models/log_{datatype.lower()}/infer", json=_request(datatype, FINITE_INPUT)
    )
    assert response.status_code == 200, response.text
    assert b"null" not in response.content
    assert b'"data":[0.0,-Infinity,NaN]' in response.content
    assert b'"data":[1.0,Infinity,-1.0]' in response.content
    outputs = {o["name"]: o["data"] for o in json.loads(response.content)["outputs"]}
    np.testing.assert_array_equal(outputs["log"], [0.0, -np.inf, np.nan])
    np.testing.assert_array_equal(outputs["inverse"], [1.0, np.inf, -1.0])


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("datatype", FLOATS)
def test_tritonclient_reads_nan_and_infinity_back(live: LiveServer, datatype, binary_in):
    triton = httpclient.InferenceServerClient(live.url)
    dtype = DATATYPES[datatype].numpy
    values = np.array([[np.nan, np.inf, -np.inf]], dtype=dtype)
    infer_input = httpclient.InferInput("x", [1, 3], datatype)
    infer_input.set_data_from_numpy(values, binary_data=binary_in)
    output = httpclient.InferRequestedOutput("y", binary_data=False)
    result = triton.infer(f"id_{datatype.lower()}", [infer_input], outputs=[output])
    got = result.as_numpy("y")
    assert got is not None
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, values)

    computed = triton.infer(
        f"log_{datatype.lower()}",
        [_finite_input(datatype, dtype)],
        outputs=[httpclient.InferRequestedOutput(n, binary_data=False) for n in ("log", "inverse")],
    )
    np.testing.assert_array_equal(computed.as_numpy("log"), np.array([[0, -np.inf, np.nan]], dtype))
    np.testing.assert_array_equal(computed.as_numpy("inverse"), np.array([[1, np.inf, -1]], dtype))
    triton.close()


def _finite_input(datatype: str, dtype: np.dtype) -> httpclient.InferInput:
    infer_input = httpclient.InferInput("x", [1, 3], datatype)
    infer_input.set_data_from_numpy(np.array(FINITE_INPUT, dtype=dtype), binary_data=False)
    return infer_input


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_json_inputs_may_carry_the_tokens(live: LiveServer, token):
    body = _raw_body(token)
    response = live.client.post("/v2/models/id_fp32/infer", content=body)
    assert response.status_code == 200, response.text
    assert f'"data":[1.5,{token},2.0]'.encode() in response.content

    refused = live.client.post("/v2/models/refuses_nan/infer", content=body)
    assert refused.status_code == 400
    assert refused.json()["error"] == "input 'x' contains NaN or infinity, which this model refuses"


def test_lowercase_and_short_forms_stay_invalid_json(live: LiveServer):
    for token in ("nan", "inf", "Inf", "-inf"):
        response = live.client.post("/v2/models/id_fp32/infer", content=_raw_body(token))
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]
    assert live.client.get("/v2/health/ready").status_code == 200
    log = Path(live.log_path).read_text()
    assert "Traceback" not in log
    assert "drift observation failed" not in log  # NaN and infinities are counted, not fatal
