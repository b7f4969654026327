"""Hypothesis strategies for tests/test_fuzz.py: infer requests that are valid, or valid
but for a few mutations, HTTP paths and header sets.

Every generated request is well-formed at the HTTP layer (the raw client in
test_fuzz.py frames it); what is fuzzed is what tidegate itself parses. An infer
case remembers whether any mutation was applied: an untouched one must be
answered 200 with onnxruntime's outputs, a mutated one anything but a 5xx.
"""

import gzip
import json
import struct
import zlib
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
from hypothesis import strategies as st

from tests.shipped import ShippedVersion

# -- JSON text, with the literals a JSON encoder will not write ------------------------


class Raw(str):
    """JSON text written as is: NaN, 1e400, nesting deeper than a parser allows..."""


def to_json(value: object, ascii: bool = True) -> str:
    """JSON text for `value`; `Raw` parts are inserted verbatim. With `ascii`, strings
    are ASCII-escaped (a lone surrogate as a \\udxxx escape); without, written as they
    are (encode the text with "surrogatepass" to send one as invalid UTF-8)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        items = (
            f"{json.dumps(k, ensure_ascii=ascii)}:{to_json(v, ascii)}" for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v, ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii)


def has_raw(value: object) -> bool:
    """Whether `value` holds Raw text (which may not even be valid JSON) or a lone
    surrogate (which no JSON parser should take): whether it may spoil a request."""
    if isinstance(value, Raw):
        return True
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, dict):
        return any(has_raw(k) or has_raw(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_raw(v) for v in value)
    return False


def _nest(opening: str, closing: str, depth: int, core: str = "1") -> Raw:
    return Raw(opening * depth + core + closing * depth)


SPECIAL_NUMBERS = [
    Raw(text)
    for text in (
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
        "-0",
        "-0.0",
        "1E+2",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "1" + "0" * 400,
        "0." + "0" * 400 + "1",
        "01",
        ".5",
        "5.",
        "0x10",
        "+1",
    )
]
DEEP = [_nest("[", "]", depth) for depth in (63, 64, 65, 100, 1023, 1024, 1025, 5000)] + [
    _nest('{"a":', "}", depth) for depth in (100, 1024, 1025, 5000)
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(SPECIAL_NUMBERS),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u2028", "\ufeff", "\U0010ffff"]),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
) | st.sampled_from(DEEP)


def pick(*options: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """One of `options`, each as likely (st.one_of flattens nested unions, so that a
    strategy beside a large union is rarely drawn); shrinks towards the first."""
    return st.integers(0, len(options) - 1).flatmap(lambda index: options[index])


def sometimes(draw: st.DrawFn, one_in: int = 6) -> bool:
    """True about once in `one_in` draws; shrinks towards False (no mutation)."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


class Text(str):
    """A string that hypothesis reports shortened when it is long."""

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:
        shown = repr(str(self)) if len(self) < 500 else f"{str(self)[:200]!r}... ({len(self)})"
        printer.text(shown)  # type: ignore[attr-defined]


# -- what is served ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An infer path and the model file that answers it."""

    model: str
    version: int | None  # None: the stable version's path
    shipped: ShippedVersion
    input: str
    datatype: str
    width: int

    @property
    def path(self) -> str:
        if self.version is None:
            return f"/v2/models/{self.model}/infer"
        return f"/v2/models/{self.model}/versions/{self.version}/infer"


DIGITS = ShippedVersion("digits", 1)
BREAST_CANCER = [ShippedVersion("breast_cancer", 1), ShippedVersion("breast_cancer", 2)]
TARGETS = [
    Target("digits", None, DIGITS, "input", "FP32", 64),
    Target("digits", 1, DIGITS, "input", "FP32", 64),
    Target("breast_cancer", None, BREAST_CANCER[1], "input", "FP32", 30),
    Target("breast_cancer", 1, BREAST_CANCER[0], "input", "FP32", 30),
    Target("breast_cancer", 2, BREAST_CANCER[1], "input", "FP32", 30),
    Target("diabetes", None, ShippedVersion("diabetes", 1), "input", "FP64", 10),
    Target("dataset_topic", None, ShippedVersion("dataset_topic", 1), "text", "BYTES", 1),
    # A copy of digits whose config.toml sets [validation] reject_nan = true.
    Target("strict", None, DIGITS, "input", "FP32", 64),
]
OUTPUTS = {
    "digits": ["label", "probabilities"],
    "breast_cancer": ["label", "probabilities"],
    "diabetes": ["variable"],
    "dataset_topic": ["label", "probabilities"],
    "strict": ["label", "probabilities"],
}
DATATYPE_NAMES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
    "fp32",
    "FP32 ",
    "",
]
PARAMETER_NAMES = [
    "binary_data_size",
    "binary_data",
    "binary_data_output",
    "timeout",
    "classification",
    "routing_key",
    "priority",
    "sequence_id",
    "sequence_start",
    "headers",
    "shared_memory_region",
]


@dataclass
class InferCase:
    """One infer request; `clean` when no mutation touched it, so that it must succeed."""

    target: Target
    path: str
    body: bytes
    headers: list[tuple[str, str]]
    feeds: dict[str, np.ndarray]
    outputs: list[str] | None  # the outputs asked for, in order (None: all of them)
    request_id: str | None
    primary: str | None = None  # the mutation this case is sure to get, if any
    sets_timeout: bool = False  # a mutated `timeout` parameter: 503 if it expires queued
    clean: bool = True
    notes: list[str] = field(default_factory=list)

    def mutated(self, note: str) -> None:
        self.clean = False
        self.notes.append(note)

    def wants(self, draw: st.DrawFn, kind: str) -> bool:
        """Whether to apply mutation `kind`: always if it is the primary one, else rarely."""
        return kind == self.primary or sometimes(draw, 40)

    def mutates(self, draw: st.DrawFn, kind: str) -> bool:
        """`wants`, recording the mutation when it is applied."""
        if self.wants(draw, kind):
            self.mutated(kind)
            return True
        return False


MUTATIONS = [
    "path",
    "input name",
    "input datatype",
    "input shape",
    "input data",
    "input parameters",
    "input without",
    "input key",
    "binary_data_size",
    "binary blob",
    "inputs",
    "no inputs",
    "outputs",
    "outputs not a list",
    "request parameters",
    "id",
    "top-level key",
    "whole body",
    "Inference-Header-Content-Length",
    "trailing bytes",
    "oversized",
    "content encoding",
]


def _values(target: Target, count: int) -> st.SearchStrategy[list[object]]:
    if target.datatype == "BYTES":
        element: st.SearchStrategy[object] = st.text(max_size=30)
    elif target.datatype == "FP32":
        # Any float32 (without the rejection sampling of floats(width=32)).
        element = st.floats(-3.4e38, 3.4e38).map(lambda x: float(np.float32(x)))
    else:
        element = st.floats(allow_nan=False, allow_infinity=False)
    return st.lists(element, min_size=count, max_size=count)


def _array(target: Target, flat: list[object], rows: int) -> np.ndarray:
    dtype = {"FP32": np.float32, "FP64": np.float64, "BYTES": object}[target.datatype]
    array = np.empty(len(flat), dtype=dtype)
    array[:] = flat
    return array.reshape(rows, target.width)


def _blob(target: Target, array: np.ndarray) -> bytes:
    """The binary tensor data extension's bytes for `array`."""
    if target.datatype != "BYTES":
        return array.astype(array.dtype.newbyteorder("<")).tobytes()
    parts = []
    for item in array.reshape(-1):
        data = item.encode("utf-8")
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def _nested(flat: list[object], rows: int, width: int) -> list[object]:
    return [flat[r * width : (r + 1) * width] for r in range(rows)]


@st.composite
def _mutated_data(draw: st.DrawFn, flat: list[object], target: Target) -> object:
    kind = draw(st.sampled_from(["element", "length", "ragged", "any", "deep", "strings", "bools"]))
    if kind == "element" and flat:
        changed = list(flat)
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.integers(0, len(changed) - 1))
            changed[index] = draw(json_values)
        return changed
    if kind == "length":
        extra = draw(st.integers(1, 3))
        return flat[:-extra] if flat and draw(st.booleans()) else flat + flat[:extra] + [0.5]
    if kind == "ragged" and flat:
        return [flat[: len(flat) // 2 + 1], flat[len(flat) // 2 + 1 :], [flat[0]]]
    if kind == "deep":
        return draw(st.sampled_from(DEEP))
    if kind == "strings":
        return [str(v) for v in flat] or ["1"]
    if kind == "bools":
        return [True] * max(len(flat), 1)
    return draw(json_values)


SHAPE_MUTATIONS = pick(
    # the right rank, extreme sizes: the data (JSON or binary) cannot match them
    st.tuples(st.sampled_from([0, 2, 2**31, 2**32, 10**12, 2**63 - 1, 2**64 - 1]), st.just(-1)),
    st.lists(st.integers(-(2**64), 2**64), max_size=4),
    st.lists(st.sampled_from([-1, 0, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), max_size=3),
    json_values,
)


@st.composite
def _input_entry(
    draw: st.DrawFn, case: InferCase, target: Target, rows: int, flat: list[object]
) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": target.input,
        "datatype": target.datatype,
        "shape": [rows, target.width],
    }
    if sometimes(draw, 4):
        entry["data"] = _nested(flat, rows, target.width)
    else:
        entry["data"] = flat
    if case.mutates(draw, "input name"):
        entry["name"] = draw(
            pick(
                st.sampled_from(["text", "input", "Input", "inpüt", "", "input\x00"]),
                scalars,
                json_values,
            )
        )
    if case.mutates(draw, "input datatype"):
        entry["datatype"] = draw(pick(st.sampled_from(DATATYPE_NAMES), scalars, json_values))
    if case.mutates(draw, "input shape"):
        shape = draw(SHAPE_MUTATIONS)
        entry["shape"] = [shape[0], target.width] if isinstance(shape, tuple) else shape
    if case.mutates(draw, "input data"):
        entry["data"] = draw(_mutated_data(flat, target))
    if case.mutates(draw, "input parameters"):
        entry["parameters"] = draw(
            pick(
                st.dictionaries(st.sampled_from(PARAMETER_NAMES), json_values, max_size=3),
                json_values,
            )
        )
    if case.wants(draw, "input without"):
        key = draw(st.sampled_from(["name", "datatype", "shape", "data"]))
        case.mutated(f"input without {key}")
        del entry[key]
    if case.wants(draw, "input key"):
        key = draw(pick(st.sampled_from(["parameters", "data", "shape"]), st.text(max_size=10)))
        entry[key] = value = draw(json_values)
        if key in {"name", "datatype", "shape", "data", "parameters"} or has_raw(value):
            case.mutated(f"input key {key!r}")  # other keys are ignored
    return entry


@st.composite
def _outputs(draw: st.DrawFn, case: InferCase, model: str) -> object:
    names = OUTPUTS.get(model, ["label"])
    chosen = draw(st.lists(st.sampled_from(names), unique=True, min_size=1))
    entries: list[object] = []
    for name in chosen:
        entry: dict[str, object] = {"name": name}
        if draw(st.booleans()):
            entry["parameters"] = {"binary_data": draw(st.booleans())}
        entries.append(entry)
    case.outputs = chosen
    if case.mutates(draw, "outputs"):
        index = draw(st.integers(0, len(entries)))
        junk = draw(
            pick(
                st.fixed_dictionaries(
                    {"name": pick(st.sampled_from([*names, "nope", ""]), scalars, json_values)},
                    optional={
                        "parameters": pick(
                            st.dictionaries(
                                st.sampled_from(PARAMETER_NAMES), json_values, max_size=3
                            ),
                            json_values,
                        )
                    },
                ),
                json_values,
            )
        )
        entries.insert(index, junk)
    if case.mutates(draw, "outputs not a list"):
        return draw(json_values)
    return entries


CLEAN_PARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "binary_data_output": st.booleans(),
        # 0 means no timeout (as in Triton); 60 s is never reached here.
        "timeout": st.sampled_from([0, 60_000_000, 2**63 - 1]),
        "routing_key": st.text(max_size=10),
        "priority": st.integers(0, 10),
    },
)


def _encode(draw: st.DrawFn, case: InferCase, body: bytes) -> bytes:
    """Maybe compresses the body and sets Content-Encoding; sometimes wrongly."""
    encoding = draw(
        st.sampled_from([None, None, None, "identity", "gzip", "GZIP", " gzip ", "deflate"])
    )
    if encoding is not None:
        case.headers.append(("Content-Encoding", encoding))
        name = encoding.strip().lower()
        if name == "gzip":
            body = gzip.compress(body, compresslevel=1)
        elif name == "deflate":
            body = zlib.compress(body, 1)
    if case.mutates(draw, "content encoding"):
        mutation = draw(
            st.sampled_from(
                ["token", "truncate", "junk", "random", "raw-deflate", "twice", "no-header"]
            )
        )
        if mutation == "token":
            case.headers.append(
                (
                    "Content-Encoding",
                    draw(
                        pick(
                            st.sampled_from(
                                ["br", "zstd", "compress", "x-gzip", "gzip, deflate", "", "*"]
                            ),
                            st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF)).map(
                                lambda text: text.replace("\x7f", "")
                            ),
                        )
                    ),
                )
            )
        elif mutation == "truncate" and body:
            body = body[: draw(st.integers(0, len(body) - 1))]
        elif mutation == "junk":
            body += draw(st.binary(min_size=1, max_size=64))
        elif mutation == "random":
            case.headers.append(("Content-Encoding", draw(st.sampled_from(["gzip", "deflate"]))))
            body = draw(st.binary(max_size=200))
        elif mutation == "raw-deflate":
            compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
            case.headers.append(("Content-Encoding", "deflate"))
            body = compressor.compress(body) + compressor.flush()
        elif mutation == "twice":
            case.headers.append(("Content-Encoding", "gzip"))
            body = gzip.compress(gzip.compress(body))
        else:
            case.headers = [(k, v) for k, v in case.headers if k != "Content-Encoding"]
    return body


IHCL = "Inference-Header-Content-Length"
IHCL_VALUES = pick(
    st.integers(-(2**64), 2**64).map(str),
    st.sampled_from(["", " ", "+12", "0x10", "1e3", "12.0", "\u0661\u0662", "12 12", "-0", "0"]),
    st.sampled_from([20, 4300, 4301, 10_000]).map(lambda n: "9" * n),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=12),
)


@st.composite
def infer_cases(draw: st.DrawFn) -> InferCase:
    """A V2 infer request, JSON or binary, maybe compressed, maybe mutated."""
    target = draw(st.sampled_from(TARGETS))
    rows = draw(st.integers(1, 3))
    flat = draw(_values(target, rows * target.width))
    array = _array(target, flat, rows)
    case = InferCase(target, target.path, b"", [], {target.input: array}, None, None)
    # About one case in four is left clean; the others get one chosen mutation (and
    # rarely more), so that every kind of mutation is tried often.
    case.primary = draw(st.sampled_from([None] * 7 + MUTATIONS))
    if case.mutates(draw, "path"):
        case.path = draw(
            st.sampled_from(
                [
                    f"/v2/models/{target.model}/versions/0/infer",
                    f"/v2/models/{target.model}/versions/3/infer",
                    f"/v2/models/{target.model}/versions/01/infer",
                    "/v2/models/no_such_model/infer",
                    "/v2/models//infer",
                    f"/v2/models/{target.model}/versions//infer",
                    f"/v2/models/{target.model}/infer/",
                    f"/v2/models/{target.model}/versions/1/2/infer",
                    f"/v2/models/{target.model}/versions/%D9%A1/infer",
                ]
            )
        )

    entry = draw(_input_entry(case, target, rows, flat))
    binary = "data" in entry and (
        case.primary in ("binary_data_size", "binary blob") or draw(st.booleans())
    )
    blob = b""
    if binary:
        blob = _blob(target, array)
        del entry["data"]
        parameters = entry.get("parameters")
        if isinstance(parameters, dict):
            parameters.setdefault("binary_data_size", len(blob))
        elif "parameters" not in entry:
            entry["parameters"] = {"binary_data_size": len(blob)}
        if case.mutates(draw, "binary_data_size"):
            entry["parameters"] = {"binary_data_size": draw(pick(scalars, json_values))}
        if case.mutates(draw, "binary blob"):
            blob = draw(
                pick(
                    st.sampled_from(
                        [blob[: len(blob) // 2], blob + b"\0", blob[1:], b"", blob * 2]
                    ),
                    st.binary(max_size=600),
                )
            )

    document: dict[str, object] = {"inputs": [entry]}
    if case.mutates(draw, "inputs"):
        document["inputs"] = draw(
            pick(
                st.sampled_from([[], [entry, entry], [entry, {}], [entry, None]]),
                st.lists(json_values, max_size=3).map(lambda extra: [entry, *extra]),
                json_values,
            )
        )
    if case.mutates(draw, "no inputs"):
        del document["inputs"]
    if case.primary in ("outputs", "outputs not a list") or draw(st.booleans()):
        document["outputs"] = draw(_outputs(case, target.model))
    if draw(st.booleans()):
        document["parameters"] = draw(CLEAN_PARAMETERS)
    if case.mutates(draw, "request parameters"):
        document["parameters"] = draw(
            pick(
                st.dictionaries(
                    pick(st.sampled_from(PARAMETER_NAMES), st.text(max_size=5)), json_values
                ),
                json_values,
            )
        )
    parameters = document.get("parameters")
    case.sets_timeout = isinstance(parameters, dict) and "timeout" in parameters and not case.clean
    if case.wants(draw, "id"):
        document["id"] = request_id = draw(json_values)
        if has_raw(request_id):
            case.mutated("id")
        elif isinstance(request_id, str):
            case.request_id = request_id
    elif draw(st.booleans()):
        document["id"] = case.request_id = draw(st.text(max_size=20))
    if case.wants(draw, "top-level key"):
        key = draw(pick(st.sampled_from(["inputs", "outputs", "parameters"]), st.text(max_size=8)))
        document[key] = value = draw(json_values)
        if key in {"inputs", "outputs", "parameters", "id"} or has_raw(value):
            case.mutated(f"top-level key {key!r}")  # other keys are ignored
        if key == "id":
            case.request_id = value if isinstance(value, str) and not has_raw(value) else None

    text = to_json(document, ascii=draw(st.booleans()))
    header = text.encode("utf-8", "surrogatepass")
    if case.mutates(draw, "whole body"):
        header = draw(
            pick(
                st.sampled_from(
                    [
                        header[: len(header) // 2],
                        b"\xef\xbb\xbf" + header,
                        header + b"\xff",
                        header.replace(b"{", b"[", 1),
                        b"null",
                        b"",
                    ]
                ),
                st.binary(max_size=300),
            )
        )
    case.body = header + blob
    if binary or case.primary == "Inference-Header-Content-Length" or sometimes(draw, 12):
        if binary:
            case.headers.append((IHCL, str(len(header))))
        if case.mutates(draw, "Inference-Header-Content-Length"):
            case.headers = [(k, v) for k, v in case.headers if k != IHCL]
            for _ in range(draw(st.integers(0, 2))):
                case.headers.append((IHCL, draw(IHCL_VALUES)))
    if case.mutates(draw, "trailing bytes"):
        case.body += draw(st.binary(min_size=1, max_size=100))
    if case.mutates(draw, "oversized"):
        # Past the server's --max-body-size (test_fuzz.py: 64 KiB), before or after
        # compression: 413.
        padding = draw(st.sampled_from([64 * 1024, 100_000, 1_000_000]))
        case.body = case.body[:1] + b" " * padding + case.body[1:]
    case.body = _encode(draw, case, case.body)
    return case


# -- paths, methods and headers ----------------------------------------------------

# Methods llhttp (httptools) parses; anything else is refused before tidegate runs.
METHODS = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "PROPFIND",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "PURGE",
    "REPORT",
    "MERGE",
    "NOTIFY",
    "SUBSCRIBE",
    "LINK",
    "UNLINK",
]
MODEL_NAMES = ["digits", "breast_cancer", "diabetes", "dataset_topic", "strict", "victim"]
WORDS = [
    "v2",
    "models",
    "versions",
    "infer",
    "ready",
    "live",
    "health",
    "config",
    "stats",
    "drift",
    "state",
    "repository",
    "index",
    "load",
    "traffic",
    "rollout",
    "promote",
    "rollback",
    "metrics",
    "no_such_model",
    ".",
    "..",
    "",
    "%",
    "%2",
    "%ZZ",
    "%00",
    "%2F",
    "%2e%2e",
    "%C3%A9",
    "%FF",
    "%ED%A0%80",
]
VERSION_WORDS = [
    "1",
    "2",
    "3",
    "0",
    "01",
    "-1",
    "1.0",
    "+1",
    " 1",
    "1e3",
    "0x1",
    "true",
    "null",
    "18446744073709551616",
    "9" * 4300,
    "9" * 4301,
    "\u00b2",  # superscript two: str.isdigit() takes it, int() refuses it
    "\u0661",  # Arabic-Indic digit one: str.isdigit() and int() both accept it
    "\U0001d7cf",  # mathematical bold digit one: the same
]
# Unreserved and sub-delims characters that may stand unencoded in a path segment.
SAFE = "-._~!$&'()*+,;=:@"


@st.composite
def segments(draw: st.DrawFn) -> str:
    """One path segment: a word of the API, a model name, a version, or random text,
    percent-encoded (sometimes leaving the characters a path may carry raw)."""
    kind = draw(st.sampled_from(["word", "model", "version", "text", "long"]))
    if kind == "word":
        return draw(st.sampled_from(WORDS))
    if kind == "model":
        return draw(st.sampled_from(MODEL_NAMES))
    if kind == "version":
        return quote(draw(st.sampled_from(VERSION_WORDS)), safe="")
    if kind == "long":
        size = draw(st.sampled_from([256, 4096, 30_000]))
        unit = draw(st.sampled_from(["a", "%41", ".", "%C3%A9", "a9"]))
        return unit * (size // len(unit))
    text = draw(st.text(max_size=20))
    return quote(text, safe=draw(st.sampled_from(["", SAFE])))


ENDPOINTS = ["ready", "config", "stats", "drift", "infer", "traffic", "rollout", "versions"]


def _slot(choices: list[str]) -> st.SearchStrategy[str]:
    """A path slot: usually a value the API knows, else any segment."""
    return pick(st.sampled_from(choices), st.sampled_from(choices), segments())


@st.composite
def paths(draw: st.DrawFn) -> str:
    """A request target under /v2: a template of the API with slots filled at random,
    or random segments, with an optional query string."""
    model = _slot(MODEL_NAMES)
    version = pick(st.sampled_from(VERSION_WORDS).map(lambda v: quote(v, safe="")), segments())
    endpoint = _slot(ENDPOINTS)
    parts = draw(
        pick(
            st.tuples(st.just("models"), model),
            st.tuples(st.just("models"), model, endpoint),
            st.tuples(st.just("models"), model, st.just("versions"), version),
            st.tuples(st.just("models"), model, st.just("versions"), version, endpoint),
            st.tuples(
                st.just("models"), model, st.just("versions"), version, st.just("drift/state")
            ),
            st.tuples(
                st.just("repository/models"),
                model,
                st.just("load"),
            ),
            st.tuples(st.just("health"), _slot(["live", "ready"])),
            st.tuples(_slot(["models", "health", "repository", "stats"])),
            st.lists(segments(), max_size=6),
        )
    )
    path = "/v2/" + "/".join(parts)
    if sometimes(draw, 4):
        at = draw(st.integers(1, len(path)))
        path = path[:at] + draw(st.sampled_from(["/", "//", "/./", "/../", "%2F"])) + path[at:]
    if sometimes(draw, 4):
        query = draw(st.text(max_size=20))
        path += "?" + quote(query, safe="=&" + draw(st.sampled_from(["", SAFE])))
    # httptools refuses a request target over 64 KiB before the application sees it.
    return Text(path[:60_000])


HEADER_NAMES = [
    "Content-Type",
    "Content-Encoding",
    IHCL,
    "Accept",
    "Accept-Encoding",
    "Authorization",
    "tidegate-routing-key",
    "Expect",
    "Connection",
    "Host",
    "Cookie",
    "Range",
    "If-None-Match",
    "X-Forwarded-For",
    "X-Request-Id",
    "Upgrade",
    "TE",
    "Trailer",
    "Keep-Alive",
]
# RFC 9110 token characters: what a header name is made of.
TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
header_names = pick(st.sampled_from(HEADER_NAMES), st.text(TCHAR, min_size=1, max_size=30))
# Field values: visible ASCII, spaces and tabs inside, obs-text (0x80-0xFF).
header_values = pick(
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=60,
    ).map(str.strip),
    st.sampled_from(
        [
            "100-continue",
            "gzip",
            "deflate",
            "identity",
            "application/json",
            "application/octet-stream",
            "Bearer x",
            "keep-alive",
            "close",
            "upgrade",
            "websocket",
            "h2c",
            "bytes=0-1",
            "trailers",
            "0",
            "-1",
            "9" * 300,
        ]
    ),
)
header_sets = st.lists(st.tuples(header_names, header_values), max_size=8)
