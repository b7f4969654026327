"""The V2 protocol's gRPC messages to numpy arrays and back.

The checks are the HTTP codec's (`codec`), with the same messages: an unknown,
repeated or missing input, a datatype or shape the model does not take, a batch
over `max_batch_size`, element counts that do not fit the shape. A tensor comes
either as typed `contents` (the repeated field of its datatype's kind) or, for
every input of the request at once, as `raw_input_contents` (little-endian,
row-major; a BYTES element is a 4-byte length and its bytes; FP16 has no typed
field, so it comes raw). Outputs always go back raw (`raw_output_contents`), as
Triton answers: the fastest form, and tritonclient reads it.
"""

from typing import Any

import numpy as np

from tidegate.codec import (
    InferRequest,
    check_batch,
    check_complete,
    from_binary,
    input_spec,
    output_blob,
    reject_non_finite,
    routing_key_parameter,
    tensor_shape,
    timeout_parameter,
    to_datatype,
)
from tidegate.errors import BadRequest
from tidegate.protocol import ModelMetadata, RequestedOutput, TensorSpec

# The typed field of InferTensorContents that holds each datatype (FP16 has none).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter(parameters: Any, name: str) -> object:
    """The value of an InferParameter map entry (None when absent)."""
    if name not in parameters:
        return None
    entry = parameters[name]
    choice = entry.WhichOneof("parameter_choice")
    return None if choice is None else getattr(entry, choice)


def _from_contents(spec: TensorSpec, contents: Any, shape: tuple[int, ...]) -> np.ndarray:
    field = _CONTENTS.get(spec.datatype.name)
    if field is None:
        raise BadRequest(
            f"input '{spec.name}': {spec.datatype.name} has no typed contents: send it in "
            "raw_input_contents"
        )
    values = getattr(contents, field)
    count = int(np.prod(shape))
    if len(values) != count:
        raise BadRequest(
            f"input '{spec.name}': shape {list(shape)} needs {count} elements, "
            f"{field} has {len(values)}"
        )
    if spec.datatype.name == "BYTES":
        array = np.empty(count, dtype=object)
        try:
            array[:] = [bytes(value).decode("utf-8") for value in values]
        except UnicodeDecodeError as exc:
            raise BadRequest(f"input '{spec.name}': an element is not UTF-8 text") from exc
        return array.reshape(shape)
    return to_datatype(spec, np.asarray(values)).reshape(shape)


def decode_infer(
    request: Any, meta: ModelMetadata, *, max_batch_size: int = 0, reject_nan: bool = False
) -> InferRequest:
    """Checks one ModelInferRequest against the model and returns its arrays."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    if not request.inputs:
        raise BadRequest("'inputs' must not be empty")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = input_spec(meta, tensor.name, tensor.datatype, arrays)
        shape = tensor_shape(spec, list(tensor.shape))
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(
                    f"input '{tensor.name}' has contents, and the request raw_input_contents"
                )
            data = memoryview(raw[index])
            array = from_binary(spec, data, 0, len(data), shape)
        else:
            array = _from_contents(spec, tensor.contents, shape)
        if reject_nan:
            reject_non_finite(spec, array)
        arrays[spec.name] = array
    check_complete(meta, arrays)
    check_batch(arrays, meta, max_batch_size)
    outputs = meta.outputs_by_name
    requested = []
    for output in request.outputs:
        if output.name not in outputs:
            raise BadRequest(
                f"unknown output {output.name!r}; the model has: {', '.join(sorted(outputs))}"
            )
        requested.append(RequestedOutput(output.name, True))
    return InferRequest(
        id=request.id or None,
        inputs=arrays,
        outputs=tuple(requested),
        binary_output=True,
        timeout_us=timeout_parameter(parameter(request.parameters, "timeout")),
        routing_key=routing_key_parameter(parameter(request.parameters, "routing_key")),
    )


def encode_infer(
    response: Any,
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    meta: ModelMetadata,
) -> Any:
    """Fills `response` (an empty ModelInferResponse) with the outputs asked for, raw."""
    response.model_name = model_name
    response.model_version = model_version
    if request.id is not None:
        response.id = request.id
    names = [o.name for o in request.outputs] or [spec.name for spec in meta.outputs]
    specs = meta.outputs_by_name
    for name in names:
        array = outputs[name]
        datatype = specs[name].datatype
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype.name
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(bytes(output_blob(datatype, array)))
    return response
