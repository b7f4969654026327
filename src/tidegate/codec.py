"""The V2 wire format: request bytes to numpy arrays, and output arrays to response bytes.

Pure: no I/O, no web framework. A request is parsed once (one `orjson.loads`) and
checked against the model's metadata so that onnxruntime only ever sees inputs of
the right names, datatypes and shapes; every rejection is a `BadRequest` naming
the input and what is wrong with it.

Triton's binary tensor data extension: when the `Inference-Header-Content-Length`
header is present, the body is that many bytes of JSON followed by the raw tensors
of the inputs whose `parameters.binary_data_size` is set, in input order. Fixed-size
datatypes are little-endian row-major; a BYTES element is a 4-byte little-endian
length followed by its bytes. Responses use the same layout for outputs that ask
for `binary_data` (or all outputs, with the request parameter `binary_data_output`).
"""

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from tidegate.errors import BadRequest
from tidegate.protocol import DATATYPES, Datatype, ModelMetadata, RequestedOutput, TensorSpec

_LENGTH = struct.Struct("<I")
# Which numpy kinds a JSON array may hold for each kind of V2 datatype: integers
# are fine where floats belong, but never strings, floats where ints belong, or
# bools where numbers belong.
_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


# The values made per request (this, `protocol.RequestedOutput`, `batcher.BatchResult`,
# `serving.Served`) are plain slotted dataclasses, not frozen ones: a frozen one sets
# each field through `object.__setattr__`, four times the cost of a plain one.
@dataclass(slots=True)
class InferRequest:
    """A decoded request: arrays ready for onnxruntime, keyed by input name."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]  # empty: every output, in model order
    binary_output: bool  # `binary_data_output`: the default for outputs that do not say
    timeout_us: int | None  # the `timeout` parameter: how long it may wait to run
    routing_key: bytes | None  # the `routing_key` parameter: which side of a canary split


def tensor_shape(spec: TensorSpec, raw: object) -> tuple[int, ...]:
    """`raw` as the input's shape: a list of non-negative integers that fits the
    model's shape (-1: any size). One loop over the dimensions, not all() and any()
    over generators: a request's shape has a few, and generators cost more than the
    checks themselves."""
    if type(raw) is list and len(raw) == len(spec.shape):
        for want, got in zip(spec.shape, raw, strict=True):
            if type(got) is not int or got < 0 or (want != got and want != -1):
                break
        else:
            return tuple(raw)
    if type(raw) is not list or not all(type(size) is int and size >= 0 for size in raw):
        raise BadRequest(f"input '{spec.name}': shape must be a list of non-negative integers")
    raise BadRequest(
        f"input '{spec.name}': shape {raw} does not fit the model's shape {list(spec.shape)}"
    )


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested JSON lists (V2 allows nested or flat data)."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(spec: TensorSpec, data: object, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input '{spec.name}': data must be a JSON array")
    count = math.prod(shape)
    datatype = spec.datatype
    if datatype.name == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(item, str) for item in flat):
            raise BadRequest(f"input '{spec.name}': BYTES data must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        try:
            array = np.array(data)
        except ValueError as exc:  # ragged nesting
            raise BadRequest(f"input '{spec.name}': data is not a regular array") from exc
        if datatype.numpy.kind in "iu" and array.dtype.kind == "f":
            # numpy turns a mix of int64 and uint64 values into float64.
            array = _exact_integers(spec, _flatten(data))
        if array.size and array.dtype.kind not in _ACCEPTED_KINDS[datatype.numpy.kind]:
            raise BadRequest(f"input '{spec.name}': data holds values that are not {datatype.name}")
        array = to_datatype(spec, array)
    if array.size != count:
        raise BadRequest(
            f"input '{spec.name}': shape {list(shape)} needs {count} elements, "
            f"data has {array.size}"
        )
    return array.reshape(shape)


def _exact_integers(spec: TensorSpec, flat: list[Any]) -> np.ndarray:
    if not all(type(item) is int for item in flat):
        raise BadRequest(
            f"input '{spec.name}': data holds values that are not {spec.datatype.name}"
        )
    try:
        return np.array(flat, dtype=spec.datatype.numpy)
    except OverflowError as exc:
        raise BadRequest(
            f"input '{spec.name}': a value is out of range for {spec.datatype.name}"
        ) from exc


def to_datatype(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """`array` in the input's datatype; BadRequest if an integer does not fit it."""
    target = spec.datatype.numpy
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(
                f"input '{spec.name}': a value is out of range for {spec.datatype.name}"
            )
    return array.astype(target, copy=False)


def _bytes_elements(spec: TensorSpec, buffer: memoryview, count: int) -> np.ndarray:
    if count > len(buffer) // _LENGTH.size:  # each element has a 4-byte length, at least
        raise BadRequest(
            f"input '{spec.name}': {len(buffer)} bytes of binary BYTES data cannot hold "
            f"{count} elements"
        )
    array = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(buffer):
            raise BadRequest(f"input '{spec.name}': binary BYTES data ends inside element {index}")
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise BadRequest(f"input '{spec.name}': binary BYTES element {index} overruns data")
        try:
            array[index] = str(buffer[offset : offset + length], "utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"input '{spec.name}': element {index} is not UTF-8 text") from exc
        offset += length
    if offset != len(buffer):
        raise BadRequest(f"input '{spec.name}': binary BYTES data has bytes after {count} elements")
    return array


def _binary_size(spec: TensorSpec, parameters: dict[str, Any]) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(f"input '{spec.name}': binary_data_size must be a non-negative integer")
    return size


def from_binary(
    spec: TensorSpec, body: memoryview, offset: int, size: int, shape: tuple[int, ...]
) -> np.ndarray:
    if offset + size > len(body):
        raise BadRequest(
            f"input '{spec.name}': binary_data_size {size} runs past the end of the body "
            f"({len(body) - offset} bytes left)"
        )
    count = math.prod(shape)
    datatype = spec.datatype
    if datatype.name == "BYTES":
        return _bytes_elements(spec, body[offset : offset + size], count).reshape(shape)
    if size != count * datatype.itemsize:
        raise BadRequest(
            f"input '{spec.name}': binary_data_size {size} but shape {list(shape)} of "
            f"{datatype.name} needs {count * datatype.itemsize} bytes"
        )
    return np.frombuffer(body, dtype=datatype.numpy, count=count, offset=offset).reshape(shape)


def reject_non_finite(spec: TensorSpec, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"input '{spec.name}' contains NaN or infinity, which this model refuses")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _requested_outputs(
    raw: object, meta: ModelMetadata, binary_default: bool
) -> tuple[RequestedOutput, ...]:
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a JSON array")
    names = meta.outputs_by_name
    requested = []
    for item in raw:
        entry = _object(item, "each requested output")
        name = entry.get("name")
        if not isinstance(name, str) or name not in names:
            raise BadRequest(f"unknown output {name!r}; the model has: {', '.join(sorted(names))}")
        parameters = _object(entry.get("parameters", {}), f"output '{name}' parameters")
        if "classification" in parameters:
            raise BadRequest(f"output '{name}': the classification extension is not supported")
        binary = parameters.get("binary_data", binary_default)
        requested.append(RequestedOutput(name, binary is True))
    return tuple(requested)


def input_spec(
    meta: ModelMetadata, name: object, datatype: object, seen: dict[str, np.ndarray]
) -> TensorSpec:
    """The model's input `name`, once it is known to be one, not yet given (`seen`),
    and sent as its datatype; else the BadRequest that says which is wrong."""
    specs = meta.inputs_by_name
    spec = specs.get(name) if isinstance(name, str) else None
    if spec is None:
        raise BadRequest(f"unknown input {name!r}; the model takes: {', '.join(specs)}")
    if spec.name in seen:
        raise BadRequest(f"input '{spec.name}' is given twice")
    if datatype != spec.datatype.name:
        supported = isinstance(datatype, str) and datatype in DATATYPES
        known = "" if supported else " (not a datatype tidegate supports)"
        raise BadRequest(
            f"input '{spec.name}': datatype {datatype!r}{known} but the model takes "
            f"{spec.datatype.name}"
        )
    return spec


def check_complete(meta: ModelMetadata, arrays: dict[str, np.ndarray]) -> None:
    """BadRequest naming the first input the request lacks."""
    missing = [name for name in meta.inputs_by_name if name not in arrays]
    if missing:
        raise BadRequest(f"missing input '{missing[0]}'")


def decode_request(
    body: bytes,
    header_length: int | None,
    meta: ModelMetadata,
    *,
    max_batch_size: int = 0,
    reject_nan: bool = False,
) -> InferRequest:
    """Parses and checks one V2 infer request.

    Args:
        body: the whole request body.
        header_length: the `Inference-Header-Content-Length` header, if sent: the
            JSON part's length, binary tensor data following it.
        meta: the model version's tensors, to check names, datatypes and shapes.
        max_batch_size: if > 0 and the model has a batch axis, the most rows allowed.
        reject_nan: refuse float inputs holding NaN or infinity.
    """
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length {header_length} does not fit a body of "
            f"{len(body)} bytes"
        )
    try:
        document = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as exc:
        document = _loads_non_finite(body[:header_length], exc)
    request = _object(document, "the request body")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty JSON array")

    view = memoryview(body)
    offset = header_length
    arrays: dict[str, np.ndarray] = {}
    for item in raw_inputs:
        entry = _object(item, "each input")
        name = entry.get("name")
        spec = input_spec(meta, name, entry.get("datatype"), arrays)
        shape = tensor_shape(spec, entry.get("shape"))
        size = None
        if "parameters" in entry:  # most JSON inputs have none
            size = _binary_size(spec, _object(entry["parameters"], f"input '{name}' parameters"))
        if size is None:
            if "data" not in entry:
                raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
            array = _from_json(spec, entry["data"], shape)
        else:
            if "data" in entry:
                raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
            array = from_binary(spec, view, offset, size, shape)
            offset += size
        if reject_nan:
            reject_non_finite(spec, array)
        arrays[spec.name] = array

    check_complete(meta, arrays)
    if offset != len(body):
        raise BadRequest(
            f"body has {len(body) - header_length} bytes of binary data but the inputs "
            f"declare {offset - header_length}"
        )
    check_batch(arrays, meta, max_batch_size)

    parameters = (
        _object(request["parameters"], "request parameters") if "parameters" in request else {}
    )
    binary_output = parameters.get("binary_data_output") is True
    raw_outputs = request.get("outputs")
    request_id = request.get("id")
    # Most requests have neither parameters nor outputs: no calls for them.
    return InferRequest(
        id=request_id if isinstance(request_id, str) else None,
        inputs=arrays,
        outputs=() if raw_outputs is None else _requested_outputs(raw_outputs, meta, binary_output),
        binary_output=binary_output,
        timeout_us=timeout_parameter(parameters.get("timeout")) if parameters else None,
        routing_key=routing_key_parameter(parameters.get("routing_key")) if parameters else None,
    )


def _orjson_int(text: str) -> int | float:
    """An integer as orjson reads it: past 64 bits, a float."""
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(value)


def _loads_non_finite(text: bytes, error: orjson.JSONDecodeError) -> Any:
    """The JSON part of a request that orjson refused, if what it refused is only the
    NaN, Infinity and -Infinity tokens; else the BadRequest for orjson's `error`.

    Triton parses requests with rapidjson's kParseNanAndInfFlag (TritonJson::Parse), and
    its clients write the tokens for non-finite floats (tritonclient's python-rapidjson,
    Python's json), so tidegate takes them too; `[validation] reject_nan` still refuses
    them where a model cannot take them. orjson has no such option, so such a body is
    parsed again here, by the standard library, which reads the three tokens and nothing
    else beyond JSON. Only requests that orjson refused pay for it. The result is then
    held to what orjson accepts (encoding it again refuses lone surrogates, which the
    standard library lets through and nothing downstream could encode)."""
    invalid = BadRequest(f"request body is not valid JSON: {error}")
    if b"NaN" not in text and b"Infinity" not in text:
        raise invalid from error
    try:
        document = json.loads(text.decode("utf-8"), parse_int=_orjson_int)
        orjson.dumps(document)
    # JSONEncodeError is a TypeError; an integer past float range overflows.
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise invalid from exc
    return document


def routing_key_parameter(key: object) -> bytes | None:
    """tidegate's `routing_key` request parameter (its value, None when absent):
    requests with the same key see the same version of a model with a canary (see
    `traffic`)."""
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise BadRequest(f"parameter 'routing_key' must be a string, not {key!r}")
    return str(key).encode()


def timeout_parameter(timeout: object) -> int | None:
    """Triton's `timeout` request parameter (its value, None when absent), in
    microseconds; 0 means none, as in Triton."""
    if timeout is None:
        return None
    if type(timeout) is not int or timeout < 0:
        raise BadRequest(f"parameter 'timeout' must be a number of microseconds, not {timeout!r}")
    return timeout or None


def check_batch(arrays: dict[str, np.ndarray], meta: ModelMetadata, max_batch_size: int) -> None:
    if max_batch_size <= 0 or not meta.batched:
        return
    batch = next(iter(arrays.values())).shape[0]
    if len(arrays) > 1:
        rows = {array.shape[0] for array in arrays.values()}
        if len(rows) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(rows)}")
    if batch > max_batch_size:
        raise BadRequest(f"batch size {batch} is over the model's max_batch_size {max_batch_size}")


def _bytes_blob(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def output_blob(datatype: Datatype, array: np.ndarray) -> bytes | memoryview:
    """An output's raw tensor bytes: a view of the array's memory, with no copy."""
    if datatype.name == "BYTES":
        return _bytes_blob(array)
    if not array.size:
        return b""  # a memoryview of a zero-size array cannot be cast to bytes
    return np.ascontiguousarray(array).data.cast("B")


def _json_data(datatype: Datatype, array: np.ndarray) -> object:
    if datatype.name == "BYTES":
        return [
            item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")
            for item in array.reshape(-1)
        ]
    return np.ascontiguousarray(array).reshape(-1)


def _non_finite_data(entries: list[dict[str, object]]) -> bool:
    """Rewrites the JSON data of float outputs holding NaN or an infinity as Triton
    writes them: bare NaN, Infinity and -Infinity tokens (TritonJson::Write uses
    rapidjson's kWriteNanAndInfFlag), which tritonclient (python-rapidjson) and
    Python's json read back as floats. orjson would write null, which reads back as
    None, and as no number at all in a numpy array. Returns whether any output changed.

    Each such output is encoded alone by orjson, so its finite values keep exactly the
    text they have in any other response, and its nulls are replaced by the tokens."""
    changed = False
    for entry in entries:
        data = entry.get("data")
        if not isinstance(data, np.ndarray) or data.dtype.kind != "f":
            continue
        finite = np.isfinite(data)
        if finite.all():
            continue
        items = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
        for index in np.flatnonzero(~finite).tolist():
            value = data[index]
            items[index] = b"NaN" if np.isnan(value) else b"Infinity" if value > 0 else b"-Infinity"
        entry["data"] = orjson.Fragment(b"[" + b",".join(items) + b"]")
        changed = True
    return changed


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    meta: ModelMetadata,
) -> tuple[bytes, int | None]:
    """Encodes the outputs a request asked for.

    Returns:
        The body and, when any output is binary, the length of its JSON part (the
        value of the `Inference-Header-Content-Length` response header).
    """
    wanted = request.outputs or meta.every_output[request.binary_output]
    specs = meta.outputs_by_name
    entries = []
    blobs: list[bytes | memoryview] = []
    for output in wanted:
        array = outputs[output.name]
        datatype = specs[output.name].datatype
        entry: dict[str, object] = {
            "name": output.name,
            "datatype": datatype.name,
            "shape": list(array.shape),
        }
        if output.binary:
            blob = output_blob(datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(datatype, array)
        entries.append(entry)
    document: dict[str, object] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    # orjson writes NaN and infinities as null: a float output holding one is written
    # again (see `_non_finite_data`). A byte search is the whole cost for the others.
    if b"null" in header and _non_finite_data(entries):
        header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
