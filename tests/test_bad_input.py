"""Every kind of bad request gets a 4xx JSON error naming the problem, never a 500,
and the server keeps serving correctly afterwards."""

import gzip
import struct

import numpy as np
import orjson
import pytest

from tests.conftest import LiveServer
from tests.shipped import ShippedVersion, expected_outputs, reference_rows

ROW = [0.5] * 30


def _input(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": ROW}
    return {**base, **fields}


def _body(*inputs: object, **extra: object) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def _binary(header: dict[str, object], blob: bytes) -> tuple[bytes, dict[str, str]]:
    json_part = orjson.dumps(header)
    return json_part + blob, {"Inference-Header-Content-Length": str(len(json_part))}


def _binary_text(blob: bytes) -> tuple[bytes, dict[str, str]]:
    """One BYTES element for dataset_topic's `text` input, as raw binary data."""
    text = {"name": "text", "datatype": "BYTES", "shape": [1, 1]}
    return _binary({"inputs": [{**text, "parameters": {"binary_data_size": len(blob)}}]}, blob)


FP32_ROW = np.full(30, 0.5, dtype=np.float32).tobytes()
BINARY_INPUT = {"name": "input", "datatype": "FP32", "shape": [1, 30]}

# (id, path, body, headers, status, words the error must contain)
CASES = [
    ("malformed-json", "breast_cancer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("body-not-object", "breast_cancer", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("no-inputs", "breast_cancer", b"{}", {}, 400, "'inputs'"),
    ("empty-inputs", "breast_cancer", _body(), {}, 400, "'inputs'"),
    ("unknown-input", "breast_cancer", _body(_input(name="x")), {}, 400, "unknown input 'x'"),
    ("twice", "breast_cancer", _body(_input(), _input()), {}, 400, "given twice"),
    (
        "wrong-datatype",
        "breast_cancer",
        _body(_input(datatype="FP64")),
        {},
        400,
        "input 'input': datatype 'FP64'",
    ),
    (
        "unsupported-datatype",
        "breast_cancer",
        _body(_input(datatype="BF16")),
        {},
        400,
        "not a datatype tidegate supports",
    ),
    (
        "data-length",
        "breast_cancer",
        _body(_input(data=ROW[:29])),
        {},
        400,
        "needs 30 elements, data has 29",
    ),
    ("wrong-dim", "breast_cancer", _body(_input(shape=[1, 31])), {}, 400, "does not fit"),
    ("wrong-rank", "breast_cancer", _body(_input(shape=[30])), {}, 400, "does not fit"),
    ("negative-dim", "breast_cancer", _body(_input(shape=[-1, 30])), {}, 400, "non-negative"),
    ("strings-as-floats", "breast_cancer", _body(_input(data=["1"] * 30)), {}, 400, "not FP32"),
    ("bools-as-floats", "breast_cancer", _body(_input(data=[True] * 30)), {}, 400, "not FP32"),
    ("null-element", "breast_cancer", _body(_input(data=[None] * 30)), {}, 400, "not FP32"),
    (
        "ragged",
        "breast_cancer",
        _body(_input(shape=[2, 30], data=[ROW, ROW[:5]])),
        {},
        400,
        "not a regular array",
    ),
    ("data-not-list", "breast_cancer", _body(_input(data=5)), {}, 400, "must be a JSON array"),
    (
        "no-data",
        "breast_cancer",
        _body({"name": "input", "datatype": "FP32", "shape": [1, 30]}),
        {},
        400,
        "neither 'data' nor binary_data_size",
    ),
    (
        "over-max-batch",
        "breast_cancer",
        _body(_input(shape=[257, 30], data=ROW * 257)),
        {},
        400,
        "max_batch_size 256",
    ),
    (
        "unknown-output",
        "breast_cancer",
        _body(_input(), outputs=[{"name": "nope"}]),
        {},
        400,
        "unknown output 'nope'",
    ),
    (
        "classification",
        "breast_cancer",
        _body(_input(), outputs=[{"name": "label", "parameters": {"classification": 2}}]),
        {},
        400,
        "classification",
    ),
    (
        "binary-size-mismatch",
        "breast_cancer",
        *_binary(
            {"inputs": [{**BINARY_INPUT, "parameters": {"binary_data_size": 100}}]}, b"\0" * 100
        ),
        400,
        "binary_data_size 100 but shape [1, 30] of FP32 needs 120 bytes",
    ),
    (
        "binary-short-body",
        "breast_cancer",
        *_binary(
            {"inputs": [{**BINARY_INPUT, "parameters": {"binary_data_size": 120}}]}, FP32_ROW[:60]
        ),
        400,
        "runs past the end of the body",
    ),
    (
        "binary-extra-bytes",
        "breast_cancer",
        *_binary(
            {"inputs": [{**BINARY_INPUT, "parameters": {"binary_data_size": 120}}]},
            FP32_ROW + b"junk",
        ),
        400,
        "bytes of binary data but the inputs declare 120",
    ),
    (
        "binary-and-data",
        "breast_cancer",
        *_binary(
            {"inputs": [{**_input(), "parameters": {"binary_data_size": 120}}]},
            FP32_ROW,
        ),
        400,
        "both 'data' and binary_data_size",
    ),
    (
        "header-length-too-big",
        "breast_cancer",
        _body(_input()),
        {"Inference-Header-Content-Length": "999999"},
        400,
        "Inference-Header-Content-Length 999999",
    ),
    (
        "header-length-not-number",
        "breast_cancer",
        _body(_input()),
        {"Inference-Header-Content-Length": "ten"},
        400,
        "not a byte count",
    ),
    (
        "bytes-binary-truncated",
        "dataset_topic",
        *_binary_text(struct.pack("<I", 10) + b"ab"),
        400,
        "element 0 overruns",
    ),
    (
        "bytes-not-utf8",
        "dataset_topic",
        *_binary_text(struct.pack("<I", 2) + b"\xff\xfe"),
        400,
        "not UTF-8",
    ),
    (
        "bytes-json-number",
        "dataset_topic",
        _body({"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [5]}),
        {},
        400,
        "BYTES data must be strings",
    ),
    (
        "unknown-encoding",
        "breast_cancer",
        _body(_input()),
        {"Content-Encoding": "br"},
        400,
        "Content-Encoding 'br'",
    ),
    (
        "bad-gzip",
        "breast_cancer",
        b"not gzip at all",
        {"Content-Encoding": "gzip"},
        400,
        "not valid gzip",
    ),
    (
        "negative-timeout",
        "breast_cancer",
        _body(_input(), parameters={"timeout": -5}),
        {},
        400,
        "parameter 'timeout' must be a number of microseconds, not -5",
    ),
    (
        "text-timeout",
        "breast_cancer",
        _body(_input(), parameters={"timeout": "1s"}),
        {},
        400,
        "parameter 'timeout'",
    ),
    ("unknown-model", "no_such_model", _body(_input()), {}, 404, "model 'no_such_model'"),
    ("unknown-version", "breast_cancer/versions/9", _body(_input()), {}, 404, "version '9'"),
    ("non-numeric-version", "breast_cancer/versions/abc", _body(_input()), {}, 404, "'abc'"),
    # Found by tests/test_fuzz.py: each was a 500 before.
    ("superscript-version", "breast_cancer/versions/%C2%B2", _body(_input()), {}, 404, "'²'"),
    ("huge-version", "breast_cancer/versions/" + "1" * 4301, _body(_input()), {}, 404, "version"),
    (
        "unhashable-datatype",
        "breast_cancer",
        _body(_input(datatype=[])),
        {},
        400,
        "datatype [] (not a datatype tidegate supports)",
    ),
    (
        "unhashable-output-name",
        "breast_cancer",
        _body(_input(), outputs=[{"name": {}}]),
        {},
        400,
        "unknown output {}",
    ),
    (
        "huge-header-length",
        "breast_cancer",
        b"{}",
        {"Inference-Header-Content-Length": "1" * 4301},
        400,
        "is not a byte count",
    ),
    (
        "bytes-count-beyond-data",
        "dataset_topic",
        *_binary(
            {
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [2**31, 1],
                        "parameters": {"binary_data_size": 0},
                    }
                ]
            },
            b"",
        ),
        400,
        "cannot hold 2147483648 elements",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_request_gets_a_named_error(server: LiveServer, path, body, headers, status, words):
    response = server.client.post(f"/v2/models/{path}/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]


def test_server_keeps_serving_after_bad_requests(server: LiveServer):
    before = server.client.get("/v2/models/breast_cancer/versions/2/stats").json()
    for _, path, body, headers, _, _ in CASES:
        server.client.post(f"/v2/models/{path}/infer", content=body, headers=headers)
    after = server.client.get("/v2/models/breast_cancer/versions/2/stats").json()
    failed = [c for c in CASES if c[1] == "breast_cancer"]
    fails = [s["model_stats"][0]["inference_stats"]["fail"]["count"] for s in (before, after)]
    assert fails[1] - fails[0] == len(failed)

    assert server.client.get("/v2/health/ready").status_code == 200
    shipped = ShippedVersion("breast_cancer", 2)
    feeds = reference_rows(shipped, 2)
    body = _body(_input(shape=[2, 30], data=feeds["input"].ravel().tolist()))
    response = server.client.post("/v2/models/breast_cancer/infer", content=body)
    assert response.status_code == 200
    probabilities = response.json()["outputs"][1]["data"]
    np.testing.assert_allclose(
        probabilities, expected_outputs(shipped, feeds)["probabilities"].ravel(), rtol=1e-5
    )


def test_gzip_request_body_is_accepted(server: LiveServer):
    body = gzip.compress(_body(_input()))
    response = server.client.post(
        "/v2/models/breast_cancer/infer", content=body, headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["tidegate-model-version"] == "2"


def test_nested_json_data_is_accepted(server: LiveServer):
    shipped = ShippedVersion("breast_cancer", 1)
    feeds = reference_rows(shipped, 3)
    body = _body(_input(shape=[3, 30], data=feeds["input"].tolist()))
    response = server.client.post("/v2/models/breast_cancer/versions/1/infer", content=body)
    assert response.status_code == 200
    labels = response.json()["outputs"][0]["data"]
    assert labels == expected_outputs(shipped, feeds)["label"].tolist()


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", "/v2/nowhere", 404, "no endpoint GET /v2/nowhere"),
        ("GET", "/v2/models/breast_cancer/infer", 405, "GET is not allowed"),
        ("GET", "/v2/models/no_such_model", 404, "model 'no_such_model' is not loaded"),
        ("GET", "/v2/models/no_such_model/ready", 404, "no_such_model"),
        ("GET", "/v2/models/breast_cancer/versions/7/config", 404, "version '7'"),
        ("GET", "/v2/models/no_such_model/stats", 404, "no_such_model"),
        ("GET", "/v2/audit?limit=%C2%B2", 400, "'limit'"),
        ("POST", "/v2/repository/models/" + "a" * 256 + "/load", 404, "is not in the repository"),
    ],
)
def test_unknown_paths_get_json_errors(server: LiveServer, method, path, status, words):
    response = server.client.request(method, path)
    assert response.status_code == status
    assert words in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v2/repository/index", b"{", "not valid JSON"),
        ("/v2/repository/index", b"[]", "must be a JSON object"),
        ("/v2/repository/models/digits/load", b'{"parameters": 3}', "'parameters'"),
        (
            "/v2/repository/models/digits/load",
            b'{"parameters": {"config": "{}"}}',
            "parameter 'config' is not supported",
        ),
        (
            "/v2/repository/models/digits/load",
            b'{"parameters": {"version": [1]}}',
            "parameter 'version'",
        ),
        ("/v2/models/digits/rollout", '{"version": "²"}'.encode(), "'version' must be"),
    ],
)
def test_bad_control_requests(server: LiveServer, path, body, words):
    response = server.client.post(path, content=body)
    assert response.status_code == 400
    assert words in response.json()["error"]
