"""tidegate against MLServer 1.7.1 on the same ONNX files, driven by wrk, in one run.

Builds four models in a temporary directory (`tabular`: the shipped breast_cancer
logistic regression; `mlp` 64->2048->2048->10 and `mlp_small` 64->256->256->10;
`cnn` on [N,3,64,64]), serves them with tidegate (`python -m tidegate serve`) and with
MLServer (a custom onnxruntime runtime, benchmarks/mlserver_onnx.py, one in-process
worker, single-threaded sessions), one server at a time on 127.0.0.1, and drives each
model with wrk (`wrk -t1 -cC`, benchmarks/v2_request.lua), one row per request:
  * tidegate: V2 JSON and the binary tensor extension, dynamic batching off and on;
  * MLServer: V2 JSON (it has no binary protocol), adaptive batching off and on
    (max_batch_size 64, max_batch_time 0.5 ms); its fastest settings: parallel_workers 0
    (inference in the server process), debug off (no access log), gzip and metrics off.
Before measuring, one response of every model from every server (and protocol) is
checked against onnxruntime run here; a mismatch aborts. Each cell gets a 1 s wrk
warm-up first. It prints markdown tables: requests/s, rows/s, p50 and p99 per cell,
the ratios tidegate / MLServer, each server's peak RSS (VmHWM) and, for the MLPs, what
batching gains at the highest concurrency. wrk, the servers and this script share the
machine's cores. With `--rounds N` everything is measured N times (the servers' order
alternating by round) and a last table gives, per round and as the median over the
rounds, tidegate as it ships (batching on, JSON) against MLServer's faster setting:
on this 2-vCPU VM a single run's c=1 figures depend on whether the scheduler puts wrk
and the server on one vCPU (see RESULTS.md), so one round settles little.
`--placement` fixes that choice for both servers alike (taskset): `same` puts the
servers and wrk on CPU 0, `split` the servers on CPU 1 and wrk on CPU 0; `any`
(the default) leaves it to the scheduler.

MLServer runs from its own venv:

    python3.11 -m venv /tmp/mls && /tmp/mls/bin/pip install 'mlserver==1.7.1' \
        'uvloop<0.22' httptools onnxruntime numpy

Usage (with tidegate's venv, which has onnx and orjson):

    .venv/bin/python benchmarks/bench_vs_mlserver.py [--duration 10] \
        [--concurrency 1,8,64] [--models tabular,mlp,mlp_small,cnn] [--batching off,on] \
        [--mlserver-python /tmp/mls/bin/python] [--rounds 1] [--json results.json] \
        [--placement any|same|split]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import orjson
from onnx import TensorProto, helper, numpy_helper

import tidegate
from tidegate.workload import encode_request

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA_SCRIPT = BENCH / "v2_request.lua"
WRK = "/usr/bin/wrk"
# The CPUs the servers and wrk run on, per --placement (`taskset -c` lists; None: any).
PLACEMENTS: dict[str, tuple[str | None, str | None]] = {
    "any": (None, None),
    "same": ("0", "0"),
    "split": ("1", "0"),
}
placement = PLACEMENTS["any"]  # set by main from --placement; read by _spawn and run_wrk


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """`command` run under `taskset -c cpus`; as it is when `cpus` is None."""
    return command if cpus is None else ["taskset", "-c", cpus, *command]


TABULAR_SOURCE = ROOT / "models" / "breast_cancer" / "1" / "model.onnx"
TABULAR_REFERENCE = TABULAR_SOURCE.with_name("reference.npz")  # its training features
ALL_MODELS = ("tabular", "mlp", "mlp_small", "cnn")
INPUT_SEEDS = {name: 100 + i for i, name in enumerate(ALL_MODELS)}  # same row whatever --models
OPSET = 17
ROWS_PER_REQUEST = 1
MAX_BATCH_SIZE = 64
MLSERVER_MAX_BATCH_TIME = 0.0005  # seconds; 0 turns MLServer's adaptive batching off
WARMUP_SECONDS = 1.0
READY_TIMEOUT = 180.0
V2_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64"}
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


# -- models ---------------------------------------------------------------------------


def _normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _finish(
    name: str, nodes: list[onnx.NodeProto], inits: list[TensorProto], x_shape: list[str | int]
) -> onnx.ModelProto:
    """Wraps nodes into an opset-17 model with input `input` and output `probabilities`."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # the IR version of opset 17
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_model(name: str, widths: list[int], seed: int) -> onnx.ModelProto:
    """Gemm/Relu layers through `widths`, then Softmax."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "input"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        weight, bias, out = f"w{layer}", f"b{layer}", f"gemm{layer}"
        inits.append(numpy_helper.from_array(_normal(rng, (fan_in, fan_out), fan_in), weight))
        inits.append(numpy_helper.from_array(np.zeros(fan_out, np.float32), bias))
        nodes.append(helper.make_node("Gemm", [current, weight, bias], [out]))
        current = out
        if layer < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{layer}"]))
            current = f"relu{layer}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=1))
    return _finish(name, nodes, inits, ["N", widths[0]])


def cnn_model(seed: int) -> onnx.ModelProto:
    """Conv 3->16, Relu, MaxPool, Conv 16->32, Relu, MaxPool, GAP, Flatten, Gemm, Softmax."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_normal(rng, (16, 3, 3, 3), 27), "c1w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "c1b"),
        numpy_helper.from_array(_normal(rng, (32, 16, 3, 3), 144), "c2w"),
        numpy_helper.from_array(np.zeros(32, np.float32), "c2b"),
        numpy_helper.from_array(_normal(rng, (32, 10), 32), "fw"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fb"),
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["input", "c1w", "c1b"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], **pool),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], **pool),
        helper.make_node("GlobalAveragePool", ["p2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return _finish("cnn", nodes, inits, ["N", 3, 64, 64])


def build_models(names: list[str], out: Path) -> dict[str, Path]:
    """Writes each named model to out/<name>.onnx (deterministic weights)."""
    out.mkdir(parents=True)
    paths = {}
    for name in names:
        path = out / f"{name}.onnx"
        if name == "tabular":
            shutil.copyfile(TABULAR_SOURCE, path)
        elif name == "mlp":
            onnx.save(mlp_model(name, [64, 2048, 2048, 10], seed=1), path)
        elif name == "mlp_small":
            onnx.save(mlp_model(name, [64, 256, 256, 10], seed=2), path)
        elif name == "cnn":
            onnx.save(cnn_model(seed=3), path)
        else:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")
        paths[name] = path
    return paths


# -- requests ---------------------------------------------------------------------------


@dataclass
class Payload:
    """One model's pre-encoded requests and the outputs onnxruntime gives for them."""

    model: str
    json_file: Path
    binary_file: Path
    header_length: int
    expected: dict[str, np.ndarray]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feature_scale(name: str) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Mean and std of random inputs: N(0, 1), but the tabular model's own feature scales
    (with N(0, 1) its unscaled features saturate the logistic regression to 0 and 1)."""
    if name != "tabular":
        return 0.0, 1.0
    with np.load(TABULAR_REFERENCE) as archive:
        features = archive["input"]
    return features.mean(axis=0), features.std(axis=0)


def make_payload(name: str, path: Path, out: Path, seed: int) -> Payload:
    """Random batch-1 inputs; the JSON and binary bodies written to files for wrk."""
    session = _session(path)
    rng = np.random.default_rng(seed)
    mean, std = _feature_scale(name)
    feeds: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for arg in session.get_inputs():
        shape = [ROWS_PER_REQUEST, *arg.shape[1:]]
        datatypes[arg.name] = V2_TYPES[arg.type]
        feeds[arg.name] = (mean + std * rng.standard_normal(shape)).astype(
            NUMPY_TYPES[datatypes[arg.name]]
        )
    outputs = [o.name for o in session.get_outputs()]
    expected = dict(zip(outputs, session.run(outputs, feeds), strict=True))
    json_body, _ = encode_request(feeds, datatypes, binary=False)
    binary_body, header_length = encode_request(feeds, datatypes, binary=True)
    assert header_length is not None
    json_file, binary_file = out / f"{name}.json", out / f"{name}.bin"
    json_file.write_bytes(json_body)
    binary_file.write_bytes(binary_body)
    return Payload(name, json_file, binary_file, header_length, expected)


# -- servers ----------------------------------------------------------------------------


@dataclass
class Server:
    """A running server process: what it is, where it listens, where it logs."""

    name: str  # "tidegate" | "MLServer"
    batching: bool
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    """A port nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_status(port: int, path: str, authorization: str = "") -> int | None:
    headers = {"Authorization": authorization} if authorization else {}
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path, headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()
    except (OSError, http.client.HTTPException):
        return None


def wait_ready(server: Server, models: list[str], authorization: str = "") -> None:
    """Polls until the server and every model answer ready; raises if the process dies."""
    paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{log_tail(server.log)}")
        if all(_get_status(server.port, path, authorization) == 200 for path in paths):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready in {READY_TIMEOUT:g} s:\n{log_tail(server.log)}")


def log_tail(log: Path, lines: int = 30) -> str:
    """The last lines of a server's log, for error messages."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def write_repo(repo: Path, models: dict[str, Path], config: str) -> Path:
    """A tidegate repository: REPO/<name>/1/model.onnx, and `config` as each config.toml."""
    for name, path in models.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(path, repo / name / "1" / "model.onnx")
        (repo / name / "config.toml").write_text(config)
    return repo


def batching_config(batching: bool) -> str:
    """config.toml text that turns dynamic batching on (up to MAX_BATCH_SIZE rows) or off."""
    if batching:
        return f"[batching]\ndynamic = true\nmax_batch_size = {MAX_BATCH_SIZE}\n"
    return "[batching]\ndynamic = false\n"


def write_mlserver_repo(root: Path, models: dict[str, Path], batching: bool, port: int) -> Path:
    """settings.json (one in-process worker, no metrics, no access log, no gzip) and one
    model-settings.json per model."""
    repo = root / f"mlserver-{'on' if batching else 'off'}"
    repo.mkdir()
    settings = {
        "debug": False,  # True (the default) logs every request and at DEBUG level
        "parallel_workers": 0,  # inference in the server process, no IPC hop
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_endpoint": None,
        "gzip_enabled": False,
    }
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    for name, path in models.items():
        model_settings: dict[str, object] = {
            "name": name,
            "implementation": "mlserver_onnx.OnnxRuntime",
            "parameters": {"uri": str(path)},
        }
        if batching:
            model_settings["max_batch_size"] = MAX_BATCH_SIZE
            model_settings["max_batch_time"] = MLSERVER_MAX_BATCH_TIME
        (repo / name).mkdir()
        (repo / name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return repo


def _spawn(
    command: list[str], cwd: Path, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    command = pinned(command, placement[0])
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


def spawn_tidegate(
    repo: Path,
    log: Path,
    *extra: str,
    batching: bool = True,
    env: dict[str, str] | None = None,
) -> Server:
    """`python -m tidegate serve REPO` (this interpreter) on a free loopback port, with
    `env` added to this process's environment. gRPC is on, as shipped, on a free port
    unless `extra` names one (not the default 8001: several servers run at once)."""
    port = free_port()
    command = [sys.executable, "-m", "tidegate", "serve", str(repo), "--host", "127.0.0.1"]
    command += ["--port", str(port), *extra]
    if "--grpc-port" not in extra:
        command += ["--grpc-port", str(free_port())]
    process = _spawn(command, log.parent, log, {**os.environ, **(env or {})})
    return Server("tidegate", batching, port, process, log)


def start_tidegate(root: Path, models: dict[str, Path], batching: bool) -> Server:
    """tidegate on a fresh repository of `models`, batching on or off."""
    repo = write_repo(root / f"tidegate-{_onoff(batching)}", models, batching_config(batching))
    return spawn_tidegate(repo, root / f"{repo.name}.log", batching=batching)


def start_mlserver(root: Path, models: dict[str, Path], batching: bool, python: str) -> Server:
    """`mlserver start` in MLServer's venv, with mlserver_onnx.py on its PYTHONPATH."""
    port = free_port()
    repo = write_mlserver_repo(root, models, batching, port)
    # `python -m mlserver` does not exist in 1.7.1 (no __main__); call its CLI entry point.
    entry = "import sys; from mlserver.cli import main; sys.argv[0] = 'mlserver'; main()"
    command = [python, "-c", entry, "start", str(repo)]
    env = {**os.environ, "PYTHONPATH": str(BENCH)}  # for mlserver_onnx
    log = root / f"{repo.name}.log"
    # cwd: MLServer puts "." on sys.path and keeps .envs/.metrics there.
    process = _spawn(command, root, log, env)
    return Server("MLServer", batching, port, process, log)


def start_server(
    name: str, root: Path, models: dict[str, Path], batching: bool, mlserver_python: str
) -> Server:
    """Spawns the named server; it is not ready yet (see `running`)."""
    if name == "tidegate":
        return start_tidegate(root, models, batching)
    return start_mlserver(root, models, batching, mlserver_python)


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminates this one process (by its PID), killing it if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@contextmanager
def running(server: Server, models: list[str], authorization: str = "") -> Iterator[Server]:
    """Waits for readiness, yields, and always stops the process."""
    try:
        started = time.monotonic()
        wait_ready(server, models, authorization)
        print(
            f"# {server.name} batching {_onoff(server.batching)} ready in "
            f"{time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
        yield server
    finally:
        stop(server.process)


# -- sanity check -----------------------------------------------------------------------


def post(port: int, model: str, body: bytes, header_length: int | None) -> tuple[bytes, str | None]:
    """One infer request; returns the body and its Inference-Header-Content-Length."""
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
    data, answered = send(port, "POST", f"/v2/models/{model}/infer", body, headers)
    return data, answered.get("Inference-Header-Content-Length")


def send(
    port: int, method: str, path: str, body: bytes | str, headers: dict[str, str]
) -> tuple[bytes, http.client.HTTPMessage]:
    """One request to 127.0.0.1:`port`; its body and headers, or RuntimeError unless 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:500]!r}")
        return data, response.headers
    finally:
        connection.close()


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Outputs of a V2 JSON response, or of one using the binary tensor extension."""
    split = int(header_length) if header_length is not None else len(body)
    document = orjson.loads(body[:split])
    offset, outputs = split, {}
    for output in document["outputs"]:
        dtype = NUMPY_TYPES[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(output["data"], dtype=dtype)
        else:
            array = np.frombuffer(body[offset : offset + size], dtype=dtype)
            offset += size
        outputs[output["name"]] = array
    return outputs


def check(server: Server, payload: Payload, binary: bool) -> None:
    """Aborts unless the server's outputs match onnxruntime's (flattened; MLServer adds a
    trailing 1 to 1-D shapes)."""
    file = payload.binary_file if binary else payload.json_file
    body, length = post(
        server.port, payload.model, file.read_bytes(), payload.header_length if binary else None
    )
    got = decode_response(body, length)
    where = f"{server.name} {payload.model} {'binary' if binary else 'JSON'}"
    if set(got) != set(payload.expected):
        raise SystemExit(f"{where}: outputs {sorted(got)} != {sorted(payload.expected)}")
    for name, want in payload.expected.items():
        if not np.allclose(got[name], want.ravel(), rtol=1e-4, atol=1e-6):
            raise SystemExit(f"{where}: output {name} {got[name]} != {want.ravel()}")


# -- wrk --------------------------------------------------------------------------------


@dataclass
class Result:
    """One measured cell, as wrk saw it."""

    model: str
    server: str
    protocol: str  # "JSON" | "binary"
    batching: str  # "off" | "on"
    concurrency: int
    requests: int
    seconds: float
    errors: int
    status_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    round: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def rows_per_s(self) -> float:
        return (self.requests - self.status_errors) * ROWS_PER_REQUEST / self.seconds


def run_wrk(
    port: int,
    model: str,
    body: Path,
    header_length: int | None,
    conc: int,
    seconds: float,
    authorization: str = "",
    version: str | None = None,
) -> dict[str, int]:
    """One wrk run; the numbers of the V2RESULT line v2_request.lua prints."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    command = [WRK, "-t1", f"-c{conc}", f"-d{seconds:g}s", "--latency", "--timeout", "30s"]
    command += ["-s", str(LUA_SCRIPT), f"http://127.0.0.1:{port}{path}"]
    env = {**os.environ, "V2_BODY_FILE": str(body), "V2_HEADER_LENGTH": ""}
    env["V2_AUTHORIZATION"] = authorization
    if header_length is not None:
        env["V2_HEADER_LENGTH"] = str(header_length)
    command = pinned(command, placement[1])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("V2RESULT "):
            return {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")


def measure(
    server: Server,
    payload: Payload,
    binary: bool,
    conc: int,
    seconds: float,
    authorization: str = "",
    round_: int = 1,
) -> Result:
    """A 1 s warm-up, then the measured wrk run."""
    body = payload.binary_file if binary else payload.json_file
    length = payload.header_length if binary else None
    run_wrk(server.port, payload.model, body, length, conc, WARMUP_SECONDS, authorization)
    raw = run_wrk(server.port, payload.model, body, length, conc, seconds, authorization)
    return Result(
        model=payload.model,
        server=server.name,
        protocol="binary" if binary else "JSON",
        batching=_onoff(server.batching),
        concurrency=conc,
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=raw["errors"],
        status_errors=raw["status_errors"],
        p50_ms=raw["p50_us"] / 1e3,
        p90_ms=raw["p90_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        round=round_,
    )


def bench_server(
    server: Server, payloads: list[Payload], levels: list[int], seconds: float, round_: int = 1
) -> list[Result]:
    """Sanity-checks every model, then measures every protocol x concurrency cell."""
    protocols = [False, True] if server.name == "tidegate" else [False]
    for payload in payloads:
        for binary in protocols:
            check(server, payload, binary)
    results = []
    for payload in payloads:
        for binary in protocols:
            for conc in levels:
                result = measure(server, payload, binary, conc, seconds, round_=round_)
                print(f"# {_row(result)}", file=sys.stderr)
                results.append(result)
    return results


# -- report -----------------------------------------------------------------------------


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _errors(result: Result) -> str:
    if not result.errors:
        return "0"
    return f"**{result.errors} ({result.status_errors} HTTP >= 400)**"


def _row(r: Result) -> str:
    return (
        f"| {r.round} | {r.model} | {r.server} | {r.protocol} | {r.batching} | {r.concurrency} "
        f"| {r.rps:,.0f} | {r.rows_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {_errors(r)} |"
    )


def this_machine() -> str:
    """CPU, cores and the versions of tidegate's side (wrk included)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    cores = sum(line.startswith("processor") for line in cpuinfo.splitlines())
    wrk = subprocess.run([WRK, "-v"], capture_output=True, text=True, check=False).stdout.split()[1]
    return (
        f"{cpu}, {cores} cores; tidegate {tidegate.__version__} "
        f"(Python {platform.python_version()}, onnxruntime {ort.__version__}); wrk {wrk}"
    )


def machine(mlserver_python: str) -> str:
    """This machine, and the versions of MLServer's side."""
    probe = (
        "import sys, mlserver, onnxruntime; "
        "print(mlserver.__version__, onnxruntime.__version__, sys.version.split()[0])"
    )
    mls = subprocess.run(
        [mlserver_python, "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    mls_version, mls_ort, mls_py = mls.stdout.split()
    return f"{this_machine()}; MLServer {mls_version} (Python {mls_py}, onnxruntime {mls_ort})"


def _find(results: list[Result], **match: object) -> Result | None:
    return next((r for r in results if _matches(r, match)), None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def print_results(results: list[Result]) -> None:
    print(
        "| round | model | server | protocol | batching | conc | req/s | rows/s | p50 ms "
        "| p99 ms | errors |"
    )
    print("|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(_row(result))
    flagged = [r for r in results if r.errors]
    if flagged:
        print(f"\n**{len(flagged)} cell(s) had errors; their figures are not clean.**")


def print_ratios(
    results: list[Result], models: list[str], levels: list[int], batching: list[str]
) -> None:
    print(
        f"\nRound {results[0].round}: ratios tidegate / MLServer (MLServer: JSON, same "
        "batching setting). req/s: higher is better for tidegate; latency: lower is better "
        "for tidegate.\n"
    )
    print(
        "| model | batching | conc | req/s JSON | req/s binary | p50 JSON | p50 binary "
        "| p99 JSON | p99 binary |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in models:
        for mode in batching:
            for conc in levels:
                key = {"model": model, "batching": mode, "concurrency": conc}
                mls = _find(results, server="MLServer", **key)
                tj = _find(results, server="tidegate", protocol="JSON", **key)
                tb = _find(results, server="tidegate", protocol="binary", **key)
                cells = [
                    _ratio(getattr(tg, attr) if tg else None, getattr(mls, attr) if mls else None)
                    for attr in ("rps", "p50_ms", "p99_ms")
                    for tg in (tj, tb)
                ]
                print(f"| {model} | {mode} | {conc} | " + " | ".join(cells) + " |")


def print_headline(results: list[Result], models: list[str], levels: list[int]) -> None:
    """Per round, tidegate as it ships (batching on, V2 JSON) against MLServer's faster
    batching setting in that round, cell by cell: p50 and req/s ratios, and their
    medians over the rounds."""
    rounds = sorted({r.round for r in results})
    rows = []
    for model, conc in itertools.product(models, levels):
        p50s, rpss = [], []
        for round_ in rounds:
            key = {"model": model, "concurrency": conc, "round": round_}
            ours = _find(results, server="tidegate", protocol="JSON", batching="on", **key)
            theirs = [r for r in results if r.server == "MLServer" and _matches(r, key)]
            if ours is None or not theirs:
                return  # batching on was not measured, or MLServer was not
            p50s.append(ours.p50_ms / min(r.p50_ms for r in theirs))
            rpss.append(ours.rps / max(r.rps for r in theirs))
        by_round = ", ".join(f"{p:.2f} / {q:.2f}" for p, q in zip(p50s, rpss, strict=True))
        rows.append(
            f"| {model} | {conc} | {statistics.median(p50s):.2f} | "
            f"{statistics.median(rpss):.2f} | {by_round} |"
        )
    print(
        "\ntidegate as it ships (batching on, JSON) / MLServer's faster batching setting, "
        "per round and the median over rounds\n"
    )
    print("| model | conc | p50 ratio (median) | req/s ratio (median) | p50 / req/s by round |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(rows))


def _matches(result: Result, key: dict[str, object]) -> bool:
    return all(getattr(result, k) == v for k, v in key.items())


def print_rss(rss: list[dict[str, object]]) -> None:
    print("\nPeak RSS (VmHWM just before stopping; the server process, all models loaded)\n")
    print("| round | server | batching | peak RSS MiB |")
    print("|---:|---|---|---:|")
    for entry in rss:
        print(
            f"| {entry['round']} | {entry['server']} | {entry['batching']} "
            f"| {entry['peak_rss_mib']:.0f} |"
        )


def print_batching_gain(results: list[Result], levels: list[int]) -> None:
    conc = 64 if 64 in levels else max(levels)
    rows = []
    for model in ("mlp", "mlp_small"):
        for server, protocol in (
            ("tidegate", "JSON"),
            ("tidegate", "binary"),
            ("MLServer", "JSON"),
        ):
            key = {"model": model, "server": server, "protocol": protocol, "concurrency": conc}
            off, on = _find(results, batching="off", **key), _find(results, batching="on", **key)
            if off and on:
                rows.append(
                    f"| {model} | {server} | {protocol} | {off.rows_per_s:,.0f} | "
                    f"{on.rows_per_s:,.0f} | {on.rows_per_s / off.rows_per_s:.2f} |"
                )
    if not rows:
        return
    print(f"\nWhat batching gains: rows/s with batching on / off, concurrency {conc}\n")
    print("| model | server | protocol | rows/s off | rows/s on | on / off |")
    print("|---|---|---|---:|---:|---:|")
    print("\n".join(rows))


# -- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--concurrency", default="1,8,64", help="wrk connections per cell")
    parser.add_argument("--models", default=",".join(ALL_MODELS))
    parser.add_argument("--batching", default="off,on", help="off, on or off,on")
    parser.add_argument(
        "--mlserver-python",
        default=os.environ.get("MLSERVER_PYTHON", "/tmp/mls/bin/python"),
        help="python of the venv with mlserver 1.7.1 (env MLSERVER_PYTHON)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure everything this many times, the servers' order alternating",
    )
    parser.add_argument("--json", type=Path, help="also dump all results to this file")
    parser.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="any",
        help="servers and wrk on one CPU (same), on two (split), or where they land (any)",
    )
    return parser.parse_args()


def main() -> None:
    global placement
    args = parse_args()
    placement = PLACEMENTS[args.placement]
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    batching = [b for b in args.batching.split(",") if b]
    if not set(batching) <= {"off", "on"}:
        raise SystemExit("--batching takes off, on or off,on")
    started = time.monotonic()
    command = shlex.join([sys.executable, *sys.argv])
    info = machine(args.mlserver_python)
    print(
        f"`{command}`\n\n{info}; {args.duration:g} s per cell after a {WARMUP_SECONDS:g} s "
        f"warm-up, {ROWS_PER_REQUEST} row per request, wrk -t1 on 127.0.0.1; placement "
        f"{args.placement} (servers on CPUs {placement[0] or 'any'}, wrk on "
        f"{placement[1] or 'any'})\n"
    )

    results: list[Result] = []
    rss: list[dict[str, object]] = []
    root = Path(tempfile.mkdtemp(prefix="bench_vs_mlserver-"))
    try:
        paths = build_models(models, root / "onnx")
        payloads = [make_payload(m, paths[m], root, seed=INPUT_SEEDS[m]) for m in models]
        for round_ in range(1, args.rounds + 1):
            names = ("tidegate", "MLServer") if round_ % 2 else ("MLServer", "tidegate")
            folder = root / f"round-{round_}"  # each round's servers on fresh repositories
            folder.mkdir()
            for mode, name in itertools.product(batching, names):
                server = start_server(name, folder, paths, mode == "on", args.mlserver_python)
                with running(server, models):
                    results += bench_server(server, payloads, levels, args.duration, round_)
                    peak = peak_rss_mib(server.process.pid)
                    rss.append(
                        {"round": round_, "server": name, "batching": mode, "peak_rss_mib": peak}
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print_results(results)
    for round_ in range(1, args.rounds + 1):
        print_ratios([r for r in results if r.round == round_], models, levels, batching)
    print_headline(results, models, levels)
    print_rss(rss)
    print_batching_gain(results, levels)
    print(f"\nTotal wall time {time.monotonic() - started:.0f} s")
    if args.json:
        document = {
            "command": command,
            "machine": info,
            "duration": args.duration,
            "results": [asdict(r) | {"rps": r.rps, "rows_per_s": r.rows_per_s} for r in results],
            "peak_rss": rss,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
