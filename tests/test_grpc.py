"""The V2 protocol over gRPC against a real `tidegate serve`: tritonclient.grpc as the
client, every output compared with onnxruntime run directly, the same request over
HTTP and gRPC, streaming, the error codes, access control, the health service and
reflection, and fuzzed messages."""

import queue
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import shipped as catalog
from tests.conftest import MODELS, SHIPPED_ONLY, LiveServer, free_port
from tests.test_access import TOKENS, write_auth_file
from tests.test_workers import _each_worker, _wait_for_workers

WINE = catalog.ShippedVersion("wine", 1)


def _serve(root: Path, *extra: str, probe_token: str | None = None) -> LiveServer:
    shutil.copytree(MODELS, root / "models", ignore=SHIPPED_ONLY)
    # diabetes waits 100 ms for company in its queue: long past a 1 us timeout.
    with (root / "models" / "diabetes" / "config.toml").open("a") as config:
        config.write("[batching]\nmax_queue_delay_us = 100000\n")
    port = free_port()
    live = LiveServer(
        root / "models",
        "--grpc-port",
        str(port),
        *extra,
        log_path=root / "server.log",
        probe_token=probe_token,
    )
    live.grpc_url = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    return live


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = _serve(tmp_path_factory.mktemp("grpc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(live.grpc_url)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stub(live: LiveServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(live.grpc_url) as channel:  # type: ignore[attr-defined]
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _inputs(shipped: catalog.ShippedVersion, feeds: dict) -> list[grpcclient.InferInput]:
    return catalog.client_inputs(grpcclient, shipped, feeds)


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("shipped", catalog.SHIPPED, ids=str)
def test_outputs_equal_onnxruntime(client, shipped, batch):
    feeds = catalog.reference_rows(shipped, batch)
    names = [o.name for o in catalog.session(shipped.path).get_outputs()]
    result = client.infer(
        shipped.model,
        _inputs(shipped, feeds),
        model_version=str(shipped.version),
        outputs=[grpcclient.InferRequestedOutput(n) for n in names],
        request_id="req-7",
    )
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (
        shipped.model,
        str(shipped.version),
        "req-7",
    )
    expected = catalog.expected_outputs(shipped, feeds)
    for name in names:
        catalog.assert_same_output(result.as_numpy(name), expected[name])


def test_http_and_grpc_give_the_same_answer(live, client):
    feeds = catalog.reference_rows(WINE, 9)
    over_grpc = client.infer("wine", _inputs(WINE, feeds), model_version="1")
    http = httpclient.InferenceServerClient(live.url)
    infer_input = httpclient.InferInput("input", [9, 13], "FP32")
    infer_input.set_data_from_numpy(feeds["input"], binary_data=True)
    over_http = http.infer("wine", [infer_input], model_version="1")
    for name in ("label", "probabilities"):
        np.testing.assert_array_equal(over_grpc.as_numpy(name), over_http.as_numpy(name))


def test_typed_contents_answer_as_raw_does(stub, client):
    feeds = catalog.reference_rows(WINE, 3)
    request = service_pb2.ModelInferRequest(model_name="wine", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 13])
    tensor.contents.fp32_contents.extend(feeds["input"].ravel().tolist())
    typed = stub.ModelInfer(request)
    raw = client.infer("wine", _inputs(WINE, feeds), model_version="1").get_response()
    assert [o.name for o in typed.outputs] == [o.name for o in raw.outputs]
    assert list(typed.raw_output_contents) == list(raw.raw_output_contents)


def test_a_stream_answers_100_requests_in_flight_in_order(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index in range(100):
            feeds = catalog.reference_rows(WINE, 1, index)
            client.async_stream_infer(
                "wine", _inputs(WINE, feeds), model_version="1", request_id=str(index)
            )
        got = [answers.get(timeout=30) for _ in range(100)]
    finally:
        client.stop_stream()
    assert [error for _, error in got] == [None] * 100
    assert [result.get_response().id for result, _ in got] == [str(i) for i in range(100)]
    for index, (result, _) in enumerate(got):
        expected = catalog.expected_outputs(WINE, catalog.reference_rows(WINE, 1, index))
        catalog.assert_same_output(result.as_numpy("label"), expected["label"])


def test_a_bad_request_in_a_stream_is_that_requests_answer(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        good = _inputs(WINE, catalog.reference_rows(WINE, 1))
        bad = grpcclient.InferInput("input", [1, 12], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 12), np.float32))
        for inputs in (good, [bad], good):
            client.async_stream_infer("wine", inputs, model_version="1")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert got[0][1] is None
    assert got[2][1] is None
    assert "does not fit the model's shape" in str(got[1][1])


def test_metadata_config_statistics_and_index(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("wine")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata().name == "tidegate"
    metadata = client.get_model_metadata("wine")
    assert metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 13])
    ]
    config = client.get_model_config("wine").config
    assert config.max_batch_size > 0
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [13])]
    before = client.get_inference_statistics("wine", "1").model_stats[0]
    client.infer("wine", _inputs(WINE, catalog.reference_rows(WINE, 4)), model_version="1")
    after = client.get_inference_statistics("wine", "1").model_stats[0]
    assert after.inference_count == before.inference_count + 4
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index["wine", "1"] == "READY"


@pytest.mark.parametrize(
    ("inputs", "code", "message"),
    [
        (lambda: [_one("input", [1, 12], "FP32")], "INVALID_ARGUMENT", "does not fit"),
        (lambda: [_one("input", [1, 13], "FP64")], "INVALID_ARGUMENT", "datatype 'FP64'"),
        (lambda: [_one("x", [1, 13], "FP32")], "INVALID_ARGUMENT", "unknown input 'x'"),
    ],
)
def test_errors_have_the_http_message_and_their_code(client, inputs, code, message):
    with pytest.raises(InferenceServerException) as raised:
        client.infer("wine", inputs(), model_version="1")
    assert raised.value.status() == f"StatusCode.{code}"
    assert message in raised.value.message()


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as raised:
        client.infer("nope", [_one("input", [1, 13], "FP32")])
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "model 'nope' is not loaded" in raised.value.message()


def test_a_request_past_its_timeout_is_deadline_exceeded(stub):
    request = service_pb2.ModelInferRequest(model_name="diabetes", model_version="1")
    request.parameters["timeout"].int64_param = 1
    request.inputs.add(name="input", datatype="FP64", shape=[1, 10])
    request.raw_input_contents.append(np.zeros((1, 10), np.float64).tobytes())
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waited its timeout of 1 us" in raised.value.details()
    del request.parameters["timeout"]
    assert len(stub.ModelInfer(request).raw_output_contents) == 1  # without: it runs


def _one(name: str, shape: list[int], datatype: str) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput(name, shape, datatype)
    dtype = {"FP32": np.float32, "FP64": np.float64}[datatype]
    infer_input.set_data_from_numpy(np.zeros(shape, dtype))
    return infer_input


def test_load_and_unload_over_grpc_are_seen_over_http(live, client):
    client.load_model("wine", config=None, files=None)
    client.unload_model("digits")
    assert not client.is_model_ready("digits")
    assert live.client.get("/v2/models/digits/ready").status_code == 404
    client.load_model("digits")
    assert live.client.get("/v2/models/digits/ready").status_code == 200


def test_the_health_service_and_reflection(live):
    with grpc.insecure_channel(live.grpc_url) as channel:  # type: ignore[attr-defined]
        checks = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = checks.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflect.ServerReflectionInfo(iter([request]))
        names = {s.name for s in answer.list_services_response.service}
        assert "inference.GRPCInferenceService" in names


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=400))
def test_fuzzed_messages_get_an_error_status_and_the_server_stays_healthy(live, client, payload):
    with grpc.insecure_channel(live.grpc_url) as channel:  # type: ignore[attr-defined]
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        # Bytes that do not parse, or hold nothing a model takes: INVALID_ARGUMENT; a
        # message that parses but names no model: NOT_FOUND.
        with pytest.raises(grpc.RpcError) as raised:
            call(payload, timeout=10)
    code = raised.value.code()
    assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, raised.value
    if code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in raised.value.details():
        assert "ModelInferRequest" in raised.value.details()
    assert client.is_server_ready()


def test_a_method_the_server_lacks_is_unimplemented(live, client):
    with grpc.insecure_channel(live.grpc_url) as channel:  # type: ignore[attr-defined]
        call = channel.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryStatus")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CudaSharedMemoryStatus" in raised.value.details()
    assert client.is_server_ready()


def test_a_compressed_call_is_unimplemented_and_an_uncompressed_one_answers(stub):
    request = service_pb2.ModelInferRequest(model_name="wine")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 13])
    request.raw_input_contents.append(np.zeros((1, 13), np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, compression=grpc.Compression.Gzip, timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "compressed" in raised.value.details()
    assert stub.ModelInfer(request, timeout=10).model_name == "wine"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("grpc-auth")
    write_auth_file(root / "auth.toml", TOKENS)
    auth = ("--auth-file", str(root / "auth.toml"), "--state-dir", str(root / "s"))
    server = _serve(root, *auth, probe_token="reader-secret")
    yield server
    server.stop()


def test_roles_over_grpc(guarded):
    url = guarded.grpc_url  # type: ignore[attr-defined]
    inputs = _inputs(WINE, catalog.reference_rows(WINE, 1))
    for token, code in (
        (None, "StatusCode.UNAUTHENTICATED"),
        ("wrong", "StatusCode.UNAUTHENTICATED"),
        ("reader-secret", "StatusCode.PERMISSION_DENIED"),
    ):
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        with pytest.raises(InferenceServerException) as raised:
            grpcclient.InferenceServerClient(url).infer("wine", inputs, headers=headers)
        assert raised.value.status() == code
    reader = {"authorization": "Bearer reader-secret"}
    assert grpcclient.InferenceServerClient(url).is_server_ready(headers=reader)
    inferer = {"authorization": "Bearer inference-secret"}
    result = grpcclient.InferenceServerClient(url).infer("wine", inputs, headers=inferer)
    assert result.as_numpy("label").shape == (1,)
    with pytest.raises(InferenceServerException) as raised:
        grpcclient.InferenceServerClient(url).unload_model("wine", headers=inferer)
    assert raised.value.status() == "StatusCode.PERMISSION_DENIED"


def _serve_fresh(tmp_path: Path, *extra: str) -> LiveServer:
    return _serve(tmp_path, "--state-dir", str(tmp_path / "state"), *extra)


def test_a_canary_split_and_sticky_keys_over_grpc(tmp_path: Path):
    server = _serve_fresh(tmp_path)
    try:
        loaded = server.client.post(
            "/v2/repository/models/wine/load", json={"parameters": {"version": "2"}}
        )
        assert loaded.status_code == 200, loaded.text
        policy = {"stable": "1", "canary": "2", "weight": 20}
        assert server.client.put("/v2/models/wine/traffic", json=policy).status_code == 200
        client = grpcclient.InferenceServerClient(server.grpc_url)  # type: ignore[attr-defined]
        inputs = _inputs(WINE, catalog.reference_rows(WINE, 1))
        versions = [client.infer("wine", inputs).get_response().model_version for _ in range(2000)]
        assert versions.count("2") / 2000 == pytest.approx(0.20, abs=0.03)
        for key in ("alice", "bob", "carol", "dave"):
            # A key sees one version whichever transport carries it.
            seen = {
                client.infer("wine", inputs, parameters={"routing_key": key})
                .get_response()
                .model_version
                for _ in range(10)
            }
            body = {
                **catalog.json_request("input", "FP32", catalog.reference_rows(WINE, 1)["input"]),
                "parameters": {"routing_key": key},
            }
            over_http = server.client.post("/v2/models/wine/infer", json=body)
            assert seen == {over_http.headers["tidegate-model-version"]}
    finally:
        server.stop()


def test_a_message_over_the_body_limit_is_refused_and_the_server_goes_on(tmp_path: Path):
    server = _serve_fresh(tmp_path, "--max-body-size", "100000")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)  # type: ignore[attr-defined]
        rows = np.zeros((2000, 13), np.float32)  # 104 kB of raw data
        big = grpcclient.InferInput("input", list(rows.shape), "FP32")
        big.set_data_from_numpy(rows)
        with pytest.raises(InferenceServerException) as raised:
            client.infer("wine", [big])
        assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        small = _inputs(WINE, catalog.reference_rows(WINE, 2))
        assert client.infer("wine", small).as_numpy("label").shape == (2,)
    finally:
        server.stop()


def test_every_worker_serves_grpc_on_the_shared_port(tmp_path: Path):
    server = _serve_fresh(tmp_path, "--workers", "2")
    try:
        # Ready is the first worker's word; a worker's gRPC listens before its sockets do.
        _wait_for_workers(server, 2)
        url = server.grpc_url  # type: ignore[attr-defined]
        inputs = _inputs(WINE, catalog.reference_rows(WINE, 1))
        sent = 0
        # Each new client is a new connection: the kernel spreads them over the workers.
        for _ in range(40):
            client = grpcclient.InferenceServerClient(url)
            for _ in range(5):
                assert client.infer("wine", inputs).as_numpy("label").shape == (1,)
                sent += 1
            client.close()
        stats = grpcclient.InferenceServerClient(url).get_inference_statistics("wine", "1")
        assert stats.model_stats[0].inference_stats.success.count == sent
        served = [
            row[2]["durations"]["success"][0]
            for response in _each_worker(server, "GET", "/internal/stats")
            for row in response.json()
            if row[:2] == ["wine", 1]
        ]
        assert sum(served) == sent
        assert all(count > 0 for count in served), served  # both workers answered gRPC
    finally:
        server.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_grpc_port_another_program_holds_is_refused_by_name(tmp_path: Path, workers: str):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "tidegate", "serve", str(MODELS), "--port", "0"]
        command += ["--grpc-port", str(port), "--workers", workers]
        command += ["--state-dir", str(tmp_path / "state")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot serve gRPC on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
