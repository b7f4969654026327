"""The bench request pool, checked against decoders it does not share code with.

References: the server's own request decoder (`tidegate.codec.decode_request`), the
binary layout written out by hand with `struct`, and tritonclient's request encoder.
"""

import re
import struct
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from tests.shipped import split_binary
from tidegate.codec import InferRequest, decode_request
from tidegate.protocol import DATATYPES, ModelMetadata, TensorSpec
from tidegate.workload import (
    InputSpec,
    PreparedRequest,
    encode_request,
    input_specs,
    json_requests,
    npz_requests,
    random_requests,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
BREAST_CANCER = MODELS / "breast_cancer" / "1" / "reference.npz"
DATASET_TOPIC = MODELS / "dataset_topic" / "1" / "reference.npz"


def _meta(specs: list[InputSpec]) -> ModelMetadata:
    tensors = tuple(TensorSpec(s.name, DATATYPES[s.datatype], s.shape) for s in specs)
    return ModelMetadata(inputs=tensors, outputs=tensors[:1])


def _decode(request: PreparedRequest, specs: list[InputSpec]) -> InferRequest:
    return decode_request(request.body, request.header_length, _meta(specs))


def _sample(datatype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Test data of a datatype, with its extreme values where they fit."""
    rng = np.random.default_rng(seed)
    dtype = DATATYPES[datatype].numpy
    count = int(np.prod(shape))
    if datatype == "BYTES":
        words = ["", "a", "héllo wörld", "日本語", '"quoted"\n', "x" * 40]
        flat = np.array([words[i % len(words)] + str(i) for i in range(count)], dtype=object)
        return flat.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind == "f":
        info = np.finfo(dtype)
        values = (rng.standard_normal(count) * 100).astype(dtype)
        extremes = np.array([info.max, info.min, info.tiny, -0.0, 1 / 3], dtype=dtype)
    else:
        info_i = np.iinfo(dtype)
        values = rng.integers(info_i.min, info_i.max, size=count, dtype=dtype, endpoint=True)
        extremes = np.array([info_i.min, info_i.max, 0], dtype=dtype)
    values[: min(count, len(extremes))] = extremes[:count]
    return values.reshape(shape)


def _assert_same(decoded: np.ndarray, original: np.ndarray, datatype: str) -> None:
    assert decoded.shape == original.shape
    if datatype == "BYTES":
        assert decoded.dtype == object
        assert decoded.tolist() == original.tolist()
    else:
        assert decoded.dtype == DATATYPES[datatype].numpy
        assert decoded.tobytes() == original.tobytes()  # bit-exact, -0.0 included


# --- encode_request: round trips through the server's decoder ---------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_round_trip_every_datatype(datatype, batch, binary):
    specs = [InputSpec("x", datatype, (-1, 3))]
    array = _sample(datatype, (batch, 3), seed=batch)

    body, header_length = encode_request({"x": array}, {"x": datatype}, binary)

    assert (header_length is not None) == binary
    request = decode_request(body, header_length, _meta(specs))
    _assert_same(request.inputs["x"], array, datatype)
    assert request.binary_output == binary


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 7])
def test_round_trip_every_datatype_in_one_request(batch, binary):
    specs = [
        InputSpec(f"in_{name.lower()}", name, (-1, 2, -1)) for name in reversed(list(DATATYPES))
    ]
    arrays = {s.name: _sample(s.datatype, (batch, 2, 3), seed=i) for i, s in enumerate(specs)}
    datatypes = {s.name: s.datatype for s in specs}

    body, header_length = encode_request(arrays, datatypes, binary)

    request = decode_request(body, header_length, _meta(specs))
    assert list(request.inputs) == list(arrays)
    for spec in specs:
        _assert_same(request.inputs[spec.name], arrays[spec.name], spec.datatype)


def test_binary_layout_by_hand():
    features = np.array([[1.5, -2.0, 0.25], [3.0, 1e-3, -0.0]], dtype=np.float32)
    words = np.array([["ab"], ["c"], [""], ["é"]], dtype=object)

    body, header_length = encode_request(
        {"features": features, "words": words}, {"features": "FP32", "words": "BYTES"}, True
    )

    assert header_length is not None
    header, blobs = split_binary(body, header_length, "inputs")
    assert header == {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": 24},
            },
            {
                "name": "words",
                "datatype": "BYTES",
                "shape": [4, 1],
                "parameters": {"binary_data_size": 4 * 4 + 2 + 1 + 0 + 2},
            },
        ],
        "parameters": {"binary_data_output": True},
    }
    assert blobs[0] == struct.pack("<6f", 1.5, -2.0, 0.25, 3.0, np.float32(1e-3), -0.0)
    assert blobs[1] == (
        struct.pack("<I", 2)
        + b"ab"
        + struct.pack("<I", 1)
        + b"c"
        + struct.pack("<I", 0)
        + struct.pack("<I", 2)
        + "é".encode()
    )


def test_binary_is_little_endian_row_major_whatever_the_array():
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    column_major = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))

    body, header_length = encode_request(
        {"a": big_endian, "b": column_major}, {"a": "INT32", "b": "FP64"}, True
    )

    assert header_length is not None
    _, blobs = split_binary(body, header_length, "inputs")
    assert blobs[0] == struct.pack("<6i", 0, 1, 2, 3, 4, 5)
    assert blobs[1] == struct.pack("<6d", 0, 1, 2, 3, 4, 5)


def test_bytes_elements_may_be_bytes():
    array = np.array([b"raw", b"\xff\x00"], dtype=object)

    body, header_length = encode_request({"x": array}, {"x": "BYTES"}, True)

    assert header_length is not None
    expected = [b"\x03\x00\x00\x00raw\x02\x00\x00\x00\xff\x00"]
    assert split_binary(body, header_length, "inputs")[1] == expected
    with pytest.raises(ValueError, match="not UTF-8"):
        encode_request({"x": array}, {"x": "BYTES"}, False)


def test_json_body_is_plain_v2():
    body, header_length = encode_request(
        {"x": np.array([[1, 2], [3, 4]], dtype=np.int64)}, {"x": "INT64"}, False
    )

    assert header_length is None
    assert orjson.loads(body) == {
        "inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [1, 2, 3, 4]}]
    }


@pytest.mark.parametrize(
    ("binary", "outputs_binary", "expected"),
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
)
def test_outputs_binary(binary, outputs_binary, expected):
    arrays = {"x": np.zeros((1, 3), dtype=np.float32)}
    body, header_length = encode_request(arrays, {"x": "FP32"}, binary, outputs_binary)

    header = orjson.loads(body[:header_length])
    assert header.get("parameters", {}).get("binary_data_output", False) is expected
    request = decode_request(body, header_length, _meta([InputSpec("x", "FP32", (-1, 3))]))
    assert request.binary_output is expected


@pytest.mark.parametrize(
    ("arrays", "datatypes", "binary", "message"),
    [
        ({}, {}, False, "at least one input"),
        ({"x": np.zeros(2)}, {}, False, "'x' has no datatype"),
        ({"x": np.zeros(2)}, {"x": "FP8"}, True, "'FP8' is not one of"),
        ({"x": np.array(["a"])}, {"x": "FP32"}, True, "cannot be sent as FP32"),
        ({"x": np.array([1.0, np.nan])}, {"x": "FP32"}, False, "NaN or infinity"),
        ({"x": np.array([1, 2], dtype=object)}, {"x": "BYTES"}, True, "str or bytes"),
    ],
)
def test_encode_request_errors(arrays, datatypes, binary, message):
    with pytest.raises(ValueError, match=message):
        encode_request(arrays, datatypes, binary)


def test_non_finite_floats_travel_in_binary():
    array = np.array([[np.nan, np.inf, -np.inf]], dtype=np.float32)
    body, header_length = encode_request({"x": array}, {"x": "FP32"}, True)

    request = decode_request(body, header_length, _meta([InputSpec("x", "FP32", (-1, 3))]))
    assert request.inputs["x"].tobytes() == array.tobytes()


# --- encode_request against tritonclient ------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32),
        np.arange(-10, 11, dtype=np.int64).reshape(3, 7) * (2**40),
        np.array([["alpha"], [""], ["日本"], ["a longer sentence"]], dtype=object),
    ],
    ids=["FP32", "INT64", "BYTES"],
)
def test_binary_body_matches_tritonclient(array):
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}.get(array.dtype, "BYTES")
    other = np.arange(4, dtype=np.float32).reshape(1, 4)
    triton_inputs = []
    for name, value, dt in (("first", array, datatype), ("second", other, "FP32")):
        infer_input = httpclient.InferInput(name, list(value.shape), dt)
        if dt == "BYTES":  # tritonclient encodes BYTES from bytes objects
            value = np.vectorize(str.encode, otypes=[object])(value)
        infer_input.set_data_from_numpy(value, binary_data=True)
        triton_inputs.append(infer_input)
    triton_body, triton_json_size = httpclient.InferenceServerClient.generate_request_body(
        triton_inputs, outputs=None
    )

    body, header_length = encode_request(
        {"first": array, "second": other}, {"first": datatype, "second": "FP32"}, True
    )

    assert header_length is not None
    assert body[header_length:] == triton_body[triton_json_size:]
    ours = orjson.loads(body[:header_length])
    theirs = orjson.loads(triton_body[:triton_json_size])
    keys = ("name", "datatype", "shape", "parameters")
    assert [{k: e[k] for k in keys} for e in ours["inputs"]] == [
        {k: e[k] for k in keys} for e in theirs["inputs"]
    ]
    assert ours["parameters"] == theirs["parameters"] == {"binary_data_output": True}


# --- random_requests ----------------------------------------------------------------------

RANDOM_SPECS = [
    InputSpec("features", "FP32", (-1, 4)),
    InputSpec("ids", "INT64", (-1,)),
    InputSpec("text", "BYTES", (-1, 1)),
    InputSpec("mask", "BOOL", (2, -1, -1)),
    InputSpec("half", "FP16", (3,)),
    InputSpec("small", "UINT8", (-1, 2)),
]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 7])
def test_random_requests_follow_the_metadata(batch, binary):
    pool = random_requests(RANDOM_SPECS, batch, binary, count=5)

    assert len(pool) == 5
    for prepared in pool:
        assert prepared.rows == batch
        assert (prepared.header_length is not None) == binary
        assert prepared.content_type == (
            "application/octet-stream" if binary else "application/json"
        )
        inputs = _decode(prepared, RANDOM_SPECS).inputs
        assert {name: array.shape for name, array in inputs.items()} == {
            "features": (batch, 4),
            "ids": (batch,),
            "text": (batch, 1),
            "mask": (2, batch, 1),
            "half": (3,),
            "small": (batch, 2),
        }
        for spec in RANDOM_SPECS:
            assert inputs[spec.name].dtype == DATATYPES[spec.datatype].numpy
        assert ((inputs["ids"] >= 0) & (inputs["ids"] < 10)).all()
        assert ((inputs["small"] >= 0) & (inputs["small"] < 10)).all()
        assert np.isfinite(inputs["features"]).all()
        for word in inputs["text"].reshape(-1):
            assert re.fullmatch("[a-z]{3,8}", word)
    assert len({prepared.body for prepared in pool}) == len(pool)


def test_random_requests_are_standard_normal():
    pool = random_requests([InputSpec("x", "FP64", (-1, 100))], 50, True, count=4)

    values = np.concatenate(
        [_decode(p, [InputSpec("x", "FP64", (-1, 100))]).inputs["x"] for p in pool]
    )
    assert abs(values.mean()) < 0.05
    assert abs(values.std() - 1) < 0.05


def test_random_requests_are_deterministic_per_seed():
    first = random_requests(RANDOM_SPECS, 3, True, count=4, seed=7)

    assert random_requests(RANDOM_SPECS, 3, True, count=4, seed=7) == first
    assert random_requests(RANDOM_SPECS, 3, True, count=4, seed=8) != first


def test_random_requests_rows_of_a_fixed_first_dimension():
    pool = random_requests([InputSpec("x", "FP32", (2, -1))], 5, False, count=1)

    assert pool[0].rows == 2
    assert _decode(pool[0], [InputSpec("x", "FP32", (2, -1))]).inputs["x"].shape == (2, 5)


@pytest.mark.parametrize(("batch", "count"), [(0, 1), (1, 0)])
def test_random_requests_refuse_an_empty_pool(batch, count):
    with pytest.raises(ValueError, match="at least"):
        random_requests(RANDOM_SPECS, batch, False, count=count)


# --- npz_requests -------------------------------------------------------------------------

BREAST_CANCER_SPECS = [InputSpec("input", "FP32", (-1, 30))]
DATASET_TOPIC_SPECS = [InputSpec("text", "BYTES", (-1, 1))]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_npz_requests_are_consecutive_slices(binary):
    with np.load(BREAST_CANCER) as npz:
        reference = npz["input"]
    assert reference.shape == (426, 30)
    twice = np.concatenate([reference, reference])

    pool = npz_requests(BREAST_CANCER, BREAST_CANCER_SPECS, 7, binary)

    assert len(pool) == 64
    for index, prepared in enumerate(pool):
        assert prepared.rows == 7
        decoded = _decode(prepared, BREAST_CANCER_SPECS).inputs["input"]
        start = 7 * index % 426
        _assert_same(decoded, twice[start : start + 7], "FP32")
    # The last slices wrap: 420..425 and 0, then 1..7.
    _assert_same(_decode(pool[60], BREAST_CANCER_SPECS).inputs["input"][-1], reference[0], "FP32")
    _assert_same(_decode(pool[61], BREAST_CANCER_SPECS).inputs["input"], reference[1:8], "FP32")


def test_npz_requests_wrap_around():
    with np.load(BREAST_CANCER) as npz:
        reference = npz["input"]

    pool = npz_requests(BREAST_CANCER, BREAST_CANCER_SPECS, 100, True, count=6)

    assert len(pool) == 6
    decoded = [_decode(p, BREAST_CANCER_SPECS).inputs["input"] for p in pool]
    _assert_same(decoded[3], reference[300:400], "FP32")
    _assert_same(decoded[4], np.concatenate([reference[400:], reference[:74]]), "FP32")
    _assert_same(decoded[5], reference[74:174], "FP32")


def test_npz_requests_stop_where_slices_repeat():
    pool = npz_requests(BREAST_CANCER, BREAST_CANCER_SPECS, 213, False)

    assert len(pool) == 2  # 426 rows: a third slice would be the first again


def test_npz_requests_of_text():
    with np.load(DATASET_TOPIC) as npz:
        reference = npz["text"]
    assert reference.dtype.kind == "U"
    assert reference.shape == (104, 1)

    for binary in (False, True):
        pool = npz_requests(DATASET_TOPIC, DATASET_TOPIC_SPECS, 5, binary, count=30)
        assert len(pool) == 30  # 104 rows, 5 a batch: 104 distinct slices
        for index, prepared in enumerate(pool):
            decoded = _decode(prepared, DATASET_TOPIC_SPECS).inputs["text"]
            rows = (5 * index + np.arange(5)) % 104
            assert decoded.dtype == object
            assert decoded.tolist() == reference[rows].tolist()


def test_npz_requests_cast_to_the_input_datatype(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(12, dtype=np.float64).reshape(6, 2))
    specs = [InputSpec("x", "INT32", (-1, 2))]

    pool = npz_requests(path, specs, 3, True)

    assert len(pool) == 2
    decoded = _decode(pool[1], specs).inputs["x"]
    assert decoded.dtype == np.int32
    assert decoded.tolist() == [[6, 7], [8, 9], [10, 11]]


def test_npz_requests_name_a_missing_input():
    specs = [*BREAST_CANCER_SPECS, InputSpec("extra", "FP32", (-1, 1))]

    with pytest.raises(ValueError, match="no array for input 'extra'"):
        npz_requests(BREAST_CANCER, specs, 1, True)


def test_npz_requests_need_a_batch_of_rows():
    with pytest.raises(ValueError, match="426 rows, fewer than the batch size 427"):
        npz_requests(BREAST_CANCER, BREAST_CANCER_SPECS, 427, True)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([InputSpec("input", "FP32", (-1, 29))], "does not fit"),
        ([InputSpec("input", "BYTES", (-1, 30))], "float32 data but the input takes BYTES"),
    ],
)
def test_npz_requests_refuse_arrays_that_do_not_fit(specs, message):
    with pytest.raises(ValueError, match=message):
        npz_requests(BREAST_CANCER, specs, 1, True)


def test_npz_requests_need_arrays_of_equal_rows(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, a=np.zeros((5, 1)), b=np.zeros((4, 1)))
    specs = [InputSpec("a", "FP32", (-1, 1)), InputSpec("b", "FP32", (-1, 1))]

    with pytest.raises(ValueError, match="disagree on the number of rows"):
        npz_requests(path, specs, 1, True)


# --- json_requests ------------------------------------------------------------------------

REQUEST = {
    "id": "one",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": [0.5] * 6}],
    "outputs": [{"name": "label"}],
}


def test_json_requests_of_one_object(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(f"  {orjson.dumps(REQUEST, option=orjson.OPT_INDENT_2).decode()}\n")

    pool = json_requests(path)

    assert len(pool) == 1
    assert orjson.loads(pool[0].body) == REQUEST
    assert pool[0].header_length is None
    assert pool[0].content_type == "application/json"
    assert pool[0].rows == 2


def test_json_requests_of_a_list(tmp_path):
    second = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [], "data": ["hi"]}]}
    third = {"inputs": [{"name": "x", "datatype": "BYTES", "data": ["hi"]}]}
    path = tmp_path / "requests.json"
    path.write_bytes(orjson.dumps([REQUEST, second, third]))

    pool = json_requests(path)

    assert [orjson.loads(p.body) for p in pool] == [REQUEST, second, third]
    assert [p.rows for p in pool] == [2, 1, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("3", "expected a V2 infer request object, found int"),
        ("[]", "empty list"),
        ('[{"inputs": [{}]}, "x"]', "request 1: expected a V2 infer request object, found str"),
        ('{"outputs": []}', "non-empty 'inputs' list"),
        ('{"inputs": []}', "non-empty 'inputs' list"),
        ('{"inputs": [1]}', "non-empty 'inputs' list"),
    ],
)
def test_json_requests_refuse_what_is_not_a_request(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)

    with pytest.raises(ValueError, match=message):
        json_requests(path)


# --- input_specs --------------------------------------------------------------------------


def test_input_specs_of_real_metadata():
    metadata = {
        "name": "breast_cancer",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 30]},
            {"name": "text", "datatype": "BYTES", "shape": [-1, 1]},
            {"name": "scalar", "datatype": "INT64", "shape": []},
        ],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
    }

    assert input_specs(metadata) == [
        InputSpec("input", "FP32", (-1, 30)),
        InputSpec("text", "BYTES", (-1, 1)),
        InputSpec("scalar", "INT64", ()),
    ]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"name": "m"}, "no 'inputs' list"),
        ({"inputs": []}, "no 'inputs' list"),
        ({"inputs": {"name": "x"}}, "no 'inputs' list"),
        ({"inputs": ["x"]}, "input 0 is not a JSON object"),
        ({"inputs": [{"datatype": "FP32", "shape": [1]}]}, "input 0 has no name"),
        ({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1]}]}, "'x' has datatype 'FP8'"),
        ({"inputs": [{"name": "x", "shape": [1]}]}, "'x' has datatype None"),
        ({"inputs": [{"name": "x", "datatype": "FP32"}]}, "'x' has shape None"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": ["3"]}]}, "has shape"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [True]}]}, "has shape"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "has shape"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}] * 2},
            "'x' is listed twice",
        ),
    ],
)
def test_input_specs_refuse_malformed_metadata(metadata, message):
    with pytest.raises(ValueError, match=message):
        input_specs(metadata)
