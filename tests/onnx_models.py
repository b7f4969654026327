"""Tiny ONNX models built in the tests, for what the shipped models do not cover."""

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

V2_TO_ONNX = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def save(model: onnx.ModelProto, repository: Path, name: str, version: int = 1) -> Path:
    path = repository / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def identity(datatype: str, shape: list[int | str] | None = None) -> onnx.ModelProto:
    """y = x for one V2 datatype, with a batch axis and 3 columns by default."""
    shape = shape or ["batch", 3]
    kind = V2_TO_ONNX[datatype]
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", kind, shape)],
        [helper.make_tensor_value_info("y", kind, shape)],
    )


def two_inputs() -> onnx.ModelProto:
    """sum = a + b (FP32) and count = c (INT64): a model that needs several inputs."""
    return _model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Identity", ["c"], ["count"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("c", TensorProto.INT64, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["batch", 1]),
        ],
    )


def gather(rows: int = 4) -> onnx.ModelProto:
    """Looks up rows of a `rows`-row table: an index past it fails inside onnxruntime."""
    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [rows, 2], np.arange(2 * rows, dtype=np.float32).tolist()
    )
    return _model(
        [helper.make_node("Gather", ["table", "index"], ["rows"], axis=0)],
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 2])],
        [table],
    )


def slow(size: int = 1200, rounds: int = 24) -> onnx.ModelProto:
    """Repeated (size x size) matrix products of the input with itself: takes a while,
    so a test can catch a request in flight."""
    nodes = [helper.make_node("Expand", ["x", "square"], ["m0"])]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"p{i}"]))
        nodes.append(helper.make_node("Mul", [f"p{i}", "scale"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{rounds}"], ["y"], keepdims=0))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [
            helper.make_tensor("square", TensorProto.INT64, [2], [size, size]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / size]),
        ],
    )


def log_and_reciprocal(datatype: str = "FP32") -> onnx.ModelProto:
    """log = ln(x) and inverse = 1 / x: finite inputs give NaN (ln of a negative) and
    infinities (ln 0, 1 / 0) in the outputs."""
    kind = V2_TO_ONNX[datatype]
    return _model(
        [
            helper.make_node("Log", ["x"], ["log"]),
            helper.make_node("Reciprocal", ["x"], ["inverse"]),
        ],
        [helper.make_tensor_value_info("x", kind, ["batch", 3])],
        [
            helper.make_tensor_value_info("log", kind, ["batch", 3]),
            helper.make_tensor_value_info("inverse", kind, ["batch", 3]),
        ],
    )


def dense(widths: list[int], seed: int = 0) -> onnx.ModelProto:
    """A classifier of dense layers through `widths` (ReLU between them, softmax last):
    with wide layers, a model whose weights are large blocks of memory."""
    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "input"
    for i, (rows, columns) in enumerate(itertools.pairwise(widths)):
        weight = (rng.standard_normal((rows, columns)) / np.sqrt(rows)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"r{i}"]))
            previous = f"r{i}"
    nodes.append(helper.make_node("Softmax", [previous], ["probabilities"], axis=1))
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", widths[-1]])],
        weights,
    )
