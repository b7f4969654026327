"""The V2 vocabulary: datatypes and tensor specs, shared by the server and the clients.

One table ties together the names the three worlds use for a datatype: the V2
protocol (`FP32`), numpy (`float32`), ONNX as onnxruntime reports it
(`tensor(float)`) and Triton's model configuration (`TYPE_FP32`).
"""

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DATATYPES",
    "Datatype",
    "ModelMetadata",
    "TensorSpec",
    "datatype_from_onnx",
]


@dataclass(slots=True, frozen=True)
class Datatype:
    """One V2 datatype. `itemsize` is 0 for BYTES, whose elements vary in length."""

    name: str
    numpy: np.dtype
    onnx: str
    triton: str
    itemsize: int


def _fixed(name: str, numpy_name: str, onnx: str, triton: str) -> Datatype:
    dtype = np.dtype(numpy_name)
    return Datatype(name, dtype, f"tensor({onnx})", triton, dtype.itemsize)


DATATYPES: dict[str, Datatype] = {
    dt.name: dt
    for dt in (
        _fixed("BOOL", "bool", "bool", "TYPE_BOOL"),
        _fixed("UINT8", "uint8", "uint8", "TYPE_UINT8"),
        _fixed("UINT16", "uint16", "uint16", "TYPE_UINT16"),
        _fixed("UINT32", "uint32", "uint32", "TYPE_UINT32"),
        _fixed("UINT64", "uint64", "uint64", "TYPE_UINT64"),
        _fixed("INT8", "int8", "int8", "TYPE_INT8"),
        _fixed("INT16", "int16", "int16", "TYPE_INT16"),
        _fixed("INT32", "int32", "int32", "TYPE_INT32"),
        _fixed("INT64", "int64", "int64", "TYPE_INT64"),
        _fixed("FP16", "float16", "float16", "TYPE_FP16"),
        _fixed("FP32", "float32", "float", "TYPE_FP32"),
        _fixed("FP64", "float64", "double", "TYPE_FP64"),
        # onnxruntime takes and returns strings as numpy object arrays of str.
        Datatype("BYTES", np.dtype(object), "tensor(string)", "TYPE_STRING", 0),
    )
}

_BY_ONNX = {dt.onnx: dt for dt in DATATYPES.values()}


def ascii_number(text: str, digits: int = 18) -> int | None:
    """`text` as a whole number if it is 1 to `digits` ASCII digits, else None. Stricter
    than `str.isdigit` (which takes "²" and other digits `int` refuses or reads oddly)
    and bounded (`int` refuses more than 4300 digits): a version, a count or a length
    from a client is parsed by this, never by `int` alone."""
    if not 0 < len(text) <= digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def datatype_from_onnx(onnx_type: str) -> Datatype | None:
    """The V2 datatype for an onnxruntime type string, or None if V2 cannot carry it."""
    return _BY_ONNX.get(onnx_type)


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """A model input or output as V2 metadata describes it; -1 marks a dynamic dimension."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype.name, "shape": list(self.shape)}


# Not frozen, as the other values made per request (see `codec.InferRequest`).
@dataclass(slots=True)
class RequestedOutput:
    """An output a request asks for, and whether in binary (Triton's binary data)."""

    name: str
    binary: bool


@dataclass(slots=True, frozen=True)
class ModelMetadata:
    """The tensors of one model version, in the order the model declares them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Worked out once, not per request: the lookups that decoding and encoding make.
    # True when every input and output has a dynamic first dimension (a batch axis).
    batched: bool = field(init=False)
    inputs_by_name: dict[str, TensorSpec] = field(init=False)
    outputs_by_name: dict[str, TensorSpec] = field(init=False)
    # What a request that names no outputs gets: every output, in JSON (index False)
    # or binary (True).
    every_output: tuple[tuple[RequestedOutput, ...], tuple[RequestedOutput, ...]] = field(
        init=False
    )

    def __post_init__(self) -> None:
        specs = self.inputs + self.outputs
        batched = all(spec.shape and spec.shape[0] == -1 for spec in specs)
        object.__setattr__(self, "batched", batched)
        object.__setattr__(self, "inputs_by_name", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "outputs_by_name", {spec.name: spec for spec in self.outputs})
        every = tuple(
            tuple(RequestedOutput(spec.name, binary) for spec in self.outputs)
            for binary in (False, True)
        )
        object.__setattr__(self, "every_output", every)
