"""The onnxruntime wrapper: metadata from the session, warm-up, errors, cost model."""

from pathlib import Path

import numpy as np
import pytest

from tests import onnx_models
from tests.shipped import MODELS
from tidegate.config import RuntimeConfig
from tidegate.errors import BadRequest, ModelLoadError
from tidegate.runtime import OnnxModel, session_options


def test_metadata_comes_from_the_session():
    model = OnnxModel(MODELS / "dataset_topic" / "1" / "model.onnx", RuntimeConfig())
    (text,) = model.meta.inputs
    assert (text.name, text.datatype.name, text.shape) == ("text", "BYTES", (-1, 1))
    assert [(s.name, s.datatype.name, s.shape) for s in model.meta.outputs] == [
        ("label", "BYTES", (-1,)),
        ("probabilities", "FP32", (-1, 6)),
    ]
    assert model.meta.batched


def test_unsupported_tensor_types_are_named(tmp_path: Path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=onnx_models.OPSET, ir_version=8)
    path = onnx_models.save(model, tmp_path, "seq")
    with pytest.raises(ModelLoadError, match="tensor 'seq' has type seq"):
        OnnxModel(path, RuntimeConfig())


def test_unknown_provider_is_refused():
    path = MODELS / "diabetes" / "1" / "model.onnx"
    with pytest.raises(ModelLoadError, match="execution provider CUDAExecutionProvider"):
        OnnxModel(path, RuntimeConfig(providers=("CUDAExecutionProvider",)))


def test_warm_up_failure_is_a_load_error(tmp_path: Path):
    path = onnx_models.save(onnx_models.gather(), tmp_path, "gather")
    model = OnnxModel(path, RuntimeConfig())
    with pytest.raises(ModelLoadError, match="warm-up inference failed"):
        model.warm_up({"index": np.array([7], dtype=np.int64)})  # the table has 4 rows
    model.warm_up(None)  # zeros are valid indices


def test_run_errors_are_bad_requests(tmp_path: Path):
    model = OnnxModel(onnx_models.save(onnx_models.gather(), tmp_path, "g"), RuntimeConfig())
    with pytest.raises(BadRequest, match="could not run on this input"):
        model.run({"index": np.array([0, 9], dtype=np.int64)}, rows=2)
    np.testing.assert_array_equal(
        model.run({"index": np.array([3], dtype=np.int64)})["rows"], [[6.0, 7.0]]
    )


def test_cost_model_scales_up_with_rows_never_down():
    model = OnnxModel(MODELS / "digits" / "1" / "model.onnx", RuntimeConfig())
    assert model.predicted_ns(1) == float("inf")  # unknown until warmed up: never inline
    with np.load(MODELS / "digits" / "1" / "reference.npz") as archive:
        model.warm_up({"input": archive["input"]})
    one = model.predicted_ns(1)
    assert 0 < one < 10_000_000
    assert model.predicted_ns(100) == pytest.approx(100 * one)
    for _ in range(200):  # traffic of big batches raises the cost of a run ...
        model.run({"input": np.zeros((200, 64), dtype=np.float32)}, rows=200)
    # ... and a small request is still predicted to cost a whole average run.
    assert model.predicted_ns(1) > one


@pytest.mark.parametrize("spinning", [False, True])
def test_runtime_config_reaches_the_session_options(spinning: bool):
    config = RuntimeConfig(intra_op_threads=2, inter_op_threads=3, intra_op_spinning=spinning)
    options = session_options(config)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)
    entry = options.get_session_config_entry("session.intra_op.allow_spinning")
    assert entry == ("1" if spinning else "0")
