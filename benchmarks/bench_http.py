"""tidegate over HTTP against raw onnxruntime in-process, in one run.

For each shipped model version this measures, with one row per request:
  * raw onnxruntime: `session.run` in this process (the limit), at concurrency 1
    (one loop) and 16 (16 threads; onnxruntime releases the GIL);
  * tidegate: a `tidegate serve` subprocess on 127.0.0.1, driven by a lean
    asyncio HTTP/1.1 client (keep-alive connections, pre-encoded requests), V2 JSON
    and the binary tensor extension, at concurrency 1 and 16.
It prints requests/s, p50 and p99 latency, and the ratios to raw onnxruntime
measured in the same run, so the figures hold on a noisy machine. Client and
server share the machine's cores: at concurrency 16 the client's own CPU use is
part of the picture.

    python benchmarks/bench_http.py [--duration 3] [--models breast_cancer,digits]
"""

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
V2_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(string)": "BYTES"}


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    latencies_ns: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ns, q)) / 1e6


def shipped_versions(only: set[str] | None) -> list[tuple[str, int]]:
    found = []
    for model in sorted(p for p in MODELS.iterdir() if p.is_dir()):
        if only and model.name not in only:
            continue
        found += [(model.name, int(v.name)) for v in sorted(model.iterdir()) if v.name.isdigit()]
    return found


def first_row(model: str, version: int) -> dict[str, np.ndarray]:
    with np.load(MODELS / model / str(version) / "reference.npz") as archive:
        return {
            name: archive[name][:1].astype(object)
            if archive[name].dtype.kind == "U"
            else archive[name][:1]
            for name in archive.files
        }


# -- raw onnxruntime ---------------------------------------------------------------------


def raw_session(model: str, version: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # what tidegate uses by default
    path = MODELS / model / str(version) / "model.onnx"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_raw(name: str, run: Callable[[], object], concurrency: int, duration: float) -> Result:
    latencies: list[list[int]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + duration

    def worker(out: list[int]) -> None:
        clock = time.perf_counter_ns
        while time.perf_counter() < stop:
            started = clock()
            run()
            out.append(clock() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(out,)) for out in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    merged = np.concatenate([np.asarray(out, dtype=np.int64) for out in latencies])
    return Result(name, len(merged), elapsed, merged)


# -- tidegate over HTTP --------------------------------------------------------------------


def infer_request(model: str, version: int, feeds: dict[str, np.ndarray], binary: bool) -> bytes:
    """One pre-encoded HTTP/1.1 request, as a V2 client would send it."""
    session = raw_session(model, version)
    types = {arg.name: V2_TYPES[arg.type] for arg in session.get_inputs()}
    inputs: list[dict[str, object]] = []
    blobs = []
    for name, array in feeds.items():
        entry: dict[str, object] = {
            "name": name,
            "datatype": types[name],
            "shape": list(array.shape),
        }
        if binary and types[name] != "BYTES":
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        inputs.append(entry)
    document: dict[str, object] = {"inputs": inputs}
    if binary:
        document["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(document)
    body = header + b"".join(blobs)
    head = (
        f"POST /v2/models/{model}/versions/{version}/infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )
    if binary:
        head += f"Inference-Header-Content-Length: {len(header)}\r\n"
    return head.encode() + b"\r\n" + body


async def _connection(
    port: int, request: bytes, stop: float, out: list[int], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter_ns
    try:
        while time.perf_counter() < stop:
            started = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(body.decode(errors="replace"))
                return
            out.append(clock() - started)
    finally:
        writer.close()


async def _drive(port: int, request: bytes, concurrency: int, duration: float) -> Result:
    latencies: list[list[int]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    started = time.perf_counter()
    stop = started + duration
    await asyncio.gather(*(_connection(port, request, stop, out, errors) for out in latencies))
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"server answered an error: {errors[0]}")
    merged = np.concatenate([np.asarray(out, dtype=np.int64) for out in latencies])
    return Result("", len(merged), elapsed, merged)


def bench_http(port: int, request: bytes, concurrency: int, duration: float) -> Result:
    return uvloop.run(_drive(port, request, concurrency, duration))


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, repository: Path = MODELS) -> subprocess.Popen[bytes]:
    """`tidegate serve` as it ships, gRPC on too, but on a free port of its own (not
    the default 8001, which another server, or another program, may hold)."""
    command = [sys.executable, "-m", "tidegate", "serve", str(repository), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--grpc-port", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("tidegate did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--models", default="", help="comma-separated model names (default all)")
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    only = set(filter(None, args.models.split(","))) or None
    levels = [int(c) for c in args.concurrency.split(",")]

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}, "
        f"{args.duration:g} s per cell, 1 row per request\n"
    )
    print("| model | path | conc | req/s | p50 ms | p99 ms | req/s vs raw | p50 vs raw |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    port = free_port()
    server = start_server(port)
    try:
        for model, version in shipped_versions(only):
            feeds = first_row(model, version)
            session = raw_session(model, version)
            names = [o.name for o in session.get_outputs()]
            requests = {
                "json": infer_request(model, version, feeds, binary=False),
                "binary": infer_request(model, version, feeds, binary=True),
            }
            for conc in levels:
                bench_http(port, requests["json"], 1, 0.5)  # warm the connection path
                run = partial(session.run, names, feeds)
                raw = bench_raw("raw", run, conc, args.duration)
                rows = [("onnxruntime in-process", raw)]
                for path, request in requests.items():
                    rows.append(
                        (f"tidegate {path}", bench_http(port, request, conc, args.duration))
                    )
                for label, result in rows:
                    print(
                        f"| {model} v{version} | {label} | {conc} | {result.rps:,.0f} | "
                        f"{result.percentile_ms(50):.3f} | {result.percentile_ms(99):.3f} | "
                        f"{result.rps / raw.rps:.3f} | "
                        f"{result.percentile_ms(50) / raw.percentile_ms(50):.1f}x |",
                        flush=True,
                    )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
