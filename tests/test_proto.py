"""tidegate's gRPC protocol definitions against Triton's, without a server.

tritonclient.grpc carries code generated from Triton's own grpc_service.proto and
model_config.proto. Every message, field, enum and call that tidegate's definitions
share with it must agree on the wire: the same name, number, type and cardinality.
What tidegate leaves out is listed here with the reason, and its field numbers stay
reserved. Messages then cross between the two sets of classes both ways, byte for byte.
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)
from google.protobuf.message import Message
from tritonclient.grpc import (
    _utils as triton_utils,
    model_config_pb2 as triton_mc,
    service_pb2 as triton_pb,
)

from tests.conftest import ROOT
from tidegate.proto import POOL, grpc_service_pb2 as pb, model_config_pb2 as mc

PROTO_DIR = ROOT / "src" / "tidegate" / "proto"

# Triton's messages that tidegate does not define, and why. A nested message goes with
# the one that holds it.
LEFT_OUT_MESSAGES = {
    **dict.fromkeys(
        [
            "inference.SystemSharedMemoryStatusRequest",
            "inference.SystemSharedMemoryStatusResponse",
            "inference.SystemSharedMemoryRegisterRequest",
            "inference.SystemSharedMemoryRegisterResponse",
            "inference.SystemSharedMemoryUnregisterRequest",
            "inference.SystemSharedMemoryUnregisterResponse",
            "inference.CudaSharedMemoryStatusRequest",
            "inference.CudaSharedMemoryStatusResponse",
            "inference.CudaSharedMemoryRegisterRequest",
            "inference.CudaSharedMemoryRegisterResponse",
            "inference.CudaSharedMemoryUnregisterRequest",
            "inference.CudaSharedMemoryUnregisterResponse",
        ],
        "shared memory: tensors travel in the request, not in memory shared with a client",
    ),
    "inference.TraceSettingRequest": "Triton's trace controls",
    "inference.TraceSettingResponse": "Triton's trace controls",
    "inference.LogSettingsRequest": "Triton's log controls",
    "inference.LogSettingsResponse": "Triton's log controls",
    "inference.ModelRateLimiter": "Triton's rate limiter (ModelInstanceGroup.rate_limiter)",
    "inference.BatchInput": "ragged-batch helper tensors (ModelConfig.batch_input)",
    "inference.BatchOutput": "ragged-batch helper tensors (ModelConfig.batch_output)",
    "inference.ModelOptimizationPolicy": "GPU graphs and accelerators (ModelConfig.optimization)",
    "inference.ModelSequenceBatching": "stateful sequences (ModelConfig.sequence_batching)",
    "inference.ModelEnsembling": "pipelines of models (ModelConfig.ensemble_scheduling)",
    "inference.ModelWarmup": "warm-up requests at load (ModelConfig.model_warmup)",
    "inference.ModelOperations": "custom operation libraries (ModelConfig.model_operations)",
    "inference.ModelRepositoryAgents": "repository agents (ModelConfig.model_repository_agents)",
    "inference.ModelMetrics": "custom metric options (ModelConfig.model_metrics)",
    "inference.ModelInstanceGroup.SecondaryDevice": "accelerators beside a GPU",
}
# Fields of messages tidegate does define that it leaves out (their numbers reserved).
LEFT_OUT_FIELDS = {
    "inference.ModelInstanceGroup": {"rate_limiter", "secondary_devices"},
    "inference.ModelConfig": {
        "batch_input",
        "batch_output",
        "optimization",
        "sequence_batching",
        "ensemble_scheduling",
        "cc_model_filenames",  # model files per GPU compute capability
        "metric_tags",  # labels on Triton's own per-model metrics
        "model_warmup",
        "model_operations",
        "model_repository_agents",
        "model_metrics",
    },
}
LEFT_OUT_RPCS = {
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
}
SERVED_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}

OURS = (pb.DESCRIPTOR, mc.DESCRIPTOR)
THEIRS = (triton_pb.DESCRIPTOR, triton_mc.DESCRIPTOR)


def _messages(files: tuple[FileDescriptor, ...]) -> dict[str, Descriptor]:
    """Every message of the files, nested ones (and map entries) included, by full name."""

    def walk(message: Descriptor) -> Iterator[Descriptor]:
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    return {
        found.full_name: found
        for file in files
        for message in file.message_types_by_name.values()
        for found in walk(message)
    }


def _enums(files: tuple[FileDescriptor, ...]) -> dict[str, dict[str, int]]:
    enums = [enum for file in files for enum in file.enum_types_by_name.values()]
    enums += [enum for message in _messages(files).values() for enum in message.enum_types]
    return {enum.full_name: {v.name: v.number for v in enum.values} for enum in enums}


def _wire(field: FieldDescriptor) -> tuple[object, ...]:
    """What decides how a field is encoded and decoded, and how the code names it."""
    message = field.message_type.full_name if field.message_type else None
    enum = field.enum_type.full_name if field.enum_type else None
    oneof = field.containing_oneof.name if field.containing_oneof else None
    return (field.number, field.type, field.is_repeated, message, enum, oneof)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _file_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _reserved(full_name: str) -> tuple[set[int], set[str]]:
    """The reserved field numbers and names of one of our (top-level) messages."""
    for file in OURS:
        for message in _file_proto(file).message_type:
            if f"inference.{message.name}" == full_name:
                numbers = {n for r in message.reserved_range for n in range(r.start, r.end)}
                return numbers, set(message.reserved_name)
    raise AssertionError(f"{full_name} is not a top-level message of ours")


def test_ours_are_in_tidegates_own_pool_beside_tritonclients():
    # tritonclient.grpc registers the same names in protobuf's default pool: ours live
    # in tidegate.proto.POOL, so both load in one process (this one).
    assert pb.DESCRIPTOR.pool is POOL
    assert mc.DESCRIPTOR.pool is POOL
    found = POOL.FindMessageTypeByName("inference.ModelInferRequest")
    assert found is pb.ModelInferRequest.DESCRIPTOR
    assert triton_pb.DESCRIPTOR.pool is not POOL


def test_every_message_we_share_with_triton_agrees_field_by_field():
    ours, theirs = _messages(OURS), _messages(THEIRS)
    assert ours.keys() <= theirs.keys(), "a message Triton does not have"
    # The entry types of the map fields left out go with them.
    entries = {
        theirs[name].fields_by_name[field].message_type.full_name
        for name, fields in LEFT_OUT_FIELDS.items()
        for field in fields
        if _is_map(theirs[name].fields_by_name[field])
    }
    unexplained = {
        name
        for name in theirs.keys() - ours.keys() - entries
        if not any(name == left or name.startswith(left + ".") for left in LEFT_OUT_MESSAGES)
    }
    assert not unexplained, f"left out without a reason: {sorted(unexplained)}"
    assert not set(LEFT_OUT_MESSAGES) & ours.keys(), "listed as left out, but defined"
    assert set(LEFT_OUT_MESSAGES) <= theirs.keys(), "listed as left out, but not Triton's"

    for name, message in ours.items():
        mine = {field.name: _wire(field) for field in message.fields}
        triton = {field.name: _wire(field) for field in theirs[name].fields}
        shared = mine.keys() & triton.keys()
        assert mine.keys() <= triton.keys(), f"{name}: fields Triton lacks"
        assert {f: mine[f] for f in shared} == {f: triton[f] for f in shared}, name
        left_out = triton.keys() - mine.keys()
        assert left_out == LEFT_OUT_FIELDS.get(name, set()), name
        assert [o.name for o in message.oneofs] == [
            o.name for o in theirs[name].oneofs if any(f.name in mine for f in o.fields)
        ], name


def test_the_numbers_of_fields_left_out_stay_reserved():
    theirs = _messages(THEIRS)
    for name, fields in LEFT_OUT_FIELDS.items():
        numbers, names = _reserved(name)
        triton = theirs[name].fields_by_name
        assert {triton[field].number for field in fields} <= numbers, name
        assert fields <= names, name


def test_every_enum_we_share_with_triton_has_all_its_values():
    ours, theirs = _enums(OURS), _enums(THEIRS)
    assert ours.keys() <= theirs.keys()
    for name, values in ours.items():
        assert values == theirs[name], name
    assert "inference.DataType" in ours


def test_the_service_has_tritons_calls_but_the_ones_left_out():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert set(ours.methods_by_name) == SERVED_RPCS
    assert set(theirs.methods_by_name) - SERVED_RPCS == LEFT_OUT_RPCS

    def signature(method: MethodDescriptor) -> tuple[object, ...]:
        return (
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        )

    for name in SERVED_RPCS:
        assert signature(ours.methods_by_name[name]) == signature(theirs.methods_by_name[name])
    assert ours.methods_by_name["ModelStreamInfer"].client_streaming


def _triton_infer_request() -> Message:
    """A ModelInferRequest as tritonclient.grpc's InferenceServerClient.infer builds it:
    raw FP32 and BYTES inputs, a requested output with a parameter, and request
    parameters of every kind (string, bool, int64, double, uint64); plus one input
    with typed contents, as a client without raw contents sends it."""
    dense = triton_grpc.InferInput("dense", [2, 3], "FP32")
    dense.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    text = triton_grpc.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"tide", b"gate"], dtype=np.object_))
    outputs = [triton_grpc.InferRequestedOutput("probabilities", class_count=2)]
    request = triton_utils._get_inference_request(
        model_name="iris",
        inputs=[dense, text],
        model_version="3",
        request_id="req-1",
        outputs=outputs,
        sequence_id=42,
        sequence_start=True,
        sequence_end=False,
        priority=7,
        timeout=250_000,
        parameters={"note": "x", "flag": True, "count": -3, "ratio": 0.25},
    )
    typed = request.inputs.add(name="ids", datatype="INT64", shape=[3])
    typed.contents.int64_contents.extend([1, -2, 2**40])
    typed.parameters["unsigned"].uint64_param = 2**63 + 1
    return request


def _same(ours: Message, theirs: Message) -> None:
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )
    assert json_format.MessageToDict(ours) == json_format.MessageToDict(theirs)


def test_a_request_tritonclient_builds_parses_with_ours_and_back():
    theirs = _triton_infer_request()
    assert theirs.parameters["ratio"].WhichOneof("parameter_choice") == "double_param"
    assert theirs.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    _same(ours, theirs)
    assert ours.raw_input_contents[0] == np.arange(6, dtype=np.float32).tobytes()
    assert ours.parameters["ratio"].double_param == 0.25
    assert ours.parameters["priority"].uint64_param == 7
    assert ours.inputs[2].parameters["unsigned"].uint64_param == 2**63 + 1
    assert list(ours.inputs[2].contents.int64_contents) == [1, -2, 2**40]
    assert triton_pb.ModelInferRequest.FromString(ours.SerializeToString()) == theirs


def _fill(message: Message, choice: int, depth: int = 0) -> Message:
    """Set every field of the message, recursively, to a value that is not the default
    (in each oneof, member number `choice` modulo its size): all of a message's fields
    then travel on the wire."""
    chosen = {oneof.fields[choice % len(oneof.fields)].name for oneof in message.DESCRIPTOR.oneofs}
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and field.name not in chosen:
            continue
        value = getattr(message, field.name)
        if _is_map(field):
            key_field, value_field = field.message_type.fields
            key = _scalar(key_field, 1)
            if value_field.message_type is not None:
                _fill(value[key], choice, depth + 1)
            else:
                value[key] = _scalar(value_field, 1)
        elif field.message_type is not None:
            if depth < 4:
                for _ in range(2 if field.is_repeated else 1):
                    item = value.add() if field.is_repeated else value
                    _fill(item, choice, depth + 1)
                    item.SetInParent()
        elif field.is_repeated:
            value.extend([_scalar(field, 1), _scalar(field, 2)])
        else:
            setattr(message, field.name, _scalar(field, 1))
    return message


def _scalar(field: FieldDescriptor, n: int) -> object:
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{n}"
    if kind == FieldDescriptor.TYPE_BYTES:
        return f"{field.name}-{n}".encode()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5 * n
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 2**64 - n
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return 2**32 - n
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return -(2**62) - n
    return -(2**30) - n


def _choices(message: Descriptor, depth: int = 0) -> int:
    """How many fillings cover every member of every oneof the message holds."""
    sizes = [len(oneof.fields) for oneof in message.oneofs]
    if depth < 4:
        sizes += [_choices(f.message_type, depth + 1) for f in message.fields if f.message_type]
    return max(sizes, default=1)


# Each top-level message of ours, once per member of its largest oneof.
FILLINGS = [
    (name, choice)
    for file in OURS
    for name, message in sorted(file.message_types_by_name.items())
    for choice in range(_choices(message))
]


@pytest.mark.parametrize(("name", "choice"), FILLINGS, ids=[f"{n}-{c}" for n, c in FILLINGS])
def test_each_message_crosses_to_triton_and_back_unchanged(name: str, choice: int):
    module = pb if name in pb.DESCRIPTOR.message_types_by_name else mc
    triton_module = triton_pb if module is pb else triton_mc
    ours = _fill(getattr(module, name)(), choice)
    assert ours.ByteSize() > 0 or not ours.DESCRIPTOR.fields
    theirs = getattr(triton_module, name).FromString(ours.SerializeToString())
    _same(ours, theirs)
    assert getattr(module, name).FromString(theirs.SerializeToString()) == ours


def test_the_generated_code_is_what_the_definitions_make(tmp_path: Path):
    """The committed modules are scripts/gen_proto.sh's output for the committed .proto
    files: nobody edited one by hand or changed a .proto without regenerating."""
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    made = sorted(p.relative_to(tmp_path / "tidegate" / "proto") for p in tmp_path.rglob("*_pb2*"))
    committed = sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.glob("*_pb2*"))
    assert made == committed
    for path in made:
        fresh = (tmp_path / "tidegate" / "proto" / path).read_bytes()
        assert fresh == (PROTO_DIR / path).read_bytes(), f"{path} is stale: run make proto"
