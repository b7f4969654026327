"""tritonclient, a real V2 client, against a real `tidegate serve` process.

Every output is compared with onnxruntime run directly on the same input.
"""

import asyncio

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient

from tests.conftest import LiveServer
from tests.shipped import (
    MODELS,
    ONNX_TO_V2,
    SHIPPED,
    ShippedVersion,
    assert_same_output,
    client_inputs,
    expected_outputs,
    reference_rows,
    session,
)


@pytest.fixture(scope="module")
def triton(server: LiveServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url)


def _inputs(shipped: ShippedVersion, feeds: dict, binary: bool) -> list[httpclient.InferInput]:
    return client_inputs(httpclient, shipped, feeds, binary_data=binary)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("shipped", SHIPPED, ids=str)
def test_outputs_equal_onnxruntime(triton, shipped, batch, binary_in, binary_out):
    feeds = reference_rows(shipped, batch)
    names = [o.name for o in session(shipped.path).get_outputs()]
    result = triton.infer(
        shipped.model,
        _inputs(shipped, feeds, binary_in),
        model_version=str(shipped.version),
        outputs=[httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in names],
        request_id="req-7",
    )
    response = result.get_response()
    assert response["model_name"] == shipped.model
    assert response["model_version"] == str(shipped.version)
    assert response["id"] == "req-7"
    expected = expected_outputs(shipped, feeds)
    for name in names:
        assert_same_output(result.as_numpy(name), expected[name])


def test_without_version_the_highest_answers(triton):
    newest = ShippedVersion("breast_cancer", 2)
    feeds = reference_rows(newest, 5)
    result = triton.infer("breast_cancer", _inputs(newest, feeds, True))
    assert result.get_response()["model_version"] == "2"
    assert_same_output(
        result.as_numpy("probabilities"), expected_outputs(newest, feeds)["probabilities"]
    )


def test_versions_answer_differently(triton):
    feeds = reference_rows(ShippedVersion("breast_cancer", 1), 64)
    answers = [
        triton.infer(
            "breast_cancer", _inputs(ShippedVersion("breast_cancer", v), feeds, True), str(v)
        ).as_numpy("probabilities")
        for v in (1, 2)
    ]
    assert not np.allclose(answers[0], answers[1])


def test_requested_output_subset(triton):
    shipped = ShippedVersion("digits", 1)
    feeds = reference_rows(shipped, 3)
    result = triton.infer(
        "digits",
        _inputs(shipped, feeds, False),
        outputs=[httpclient.InferRequestedOutput("label")],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.as_numpy("probabilities") is None
    assert_same_output(result.as_numpy("label"), expected_outputs(shipped, feeds)["label"])


def test_metadata_comes_from_the_session(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "tidegate"
    assert "binary_tensor_data" in server["extensions"]
    for shipped in SHIPPED:
        assert triton.is_model_ready(shipped.model, str(shipped.version))
        meta = triton.get_model_metadata(shipped.model, str(shipped.version))
        sess = session(shipped.path)
        assert meta["platform"] == "onnxruntime_onnx"
        for got, arg in zip(meta["inputs"], sess.get_inputs(), strict=True):
            assert got["name"] == arg.name
            assert got["datatype"] == ONNX_TO_V2[arg.type]
            assert got["shape"] == [d if isinstance(d, int) else -1 for d in arg.shape]
        assert [o["name"] for o in meta["outputs"]] == [o.name for o in sess.get_outputs()]
    assert triton.get_model_metadata("breast_cancer")["versions"] == ["1", "2"]


def test_model_config_in_triton_form(triton):
    config = triton.get_model_config("breast_cancer")
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 256
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [30]}]
    assert config["output"][0] == {"name": "label", "data_type": "TYPE_INT64", "dims": []}
    assert config["output"][1]["dims"] == [2]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    text = triton.get_model_config("dataset_topic")
    assert text["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}]


def test_statistics_count_inferences(triton):
    shipped = ShippedVersion("diabetes", 1)
    before = triton.get_inference_statistics("diabetes", "1")["model_stats"][0]
    for _ in range(3):
        triton.infer("diabetes", _inputs(shipped, reference_rows(shipped, 4), True))
    after = triton.get_inference_statistics("diabetes", "1")["model_stats"][0]
    success = after["inference_stats"]["success"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["execution_count"] - before["execution_count"] == 3
    assert after["last_inference"] > 0
    assert success["ns"] > after["inference_stats"]["compute_infer"]["ns"] > 0
    every = triton.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in every} == {
        (s.model, str(s.version)) for s in SHIPPED
    }


def test_repository_index_lists_every_version(triton):
    index = triton.get_model_repository_index()
    on_disk = {(p.parent.parent.name, p.parent.name) for p in MODELS.glob("*/*/model.onnx")}
    assert {(row["name"], row["version"]) for row in index} == on_disk
    # Versions the policy does not serve (wine's rollout candidates) are listed, not READY.
    assert {(row["name"], row["version"]) for row in index if row["state"] == "READY"} == {
        (s.model, str(s.version)) for s in SHIPPED
    }


def _digits_stats(server: LiveServer) -> dict:
    return server.client.get("/v2/models/digits/versions/1/stats").json()["model_stats"][0]


def _rows_run(stats: dict) -> int:
    return sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"])


def test_burst_of_200_concurrent_requests_is_batched(server: LiveServer):
    """Concurrent requests of mixed row counts join into batches, and each gets its own rows."""
    shipped = ShippedVersion("digits", 1)
    before = _digits_stats(server)

    async def burst() -> None:
        client = aioclient.InferenceServerClient(server.url, conn_limit=200)
        try:

            async def one(i: int) -> None:
                feeds = reference_rows(shipped, 1 + i % 5, start=i)
                inputs = []
                for name, array in feeds.items():
                    infer_input = aioclient.InferInput(name, list(array.shape), "FP32")
                    infer_input.set_data_from_numpy(array, binary_data=i % 2 == 0)
                    inputs.append(infer_input)
                result = await client.infer("digits", inputs)
                expected = expected_outputs(shipped, feeds)
                for name, want in expected.items():
                    assert_same_output(result.as_numpy(name), want)

            await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await client.close()

    asyncio.run(burst())
    assert server.client.get("/v2/health/ready").status_code == 200
    after = _digits_stats(server)
    rows = sum(1 + i % 5 for i in range(200))
    assert after["inference_count"] - before["inference_count"] == rows
    assert _rows_run(after) - _rows_run(before) == rows  # every row ran exactly once
    executions = after["execution_count"] - before["execution_count"]
    print(f"200 requests ran in {executions} batches")
    assert executions < 200  # requests that arrived together were joined
