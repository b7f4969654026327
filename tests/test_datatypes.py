"""Every V2 datatype, several inputs, and run-time failures, through a live server."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as httpclient

from tests import onnx_models
from tests.conftest import LiveServer

DATATYPES = list(onnx_models.V2_TO_ONNX)
SAMPLES = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 7, 255], [1, 2, 3]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535], [1, 2, 3]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1], [1, 2, 3]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1], [1, 2, 3]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [1, -2, 3]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767], [1, -2, 3]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [1, -2, 3]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [1, -2, 3]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504], [1e-3, 2, 3]], dtype=np.float16),
    "FP32": np.array([[0.1, -1.5, 3.4e38], [1e-30, 2, 3]], dtype=np.float32),
    "FP64": np.array([[0.1, -1.5, 1e300], [1e-300, 2, 3]], dtype=np.float64),
    "BYTES": np.array([[b"a", b"", "caf\u00e9".encode()], [b"x y", b"\x00z", b"q"]], dtype=object),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datatypes") / "models"
    for datatype in DATATYPES:
        onnx_models.save(onnx_models.identity(datatype), root, f"identity_{datatype.lower()}")
    onnx_models.save(onnx_models.two_inputs(), root, "two_inputs")
    onnx_models.save(onnx_models.gather(), root, "gather")
    onnx_models.save(onnx_models.identity("FP32", [2, 2]), root, "fixed_shape")
    onnx_models.save(onnx_models.identity("FP32"), root, "picky")
    (root / "picky" / "config.toml").write_text("[validation]\nreject_nan = true\n")
    return root


@pytest.fixture(scope="module")
def live(repository: Path) -> Iterator[LiveServer]:
    server = LiveServer(repository, log_path=repository.parent / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def triton(live: LiveServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(live.url)


def _direct(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(triton, repository, datatype, binary):
    sample = SAMPLES[datatype]
    name = f"identity_{datatype.lower()}"
    meta = triton.get_model_metadata(name)
    assert meta["inputs"] == [{"name": "x", "datatype": datatype, "shape": [-1, 3]}]
    infer_input = httpclient.InferInput("x", list(sample.shape), datatype)
    infer_input.set_data_from_numpy(sample, binary_data=binary)
    result = triton.infer(
        name, [infer_input], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)]
    )
    got = result.as_numpy("y")
    feed = np.vectorize(bytes.decode, otypes=[object])(sample) if datatype == "BYTES" else sample
    (expected,) = _direct(repository / name / "1" / "model.onnx", {"x": feed})
    if datatype == "BYTES":
        got = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(
            got
        )
        assert got.tolist() == expected.tolist()
    else:
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_several_inputs(triton, repository):
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.full((3, 2), 0.25, dtype=np.float32)
    c = np.array([[1], [2], [3]], dtype=np.int64)
    inputs = []
    for name, array, datatype in (("a", a, "FP32"), ("b", b, "FP32"), ("c", c, "INT64")):
        infer_input = httpclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=name != "b")
        inputs.append(infer_input)
    result = triton.infer("two_inputs", inputs)
    total, count = _direct(repository / "two_inputs" / "1" / "model.onnx", {"a": a, "b": b, "c": c})
    np.testing.assert_array_equal(result.as_numpy("sum"), total)
    np.testing.assert_array_equal(result.as_numpy("count"), count)


def _post(live: LiveServer, model: str, inputs: list[dict]) -> tuple[int, dict]:
    response = live.client.post(f"/v2/models/{model}/infer", json={"inputs": inputs})
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("model", "inputs", "words"),
    [
        (
            "two_inputs",
            [
                {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
                {"name": "c", "datatype": "INT64", "shape": [1, 1], "data": [1]},
            ],
            "missing input 'b'",
        ),
        (
            "two_inputs",
            [
                {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
                {"name": "b", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]},
                {"name": "c", "datatype": "INT64", "shape": [1, 1], "data": [1]},
            ],
            "disagree on the batch size",
        ),
        (
            "identity_int8",
            [{"name": "x", "datatype": "INT8", "shape": [1, 3], "data": [1, 2, 300]}],
            "out of range for INT8",
        ),
        (
            "identity_uint64",
            [{"name": "x", "datatype": "UINT64", "shape": [1, 3], "data": [1, -2, 2**64 - 1]}],
            "out of range for UINT64",
        ),
        (
            "identity_int32",
            [{"name": "x", "datatype": "INT32", "shape": [1, 3], "data": [1, 2.5, 3]}],
            "not INT32",
        ),
        (
            "identity_bool",
            [{"name": "x", "datatype": "BOOL", "shape": [1, 3], "data": [1, 0, 1]}],
            "not BOOL",
        ),
        (
            "gather",
            [{"name": "index", "datatype": "INT64", "shape": [2], "data": [1, 99]}],
            "could not run on this input",
        ),
        (
            "fixed_shape",
            [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": [0] * 6}],
            "does not fit the model's shape [2, 2]",
        ),
    ],
)
def test_bad_values_are_named(live, model, inputs, words):
    status, body = _post(live, model, inputs)
    assert status == 400
    assert words in body["error"]


def test_nan_is_refused_only_where_configured(live):
    row = np.array([[1.0, np.nan, 2.0]], dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 3],
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    )
    headers = {"Inference-Header-Content-Length": str(len(header))}
    refused = live.client.post(
        "/v2/models/picky/infer", content=header + row.tobytes(), headers=headers
    )
    assert refused.status_code == 400
    assert "input 'x' contains NaN" in refused.json()["error"]
    passed = live.client.post(
        "/v2/models/identity_fp32/infer", content=header + row.tobytes(), headers=headers
    )
    assert passed.status_code == 200
    assert b'"data":[1.0,NaN,2.0]' in passed.content  # Triton's token, not null
    np.testing.assert_array_equal(passed.json()["outputs"][0]["data"], row.ravel())


def test_model_without_batch_axis(triton, live):
    config = triton.get_model_config("fixed_shape")
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [2, 2]
    status, body = _post(
        live,
        "fixed_shape",
        [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}],
    )
    assert status == 200
    assert body["outputs"][0]["data"] == [1, 2, 3, 4]
