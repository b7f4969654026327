"""Bad input fuzzing against a live server: hypothesis-generated infer bodies (JSON
and binary, compressed or not, alone, together in batches or pipelined), paths,
methods, header sets, control-plane bodies and Authorization headers.

Every answer must be a non-5xx (a 503 only with Retry-After, and only where the
request set a timeout), every 4xx a JSON object with an "error" string, every 200
well-formed; a request no mutation touched must get onnxruntime's own outputs. After
each test the server must still be ready, answer known-good requests exactly as
onnxruntime does, have logged no traceback, and have written a request log of valid
JSON lines.

Requests go over raw sockets, so that what an HTTP client library would refuse or
rewrite is sent as generated; each one is still well-formed HTTP/1.1, so what is
fuzzed is what tidegate parses. Runs are reproducible (derandomized, no example
database); FUZZ_SCALE=N runs N times as many examples.
"""

import hashlib
import http.client
import itertools
import json
import math
import os
import re
import shutil
import socket
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings, strategies as st

from tests.conftest import MODELS, SHIPPED_ONLY, LiveServer
from tests.fuzz_strategies import (
    IHCL,
    METHODS,
    OUTPUTS,
    InferCase,
    header_sets,
    header_values,
    infer_cases,
    json_values,
    paths,
    pick,
    scalars,
    segments,
    to_json,
)
from tests.shipped import (
    ShippedVersion,
    assert_same_output,
    expected_outputs,
    json_request,
    reference_rows,
)

# Longer runs by hand: FUZZ_SCALE=20 multiplies every test's number of examples.
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    # `serving` is one server for every example, checked once after the test: on purpose.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
NUMPY = {
    "BOOL": np.bool_,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": object,
}


# -- a raw HTTP/1.1 client --------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def _header_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def frame(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    chunks: list[int] | None = None,
    close: bool = True,
) -> bytes:
    """The bytes of one HTTP/1.1 request. `chunks`, if given, sends the body with
    `Transfer-Encoding: chunked`, cut at those offsets."""
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: 127.0.0.1"]
    lines += [name.encode("latin-1") + b": " + _header_bytes(value) for name, value in headers]
    if chunks is None:
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        lines.append(b"Transfer-Encoding: chunked")
        cuts = sorted({0, *(c % (len(body) + 1) for c in chunks), len(body)})
        parts = [body[a:b] for a, b in itertools.pairwise(cuts) if b > a]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


class _Unclosed:
    """A socket's reader that HTTPResponse cannot close, to read several answers."""

    def __init__(self, reader: BinaryIO) -> None:
        self.reader = reader

    def makefile(self, *args: object, **kwargs: object) -> "_Unclosed":
        return self

    def __getattr__(self, name: str) -> object:
        return getattr(self.reader, name)

    def close(self) -> None:
        pass


def exchange_all(port: int, requests: list[tuple[str, bytes]]) -> list[Reply]:
    """Sends requests (method, framed bytes) at once on one connection and reads
    their answers in order; fewer answers if the server closes the connection."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(b"".join(request for _, request in requests))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may answer (413) and close before the whole body is sent; read on
        reader = _Unclosed(sock.makefile("rb"))
        for method, _ in requests:
            response = http.client.HTTPResponse(reader, method=method)  # type: ignore[arg-type]
            try:
                response.begin()
            except (http.client.RemoteDisconnected, ConnectionResetError):
                break
            data = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            replies.append(Reply(response.status, headers, data))
            if headers.get("connection") == "close":
                break
    return replies


def exchange(
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    chunks: list[int] | None = None,
) -> Reply:
    """One request on a new connection. A hang is a socket timeout, a crash a
    connection error."""
    replies = exchange_all(port, [(method, frame(method, target, headers, body, chunks))])
    assert replies, "the server closed the connection without an answer"
    return replies[0]


def check_reply(reply: Reply, method: str, *, may_time_out: bool = False) -> None:
    """The invariants of every answer: no 5xx, JSON errors, well-formed 200s."""
    if reply.status == 503 and may_time_out:
        assert "retry-after" in reply.headers
    else:
        assert reply.status < 500, f"{reply.status}: {reply.body[:500]!r}"
    if method == "HEAD":
        assert not reply.body
        return
    if 400 <= reply.status < 600:
        assert reply.headers.get("content-type") == "application/json", reply
        document = reply.json()
        assert isinstance(document, dict)
        assert isinstance(document.get("error"), str)
        assert document["error"]
    elif reply.headers.get("content-type") == "application/json":
        reply.json()


def decode_infer(reply: Reply) -> tuple[dict[str, object], dict[str, np.ndarray], set[str]]:
    """A 200 infer answer's JSON document, its outputs as arrays (JSON or binary), and
    the names of those sent as JSON (where NaN and infinities are null)."""
    assert reply.status == 200
    length = reply.headers.get(IHCL.lower())
    if length is None:
        assert reply.headers["content-type"] == "application/json"
        document = reply.json()
        blob = b""
    else:
        assert reply.headers["content-type"] == "application/octet-stream"
        document = json.loads(reply.body[: int(length)])
        blob = reply.body[int(length) :]
    assert isinstance(document, dict)
    assert reply.headers["tidegate-model-version"] == document["model_version"]
    arrays: dict[str, np.ndarray] = {}
    in_json = set()
    offset = 0
    for entry in document["outputs"]:
        shape, datatype = tuple(entry["shape"]), entry["datatype"]
        count = math.prod(shape)
        if "data" in entry:
            assert "parameters" not in entry or "binary_data_size" not in entry["parameters"]
            data = entry["data"]
            assert len(data) == count
            in_json.add(entry["name"])
            array = np.empty(count, dtype=NUMPY[datatype])
            array[:] = (
                [math.nan if v is None else v for v in data] if datatype[:2] == "FP" else data
            )
        else:
            size = entry["parameters"]["binary_data_size"]
            chunk = blob[offset : offset + size]
            assert len(chunk) == size
            offset += size
            if datatype == "BYTES":
                array = np.empty(count, dtype=object)
                at = 0
                for index in range(count):
                    (n,) = struct.unpack_from("<I", chunk, at)
                    array[index] = chunk[at + 4 : at + 4 + n].decode()
                    at += 4 + n
                assert at == size
            else:
                array = np.frombuffer(chunk, dtype=np.dtype(NUMPY[datatype]).newbyteorder("<"))
                array = array.astype(NUMPY[datatype])
        arrays[entry["name"]] = array.reshape(shape)
    assert offset == len(blob)
    return document, arrays, in_json


def assert_outputs(got: dict[str, np.ndarray], in_json: set[str], want: dict[str, np.ndarray]):
    """Equal to onnxruntime's outputs; JSON has no NaN or infinity, tidegate sends null."""
    for name, array in got.items():
        expected = want[name]
        if name in in_json and expected.dtype.kind == "f":
            finite = np.isfinite(expected)
            np.testing.assert_array_equal(np.isfinite(array), finite, err_msg=name)
            array = np.where(finite, array, expected).astype(array.dtype)
        assert_same_output(array, expected)


# -- the server ---------------------------------------------------------------------------


@dataclass
class Fuzzed:
    live: LiveServer
    log_start: int
    request_log: Path | None
    headers: tuple[tuple[str, str], ...] = ()  # what known-good requests send (a token)

    @property
    def port(self) -> int:
        return self.live.port


def _repository(root: Path) -> Path:
    """A copy of the shipped models plus `strict` (digits refusing NaN/inf) and
    `victim` (breast_cancer's two versions), under `root`."""
    repository = root / "models"
    shutil.copytree(MODELS, repository, ignore=SHIPPED_ONLY)
    shutil.copytree(MODELS / "digits", repository / "strict")
    (repository / "strict" / "config.toml").write_text("[validation]\nreject_nan = true\n")
    shutil.copytree(MODELS / "breast_cancer", repository / "victim")
    return repository


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A server of its own (control requests may load and unload), on the shipped
    models plus `strict` (digits refusing NaN/inf) and `victim` (breast_cancer's two
    versions, for the fuzzed load, unload, traffic and rollout requests to act on)."""
    root = tmp_path_factory.mktemp("fuzz")
    repository = _repository(root)
    live = LiveServer(
        repository,
        # A small body limit, so that fuzzed bodies (padded, or gzip bombs) reach it.
        "--max-body-size",
        str(64 * 1024),
        # Every request and its body in the request log, which must stay valid JSON lines.
        "--request-log",
        str(root / "requests"),
        "--request-log-payload",
        log_path=root / "server.log",
    )
    try:
        yield Fuzzed(live, len(live.log()), root / "requests")
    finally:
        live.stop()


DIGITS = ShippedVersion("digits", 1)
KNOWN_GOOD = [
    ("digits", None, ShippedVersion("digits", 1)),
    ("breast_cancer", "1", ShippedVersion("breast_cancer", 1)),
    ("breast_cancer", None, ShippedVersion("breast_cancer", 2)),
    ("diabetes", None, ShippedVersion("diabetes", 1)),
    ("dataset_topic", None, ShippedVersion("dataset_topic", 1)),
    ("strict", None, ShippedVersion("digits", 1)),
]
INPUT_DATATYPES = {"diabetes": "FP64", "dataset_topic": "BYTES"}


SERVING = {model for model, _, _ in KNOWN_GOOD}


def assert_still_serving(fuzzed: Fuzzed) -> None:
    """Ready, exact answers to known-good requests, working drift and metrics, and
    no traceback in the log since the server started."""
    live = fuzzed.live
    assert live.process.poll() is None, live.log()
    assert live.client.get("/v2/health/ready").status_code == 200
    for model, version, shipped in KNOWN_GOOD:
        feeds = reference_rows(shipped, 7, start=3)
        ((name, array),) = feeds.items()
        datatype = INPUT_DATATYPES.get(model, "FP32")
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        body = json.dumps(json_request(name, datatype, array)).encode()
        reply = exchange(fuzzed.port, "POST", path, fuzzed.headers, body)
        check_reply(reply, "POST")
        document, outputs, in_json = decode_infer(reply)
        assert document["model_version"] == str(shipped.version)
        expected = expected_outputs(shipped, feeds)
        assert list(outputs) == list(expected)
        assert_outputs(outputs, in_json, expected)
    for path in ("/v2/models/digits/drift", "/v2/models/stats"):
        assert live.client.get(path).status_code == 200, path
    metrics = live.client.get("/metrics")
    assert metrics.status_code == 200
    write_errors = re.findall(
        r"^tidegate_request_log_dropped\S*write_error\S* (\S+)$", metrics.text, re.M
    )
    assert all(float(count) == 0 for count in write_errors), write_errors
    if fuzzed.request_log is not None:
        lines = 0
        for path in sorted(fuzzed.request_log.glob("requests.jsonl*")):
            for line in path.read_bytes().splitlines():
                assert isinstance(orjson.loads(line), dict), line[:300]
                lines += 1
        assert lines, "nothing in the request log"
    log = live.log()
    new_log, fuzzed.log_start = log[fuzzed.log_start :], len(log)
    assert "Traceback" not in new_log, new_log[-5000:]
    assert " ERROR " not in new_log, new_log[-5000:]


@pytest.fixture
def serving(fuzzed: Fuzzed) -> Iterator[Fuzzed]:
    """The shared fuzzed server, checked healthy after the test."""
    yield fuzzed
    assert_still_serving(fuzzed)


# -- inference bodies -------------------------------------------------------------------


def _check_infer(case: InferCase, reply: Reply) -> None:
    check_reply(reply, "POST", may_time_out=case.sets_timeout)
    expected = None
    if case.clean:
        try:
            expected = expected_outputs(case.target.shipped, case.feeds)
        except Exception as exc:  # onnxruntime refuses it too (digits with no rows)
            note(f"onnxruntime refuses the request: {exc}")
            assert reply.status == 400, reply.body[:500]
            return
        assert reply.status == 200, reply.body[:500]
    if reply.status != 200:
        return
    document, outputs, in_json = decode_infer(reply)
    if expected is None:
        return
    target = case.target
    assert document["model_name"] == target.model
    assert document["model_version"] == str(target.shipped.version)
    assert document.get("id") == case.request_id
    assert list(outputs) == (case.outputs or OUTPUTS[target.model])
    assert_outputs(outputs, in_json, expected)


@settings(FUZZ, max_examples=450 * SCALE)
@given(case=infer_cases(), chunks=st.none() | st.lists(st.integers(0, 2**20), max_size=4))
def test_fuzzed_infer_requests(serving: Fuzzed, case: InferCase, chunks: list[int] | None):
    """One infer request at a time, its body sometimes sent in chunks."""
    note(f"mutations: {case.notes}")
    note(f"request: POST {case.path} {case.headers} {case.body[:2000]!r}")
    reply = exchange(serving.port, "POST", case.path, case.headers, case.body, chunks)
    event(f"{'clean' if case.clean else 'mutated'}: {reply.status}")
    _check_infer(case, reply)


@settings(FUZZ, max_examples=40 * SCALE)
@given(cases=st.lists(infer_cases(), min_size=2, max_size=8))
def test_fuzzed_infer_requests_together(serving: Fuzzed, cases: list[InferCase]):
    """Sent at once, so that they share batches: a bad request never fails or changes
    the answer of a good one beside it."""
    for case in cases:
        note(f"{case.notes}: POST {case.path} {case.headers} {case.body[:500]!r}")
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(
            pool.map(
                lambda case: exchange(serving.port, "POST", case.path, case.headers, case.body),
                cases,
            )
        )
    for case, reply in zip(cases, replies, strict=True):
        _check_infer(case, reply)


@settings(FUZZ, max_examples=100 * SCALE)
@given(case=infer_cases())
def test_connection_serves_on_after_a_fuzzed_request(serving: Fuzzed, case: InferCase):
    """A known-good request pipelined behind a fuzzed one on a kept-alive connection
    gets its right answer (or the server closes the connection, saying so)."""
    note(f"{case.notes}: POST {case.path} {case.headers} {case.body[:500]!r}")
    feeds = reference_rows(DIGITS, 2)
    good = json.dumps(json_request("input", "FP32", feeds["input"])).encode()
    replies = exchange_all(
        serving.port,
        [
            ("POST", frame("POST", case.path, case.headers, case.body, close=False)),
            ("POST", frame("POST", "/v2/models/digits/infer", body=good)),
        ],
    )
    assert replies, "no answer at all"
    _check_infer(case, replies[0])
    if len(replies) == 1:
        assert replies[0].headers.get("connection") == "close", replies[0]
        return
    _, outputs, in_json = decode_infer(replies[1])
    assert_outputs(outputs, in_json, expected_outputs(DIGITS, feeds))


# -- paths and methods --------------------------------------------------------------------


@settings(FUZZ, max_examples=350 * SCALE)
@given(
    method=st.sampled_from(["GET", "POST"]) | st.sampled_from(METHODS),
    path=paths(),
    body=st.sampled_from([b"", b"{}", b"[]", b"{", b'{"inputs": []}']) | st.binary(max_size=50),
)
def test_fuzzed_paths_and_methods(serving: Fuzzed, method: str, path: str, body: bytes):
    """Any method (that HTTP parsers know) on any path under /v2."""
    note(f"request: {method} {path[:300]} {body!r}")
    reply = exchange(serving.port, method, path, body=body)
    event(f"{reply.status}")
    check_reply(reply, method)


# -- headers --------------------------------------------------------------------------------

MEANINGFUL = {"content-encoding", IHCL.lower()}  # headers that change what an infer body says


@settings(FUZZ, max_examples=200 * SCALE)
@given(
    headers=header_sets,
    endpoint=st.sampled_from(
        [
            ("POST", "/v2/models/digits/infer"),
            ("GET", "/v2/health/ready"),
            ("GET", "/v2/models/digits"),
            ("GET", "/v2/models/digits/versions/1/stats"),
            ("POST", "/v2/repository/index"),
        ]
    ),
)
def test_fuzzed_headers(serving: Fuzzed, headers: list[tuple[str, str]], endpoint):
    """Random extra headers (known names and random tokens, values with obs-text) on
    known-good requests: answered as without them, unless they change the body's
    meaning (Content-Encoding, Inference-Header-Content-Length)."""
    method, path = endpoint
    feeds = reference_rows(DIGITS, 2)
    body = b""
    if path.endswith("infer"):
        body = json.dumps(json_request("input", "FP32", feeds["input"])).encode()
    note(f"request: {method} {path} {headers}")
    reply = exchange(serving.port, method, path, headers, body)
    check_reply(reply, method)
    names = {name.lower() for name, _ in headers}
    if names & MEANINGFUL or (names & {"expect"} and reply.status == 417):
        return
    assert reply.status == 200, reply.body[:500]
    if path.endswith("infer"):
        _, outputs, in_json = decode_infer(reply)
        assert_outputs(outputs, in_json, expected_outputs(DIGITS, feeds))


# -- the control plane ----------------------------------------------------------------------

VERSIONS = pick(
    st.sampled_from(["1", "2", "3", "0", "01", " 1", "-1", "1.0", "\u0661", "\u00b2", "9" * 4301]),
    st.integers(-(2**64), 2**64),
    scalars,
    json_values,
)
NUMBERS = pick(
    st.floats(allow_nan=False),
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 0.01, 5, 50, 100, 100.0001, -0.0, 1e308]),
    scalars,
)
CONTROL_BODIES = {
    "load": st.fixed_dictionaries(
        {},
        optional={
            "parameters": pick(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "version": VERSIONS,
                        "unload_dependents": scalars,
                        "config": json_values,
                    },
                ),
                json_values,
            )
        },
    ),
    "index": st.fixed_dictionaries({}, optional={"ready": scalars, "parameters": json_values}),
    "traffic": st.fixed_dictionaries(
        {},
        optional={
            "stable": VERSIONS,
            "canary": VERSIONS,
            "weight": NUMBERS,
            "mode": pick(st.sampled_from(["split", "shadow", "SPLIT", ""]), scalars, json_values),
        },
    ),
    "rollout": st.fixed_dictionaries(
        {"version": pick(st.sampled_from(["1", "2", "3", 1]), VERSIONS)},
        optional={
            "steps": pick(
                st.sampled_from([[5, 100], [50, 100], [100], [1, 2, 100], [100, 100], []]),
                st.lists(NUMBERS, max_size=5),
                json_values,
            ),
            "mode": pick(st.sampled_from(["split", "shadow"]), scalars),
            **{
                key: NUMBERS
                for key in (
                    "min_rows",
                    "min_dwell_s",
                    "max_dwell_s",
                    "epoch_s",
                    "alpha",
                    "error_margin",
                    "latency_p99_ratio",
                    "min_latency_samples",
                    "psi",
                    "disagreement",
                )
            },
        },
    ),
}
ACTIONS = ["promote", "rollback", "pause", "resume", "nope", ""]


@st.composite
def control_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A control-plane request (method, target, body) on `victim`, `wine` (which has
    rollout candidates), an unknown model or a random name; never on the models
    that `assert_still_serving` checks."""
    model = draw(
        pick(
            st.sampled_from(["victim", "victim", "wine", "no_such_model", "..", ".hidden"]),
            segments().filter(lambda name: name not in SERVING),
        )
    )
    method, template, kind = draw(
        st.sampled_from(
            [
                ("POST", "/v2/repository/index", "index"),
                ("POST", "/v2/repository/models/{}/load", "load"),
                ("POST", "/v2/repository/models/{}/unload", "load"),
                ("GET", "/v2/models/{}/traffic", None),
                ("PUT", "/v2/models/{}/traffic", "traffic"),
                ("GET", "/v2/models/{}/rollout", None),
                ("POST", "/v2/models/{}/rollout", "rollout"),
                ("POST", "/v2/models/{}/rollout/{}", None),
                ("GET", "/v2/audit", None),
            ]
        )
    )
    target = template.format(model, draw(st.sampled_from(ACTIONS)))
    if template == "/v2/audit":
        query = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "limit": st.sampled_from(["0", "1", "1000", "1001", "-1", "", "\u0661"]),
                    "model": pick(st.sampled_from(["victim", "wine"]), st.text(max_size=10)),
                },
            )
        )
        target += "?" + urlencode(query)
    structured = CONTROL_BODIES.get(kind, st.just({}))
    body = draw(
        pick(
            structured.map(to_json),
            json_values.map(to_json),
            st.sampled_from(["", " ", "{", "[]", "null"]),
            st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
        )
    )
    return method, target, body.encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=250 * SCALE)
@given(request=control_requests())
def test_fuzzed_control_plane(serving: Fuzzed, request: tuple[str, str, bytes]):
    """Repository, traffic, rollout and audit requests with fuzzed bodies and queries."""
    method, target, body = request
    note(f"request: {method} {target[:300]} {body[:2000]!r}")
    reply = exchange(serving.port, method, target, body=body)
    event(f"{method} {target.split('/')[-1][:10]}: {reply.status}")
    check_reply(reply, method)


def test_victim_still_works_after_the_control_fuzzing(serving: Fuzzed):
    """After the fuzzed loads, unloads, traffic changes and rollouts, `victim` (a copy
    of breast_cancer) can be reset, reloaded and serves both versions correctly."""
    port = serving.port
    check_reply(exchange(port, "POST", "/v2/models/victim/rollout/rollback", body=b""), "POST")
    reply = exchange(port, "POST", "/v2/repository/models/victim/load", body=b"{}")
    assert reply.status == 200, reply.body
    reset = b'{"stable": null, "canary": null, "weight": 0}'
    reply = exchange(port, "PUT", "/v2/models/victim/traffic", body=reset)
    assert reply.status == 200, reply.body
    for version in (1, 2):
        shipped = ShippedVersion("breast_cancer", version)
        feeds = reference_rows(shipped, 5)
        body = json.dumps(json_request("input", "FP32", feeds["input"])).encode()
        reply = exchange(port, "POST", f"/v2/models/victim/versions/{version}/infer", body=body)
        check_reply(reply, "POST")
        _, outputs, in_json = decode_infer(reply)
        assert_outputs(outputs, in_json, expected_outputs(shipped, feeds))


# -- access control -------------------------------------------------------------------------

TOKENS = {role: f"fuzz-{role}-token-0123456789abcdef" for role in ("admin", "reader", "inference")}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A server with an auth file: an admin, a reader and an inference token."""
    root = tmp_path_factory.mktemp("guarded")
    repository = _repository(root)
    auth = root / "auth.toml"
    auth.write_text(
        "".join(
            f'[tokens.{role}]\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
            f'roles = ["{role}"]\n'
            for role, token in TOKENS.items()
        )
    )
    live = LiveServer(
        repository,
        "--auth-file",
        str(auth),
        log_path=root / "server.log",
        probe_token=TOKENS["reader"],
    )
    live.client.headers["Authorization"] = f"Bearer {TOKENS['admin']}"
    try:
        admin = (("Authorization", f"Bearer {TOKENS['admin']}"),)
        yield Fuzzed(live, len(live.log()), None, admin)
    finally:
        live.stop()


AUTHORIZATIONS = pick(
    st.sampled_from(list(TOKENS.values())).map(lambda token: f"Bearer {token}"),
    st.tuples(
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", ""]),
        st.sampled_from([*TOKENS.values(), "", "x", TOKENS["admin"][:-1], TOKENS["admin"] * 2]),
        st.sampled_from([" ", "  ", "\t", " x", ""]),
    ).map(lambda parts: f"{parts[0]} {parts[1]}{parts[2]}"),
    header_values,
    st.none(),
)


@settings(FUZZ, max_examples=250 * SCALE)
@given(
    request=pick(
        st.tuples(
            st.sampled_from(["GET", "POST"]) | st.sampled_from(METHODS),
            paths(),
            st.sampled_from([b"", b"{}"]),
        ),
        control_requests(),
    ),
    authorization=AUTHORIZATIONS,
)
def test_fuzzed_authorization(guarded: Fuzzed, request, authorization: str | None):
    """Any Authorization header on any request: 401 (with WWW-Authenticate) or 403
    in the V2 error format, never a 5xx; no token is no access, a reader's token
    changes nothing."""
    method, target, body = request
    headers = [] if authorization is None else [("Authorization", authorization)]
    note(f"request: {method} {target[:300]} {headers} {body[:300]!r}")
    reply = exchange(guarded.port, method, target, headers, body)
    event(f"{reply.status}")
    check_reply(reply, method)
    if reply.status == 401:
        assert reply.headers.get("www-authenticate", "").startswith("Bearer"), reply
    if authorization is None or not authorization.strip():
        assert reply.status == 401, reply
    elif authorization == f"Bearer {TOKENS['admin']}":
        assert reply.status not in (401, 403), reply
    elif authorization == f"Bearer {TOKENS['reader']}" and method in ("POST", "PUT"):
        if target.startswith("/v2/repository/models/") or target.split("?")[0].endswith(
            ("/traffic", "/rollout", *(f"/rollout/{action}" for action in ACTIONS))
        ):
            assert reply.status in (403, 404, 405), reply


def test_guarded_server_still_serves(guarded: Fuzzed):
    """After the fuzzing: no token is 401, and the known-good requests (with the
    admin token) get onnxruntime's answers."""
    reply = exchange(guarded.port, "GET", "/v2/health/ready")
    assert reply.status == 401
    reader = [("Authorization", f"Bearer {TOKENS['reader']}")]
    assert exchange(guarded.port, "GET", "/v2/health/ready", reader).status == 200
    rollback = exchange(guarded.port, "POST", "/v2/models/victim/rollout/rollback", guarded.headers)
    check_reply(rollback, "POST")
    assert_still_serving(guarded)
