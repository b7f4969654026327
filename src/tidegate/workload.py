"""The request pool of `tidegate bench`: V2 infer request bodies, encoded before the load starts.

A load generator measures the server only if the client is not the bottleneck. Encoding a
request (building the JSON, flattening tensors, packing binary data) costs about as much
as the server spends decoding it, so doing it per request would put the client on the
critical path and make the measured latency partly the client's. Instead a small pool of
requests is encoded once, up front, and the hot loop only cycles through it sending bytes.

Three sources fill the pool:

- `random_requests`: random data shaped by the model's V2 metadata (`input_specs` reads
  it), for any model without sample data; deterministic for a seed.
- `npz_requests`: real rows from a `.npz` file holding one array per input name (a shipped
  model's `reference.npz`), cut into consecutive batches.
- `json_requests`: V2 request objects from a JSON file, sent exactly as written, for inputs
  neither of the others can describe.

Bodies use either the V2 JSON encoding or Triton's binary tensor data extension, which any
of tidegate, Triton and MLServer accept: a JSON header (its length travels in the
`Inference-Header-Content-Length` HTTP header) followed by the raw tensors. This module
imports no server code, so it can drive any V2 server.
"""

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from tidegate.protocol import DATATYPES, Datatype

__all__ = [
    "InputSpec",
    "PreparedRequest",
    "encode_request",
    "input_specs",
    "json_requests",
    "npz_requests",
    "random_requests",
]

_LENGTH = struct.Struct("<I")
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """One encoded infer request, ready to send as is."""

    body: bytes
    header_length: int | None  # Inference-Header-Content-Length for a binary body, else None
    rows: int  # rows (first-dimension length) the request carries

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """A model input as V2 model metadata describes it; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def input_specs(metadata: dict[str, object]) -> list[InputSpec]:
    """The inputs of a V2 model-metadata document (`GET /v2/models/{model}`).

    Raises:
        ValueError: the document has no usable `inputs` list, or an input lacks a name,
            has a datatype tidegate does not know, or a shape that is not a list of
            integers >= -1.
    """
    raw = metadata.get("inputs")
    if not isinstance(raw, list) or not raw:
        raise ValueError(
            "model metadata has no 'inputs' list; the server does not describe the model's "
            "inputs, so give the request data as a JSON file instead"
        )
    specs: list[InputSpec] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"model metadata: input {index} is not a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"model metadata: input {index} has no name")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ValueError(
                f"model metadata: input '{name}' has datatype {datatype!r}, not one of "
                f"{', '.join(DATATYPES)}"
            )
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(dim) is int and dim >= -1 for dim in shape):
            raise ValueError(
                f"model metadata: input '{name}' has shape {shape!r}, not a list of "
                "integers (-1 for a dynamic dimension)"
            )
        if any(spec.name == name for spec in specs):
            raise ValueError(f"model metadata: input '{name}' is listed twice")
        specs.append(InputSpec(name, datatype, tuple(shape)))
    return specs


def _datatype(name: str, datatype: str) -> Datatype:
    found = DATATYPES.get(datatype)
    if found is None:
        raise ValueError(
            f"input '{name}': datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
        )
    return found


def _bytes_element(name: str, item: object) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytes):
        return item
    raise ValueError(f"input '{name}': a BYTES element must be str or bytes, not {type(item)}")


def _bytes_text(name: str, item: object) -> str:
    if isinstance(item, str):
        return item
    try:
        return _bytes_element(name, item).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"input '{name}': a BYTES element is not UTF-8 text, which JSON cannot carry; "
            "use the binary encoding"
        ) from exc


def _fixed(name: str, datatype: Datatype, array: np.ndarray) -> np.ndarray:
    """The array flat, C-contiguous, little-endian in the datatype's numpy type."""
    if array.dtype.kind in "USO":
        raise ValueError(f"input '{name}': {array.dtype} data cannot be sent as {datatype.name}")
    return np.ascontiguousarray(array, dtype=datatype.numpy.newbyteorder("<")).reshape(-1)


def encode_request(
    arrays: dict[str, np.ndarray],
    datatypes: dict[str, str],
    binary: bool,
    outputs_binary: bool | None = None,
) -> tuple[bytes, int | None]:
    """Encodes one V2 infer request carrying `arrays` (in their order), every output asked for.

    Args:
        arrays: the input tensors by name; fixed-size data is cast to the datatype's numpy
            type, BYTES data is an array of `str` (sent as UTF-8) or `bytes`.
        datatypes: the V2 datatype name of each input.
        binary: send the tensors as binary data after a JSON header (Triton's binary
            tensor data extension) instead of as JSON lists.
        outputs_binary: ask for binary outputs (`binary_data_output`); None: as `binary`.

    Returns:
        The body, and for a binary body the length of its JSON header (the value of the
        `Inference-Header-Content-Length` HTTP header); None for a JSON body.

    Raises:
        ValueError: no inputs, an input without a known datatype, data that does not fit
            its datatype, or NaN or infinity in a JSON body (JSON has no way to write them).
    """
    if not arrays:
        raise ValueError("a request needs at least one input")
    entries: list[dict[str, object]] = []
    blobs: list[bytes] = []
    for name, array in arrays.items():
        if name not in datatypes:
            raise ValueError(f"input '{name}' has no datatype")
        datatype = _datatype(name, datatypes[name])
        entry: dict[str, object] = {
            "name": name,
            "datatype": datatype.name,
            "shape": [int(dim) for dim in array.shape],
        }
        if datatype.name == "BYTES":
            items = np.asarray(array, dtype=object).reshape(-1).tolist()
            if binary:
                blob = b"".join(
                    _LENGTH.pack(len(data)) + data
                    for data in (_bytes_element(name, item) for item in items)
                )
            else:
                entry["data"] = [_bytes_text(name, item) for item in items]
        else:
            flat = _fixed(name, datatype, array)
            if binary:
                blob = flat.tobytes()
            else:
                if flat.dtype.kind == "f" and not np.isfinite(flat).all():
                    raise ValueError(
                        f"input '{name}' holds NaN or infinity, which JSON cannot carry; "
                        "use the binary encoding"
                    )
                # orjson writes numpy arrays natively, native byte order only.
                entry["data"] = flat.astype(datatype.numpy, copy=False)
        if binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        entries.append(entry)
    document: dict[str, object] = {"inputs": entries}
    if outputs_binary is None:
        outputs_binary = binary
    if outputs_binary:
        document["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _concrete_shape(spec: InputSpec, batch_size: int) -> tuple[int, ...]:
    """The spec's shape with its first dynamic dimension `batch_size` and any others 1."""
    shape: list[int] = []
    batched = False
    for dim in spec.shape:
        if dim == -1:
            shape.append(1 if batched else batch_size)
            batched = True
        else:
            shape.append(dim)
    return tuple(shape)


def _random_words(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    lengths = rng.integers(3, 9, size=count)
    letters = _LETTERS[rng.integers(0, len(_LETTERS), size=int(lengths.sum()))].tobytes()
    words = np.empty(count, dtype=object)
    offset = 0
    for index, length in enumerate(lengths.tolist()):
        words[index] = letters[offset : offset + length].decode("ascii")
        offset += length
    return words.reshape(shape)


def _random_array(
    rng: np.random.Generator, datatype: Datatype, shape: tuple[int, ...]
) -> np.ndarray:
    kind = datatype.numpy.kind
    if datatype.name == "BYTES":
        return _random_words(rng, shape)
    if kind == "f":
        return rng.standard_normal(shape).astype(datatype.numpy)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, 10, size=shape, dtype=datatype.numpy)


def _check_pool(batch_size: int, count: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {batch_size}")
    if count < 1:
        raise ValueError(f"the pool needs at least one request, not {count}")


def random_requests(
    specs: list[InputSpec], batch_size: int, binary: bool, count: int = 16, seed: int = 0
) -> list[PreparedRequest]:
    """`count` requests of random data shaped as the model's inputs, the same for a seed.

    Each input's first dynamic dimension is `batch_size` and any other dynamic dimension 1.
    Floats are standard normal, integers in [0, 10), BOOL a fair coin, BYTES lowercase ASCII
    words of 3 to 8 letters. `rows` is the first dimension of the first input.
    """
    _check_pool(batch_size, count)
    if not specs:
        raise ValueError("the model has no inputs")
    rng = np.random.default_rng(seed)
    datatypes = {spec.name: spec.datatype for spec in specs}
    types = {spec.name: _datatype(spec.name, spec.datatype) for spec in specs}
    shapes = {spec.name: _concrete_shape(spec, batch_size) for spec in specs}
    rows = _rows(shapes[specs[0].name])
    pool = []
    for _ in range(count):
        arrays = {
            spec.name: _random_array(rng, types[spec.name], shapes[spec.name]) for spec in specs
        }
        body, header_length = encode_request(arrays, datatypes, binary)
        pool.append(PreparedRequest(body, header_length, rows))
    return pool


def _npz_array(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    datatype = _datatype(spec.name, spec.datatype)
    if array.ndim == 0:
        raise ValueError(f"{path}: array '{spec.name}' is a scalar, not rows")
    if len(array.shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape[1:], array.shape[1:], strict=True)
    ):
        raise ValueError(
            f"{path}: array '{spec.name}' has shape {list(array.shape)}, which does not fit "
            f"the input's shape {list(spec.shape)}"
        )
    is_text = array.dtype.kind in "USO"
    if (datatype.name == "BYTES") != is_text:
        raise ValueError(
            f"{path}: array '{spec.name}' holds {array.dtype} data but the input takes "
            f"{datatype.name}"
        )
    if is_text:
        return array.astype(object)
    return array.astype(datatype.numpy)


def npz_requests(
    path: Path, specs: list[InputSpec], batch_size: int, binary: bool, count: int = 64
) -> list[PreparedRequest]:
    """Requests made of consecutive `batch_size`-row slices of the arrays in a `.npz` file.

    The file holds one array per input name, rows on axis 0 (as a shipped model's
    `reference.npz` does). Slice i starts at row `i * batch_size`, wrapping around past the
    last row; the pool stops at `count` requests, or earlier where the slices would start
    repeating. String arrays are sent as BYTES, others cast to the input's datatype.

    Raises:
        ValueError: the file lacks an input, its arrays disagree on the number of rows or
            hold fewer than `batch_size`, or an array does not fit its input.
    """
    _check_pool(batch_size, count)
    if not specs:
        raise ValueError("the model has no inputs")
    with np.load(path, allow_pickle=False) as npz:
        for spec in specs:
            if spec.name not in npz.files:
                raise ValueError(
                    f"{path} has no array for input '{spec.name}' "
                    f"(it holds: {', '.join(npz.files) or 'nothing'})"
                )
        arrays = {spec.name: _npz_array(path, spec, npz[spec.name]) for spec in specs}
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{path}: the arrays disagree on the number of rows: {counts}")
    total = counts[specs[0].name]
    if total < batch_size:
        raise ValueError(f"{path} has {total} rows, fewer than the batch size {batch_size}")
    datatypes = {spec.name: spec.datatype for spec in specs}
    # Slice starts run through multiples of gcd(total, batch_size) before repeating.
    distinct = total // math.gcd(total, batch_size)
    pool = []
    for index in range(min(count, distinct)):
        rows = (index * batch_size + np.arange(batch_size)) % total
        batch = {name: array.take(rows, axis=0) for name, array in arrays.items()}
        body, header_length = encode_request(batch, datatypes, binary)
        pool.append(PreparedRequest(body, header_length, batch_size))
    return pool


def _json_rows(first_input: dict[str, object]) -> int:
    shape = first_input.get("shape")
    if isinstance(shape, list) and shape and type(shape[0]) is int:
        return int(shape[0])
    return 1


def json_requests(path: Path) -> list[PreparedRequest]:
    """The V2 infer requests of a JSON file (one request object, or a list of them), as is.

    Each is re-encoded compactly and sent with the JSON protocol; `rows` is the first
    dimension of its first input's shape (1 if it has none).

    Raises:
        ValueError: the file is not JSON, or not a request object or a non-empty list of
            them (an object with a non-empty `inputs` list of objects).
    """
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    requests = document if isinstance(document, list) else [document]
    if not requests:
        raise ValueError(f"{path} holds an empty list, not V2 infer requests")
    pool = []
    for index, request in enumerate(requests):
        where = f"{path}" if isinstance(document, dict) else f"{path}, request {index}"
        if not isinstance(request, dict):
            raise ValueError(
                f"{where}: expected a V2 infer request object, found {type(request).__name__}"
            )
        inputs = request.get("inputs")
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(item, dict) for item in inputs)
        ):
            raise ValueError(
                f"{where}: a V2 infer request needs a non-empty 'inputs' list of objects"
            )
        pool.append(PreparedRequest(orjson.dumps(request), None, _json_rows(inputs[0])))
    return pool
