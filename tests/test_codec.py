"""The wire codec on its own: no server, no onnxruntime."""

import json
import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from tests.shipped import split_binary
from tidegate.codec import decode_request, encode_response
from tidegate.errors import BadRequest
from tidegate.protocol import DATATYPES, ModelMetadata, TensorSpec

FIXED = [name for name in DATATYPES if name != "BYTES"]


def _meta(datatype: str, shape: tuple[int, ...] = (-1, 3)) -> ModelMetadata:
    spec = DATATYPES[datatype]
    return ModelMetadata(
        inputs=(TensorSpec("x", spec, shape),), outputs=(TensorSpec("y", spec, shape),)
    )


def _binary_request(array: np.ndarray, datatype: str, **extra: object) -> tuple[bytes, int]:
    if datatype == "BYTES":
        blob = b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    else:
        blob = array.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            **extra,
        }
    )
    return header + blob, len(header)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(FIXED))
def test_binary_round_trip_is_exact(data, datatype):
    dtype = DATATYPES[datatype].numpy
    array = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=2, max_dims=2, max_side=20)))
    meta = _meta(datatype, (-1, array.shape[1]))
    body, header_length = _binary_request(array, datatype, parameters={"binary_data_output": True})

    request = decode_request(body, header_length, meta)

    decoded = request.inputs["x"]
    assert decoded.dtype == dtype
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()  # bit-exact, NaN payloads included
    assert not decoded.flags.owndata  # a view on the request body, not a copy
    response, json_length = encode_response("m", "1", request, {"y": decoded}, meta)
    assert json_length is not None
    document, blobs = split_binary(response, json_length, "outputs")
    assert document["outputs"][0]["shape"] == list(array.shape)
    assert blobs == [array.tobytes()]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), datatype=st.sampled_from([d for d in FIXED if d not in ("FP16",)]))
def test_json_round_trip_is_exact(data, datatype):
    dtype = DATATYPES[datatype].numpy
    elements = (
        st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
        if dtype.kind == "f"
        else None
    )
    array = data.draw(
        hnp.arrays(dtype, hnp.array_shapes(min_dims=2, max_dims=2, max_side=20), elements=elements)
    )
    meta = _meta(datatype, (-1, array.shape[1]))
    nested = data.draw(st.booleans())
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "data": array.tolist() if nested else array.ravel().tolist(),
                }
            ]
        }
    )

    request = decode_request(body, None, meta)

    np.testing.assert_array_equal(request.inputs["x"], array)
    assert request.inputs["x"].dtype == dtype
    response, json_length = encode_response("m", "1", request, {"y": request.inputs["x"]}, meta)
    assert json_length is None
    output = orjson.loads(response)["outputs"][0]
    assert output["datatype"] == datatype
    np.testing.assert_array_equal(np.array(output["data"], dtype=dtype), array.ravel())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(["FP32", "FP64"]))
def test_nan_and_infinity_round_trip_through_json_as_tokens(data, datatype):
    """Requests may carry NaN, Infinity and -Infinity (as Python's json and tritonclient
    write them, and Triton reads them); responses write them the same way, not as null."""
    dtype = DATATYPES[datatype].numpy
    special = st.sampled_from([np.nan, np.inf, -np.inf])
    elements = st.floats(width=8 * dtype.itemsize) | special
    array = data.draw(
        hnp.arrays(dtype, st.tuples(st.integers(1, 8), st.just(3)), elements=elements)
    )
    entry = {"name": "x", "datatype": datatype, "shape": list(array.shape), "data": array.tolist()}
    body = json.dumps({"id": "NaN Infinity", "inputs": [entry]}).encode()

    request = decode_request(body, None, _meta(datatype))

    np.testing.assert_array_equal(request.inputs["x"], array)
    response, _ = encode_response("m", "1", request, {"y": request.inputs["x"]}, _meta(datatype))
    assert b"null" not in response
    document = json.loads(response)
    assert document["id"] == "NaN Infinity"
    np.testing.assert_array_equal(np.array(document["outputs"][0]["data"], dtype), array.ravel())


def test_non_finite_outputs_keep_the_finite_values_text():
    meta = _meta("FP32")
    request = decode_request(
        orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 3], "data": []}]}),
        None,
        meta,
    )
    finite = np.array([[0.1, 1e-30, 3.4e38]], dtype=np.float32)
    special = np.array([[0.1, np.nan, -np.inf], [np.inf, 1e-30, 3.4e38]], dtype=np.float32)
    plain = encode_response("m", "1", request, {"y": finite}, meta)[0]
    marked = encode_response("m", "1", request, {"y": special}, meta)[0]
    assert b'"data":[0.1,1e-30,3.4e+38]' in plain
    assert b'"data":[0.1,NaN,-Infinity,Infinity,1e-30,3.4e+38]' in marked


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs": [NaN', "not valid JSON"),  # broken beyond the tokens: orjson's error
        (b'{"inputs": [nan]}', "not valid JSON"),  # only NaN, Infinity and -Infinity
        (b'{"inputs": [Inf]}', "not valid JSON"),
        (b'{"id": "\\ud800", "inputs": [NaN]}', "not valid JSON"),  # a lone surrogate
        (b'{"x": 1' + b"0" * 400 + b', "inputs": [NaN]}', "not valid JSON"),  # past float range
        (b'{"inputs": [NaN]}', "input"),  # parsed, then refused as an input
    ],
)
def test_bodies_with_tokens_that_are_still_invalid(body, words):
    with pytest.raises(BadRequest, match=words):
        decode_request(body, None, _meta("FP32"))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_tokens_are_refused_where_the_model_refuses_nan(token):
    entry = '{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, ' + token + ", 2]}"
    body = '{"inputs": [' + entry + "]}"
    with pytest.raises(BadRequest, match="contains NaN or infinity"):
        decode_request(body.encode(), None, _meta("FP32"), reject_nan=True)
    integers = body.replace("FP32", "INT64").encode()
    with pytest.raises(BadRequest, match="not INT64"):
        decode_request(integers, None, _meta("INT64"))


def _is_text(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@given(st.lists(st.binary(max_size=30), min_size=1, max_size=12), st.booleans())
def test_bytes_round_trip(values, binary):
    array = np.array(values, dtype=object).reshape(-1, 1)
    meta = _meta("BYTES", (-1, 1))
    if binary:
        body, header_length = _binary_request(array, "BYTES")
        if not all(_is_text(v) for v in values):  # onnxruntime takes text only
            with pytest.raises(BadRequest, match="not UTF-8"):
                decode_request(body, header_length, meta)
            return
        request = decode_request(body, header_length, meta)
    else:
        texts = [v.decode("utf-8", "replace") for v in values]
        body = orjson.dumps(
            {
                "inputs": [
                    {"name": "x", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}
                ]
            }
        )
        request = decode_request(body, None, meta)
    decoded = request.inputs["x"]
    assert decoded.dtype == object
    assert [v.encode() for v in decoded.reshape(-1)] == [
        v.decode("utf-8", "replace").encode() for v in values
    ]
    request.binary_output = True
    response, json_length = encode_response("m", "1", request, {"y": decoded}, meta)
    assert json_length is not None
    _, (blob,) = split_binary(response, json_length, "outputs")
    expected = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in decoded.ravel())
    assert blob == expected


def test_requested_outputs_and_binary_defaults():
    spec = DATATYPES["FP32"]
    meta = ModelMetadata(
        inputs=(TensorSpec("x", spec, (-1, 2)),),
        outputs=(TensorSpec("a", spec, (-1, 2)), TensorSpec("b", spec, (-1, 2))),
    )
    body = orjson.dumps(
        {
            "id": "42",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
            "outputs": [{"name": "b"}, {"name": "a", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True},
        }
    )
    request = decode_request(body, None, meta)
    a = np.array([[1, 2]], dtype=np.float32)
    b = np.array([[3, 4]], dtype=np.float32)
    response, json_length = encode_response("m", "3", request, {"a": a, "b": b}, meta)
    assert json_length is not None
    document = orjson.loads(response[:json_length])
    assert document["model_name"] == "m"
    assert document["model_version"] == "3"
    assert document["id"] == "42"
    first, second = document["outputs"]
    assert first == {
        "name": "b",
        "datatype": "FP32",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 8},
    }
    assert second == {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}
    assert response[json_length:] == b.tobytes()


def test_max_batch_size_applies_only_to_batched_models():
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, 3], "data": [0] * 12}]}
    )
    with pytest.raises(BadRequest, match="batch size 4 is over the model's max_batch_size 3"):
        decode_request(body, None, _meta("FP32"), max_batch_size=3)
    assert decode_request(body, None, _meta("FP32"), max_batch_size=4).inputs["x"].shape == (4, 3)
    fixed = _meta("FP32", (4, 3))
    assert decode_request(body, None, fixed, max_batch_size=3).inputs["x"].shape == (4, 3)


def test_empty_batch_is_allowed():
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "INT32", "shape": [0, 3], "data": []}]}
    )
    assert decode_request(body, None, _meta("INT32")).inputs["x"].shape == (0, 3)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ("1,3", "shape must be a list of non-negative integers"),
        ([1, -3], "shape must be a list of non-negative integers"),
        ([1, 3.0], "shape must be a list of non-negative integers"),
        ([True, 3], "shape must be a list of non-negative integers"),
        ([1, 2], "shape [1, 2] does not fit the model's shape [-1, 3]"),
        ([3], "shape [3] does not fit the model's shape [-1, 3]"),
        ([1, 3, 1], "shape [1, 3, 1] does not fit the model's shape [-1, 3]"),
    ],
)
def test_a_shape_that_is_not_the_models_is_named(shape: object, words: str):
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1, 2, 3]}]}
    )
    with pytest.raises(BadRequest) as refused:
        decode_request(body, None, _meta("FP32"))
    assert refused.value.message.endswith(words)


def test_a_batch_over_the_largest_is_refused_and_one_at_it_is_not():
    meta = _meta("FP32")
    at_limit = {"name": "x", "datatype": "FP32", "shape": [4, 3], "data": list(range(12))}
    decoded = decode_request(orjson.dumps({"inputs": [at_limit]}), None, meta, max_batch_size=4)
    assert decoded.inputs["x"].shape == (4, 3)
    over = {**at_limit, "shape": [5, 3], "data": list(range(15))}
    with pytest.raises(BadRequest, match="batch size 5 is over the model's max_batch_size 4"):
        decode_request(orjson.dumps({"inputs": [over]}), None, meta, max_batch_size=4)
