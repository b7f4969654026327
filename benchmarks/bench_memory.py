"""Memory over repeated load/unload cycles: tidegate against raw onnxruntime.

tidegate: a `tidegate serve` subprocess on 127.0.0.1; each cycle unloads and
loads the digits MLP through the repository API and runs one inference; the
server's RSS is read from /proc after every cycle. Raw onnxruntime: the same
cycle in this process (drop the session, build a new one, run it once). Both
report RSS after the 10th and the last cycle, and the growth between them: a
leak shows as growth that keeps climbing with the cycle count.

    python benchmarks/bench_memory.py [--cycles 100]
"""

import argparse
import json
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench_http import free_port, start_server

MODEL = "digits"
MODELS = Path(__file__).resolve().parent.parent / "models"
ZEROS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc")


def post(port: int, path: str, body: object = None) -> object:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def version_memory(port: int) -> int | None:
    """What the server reports for the model's version: RSS growth while loading it."""
    index = post(port, "/v2/repository/index")
    assert isinstance(index, list)
    (row,) = [r for r in index if r["name"] == MODEL]
    return row["memory_bytes"]


def tidegate_cycles(cycles: int) -> tuple[dict[int, int], int | None]:
    port = free_port()
    server = start_server(port)
    try:
        first_load = version_memory(port)  # at start-up, after other models loaded
        rss = {}
        for cycle in range(1, cycles + 1):
            post(port, f"/v2/repository/models/{MODEL}/unload")
            post(port, f"/v2/repository/models/{MODEL}/load")
            post(port, f"/v2/models/{MODEL}/infer", ZEROS)
            rss[cycle] = rss_bytes(server.pid)
        return rss, first_load
    finally:
        server.terminate()
        server.wait(30)


def raw_cycles(cycles: int) -> tuple[dict[int, int], int]:
    path = str(MODELS / MODEL / "1" / "model.onnx")
    feeds = {"input": np.zeros((1, 64), dtype=np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    rss = {}
    # onnxruntime's one-time set-up first, as in the server, where other models load first.
    other = MODELS / "diabetes" / "1" / "model.onnx"
    ort.InferenceSession(str(other), options, providers=["CPUExecutionProvider"])
    before = rss_bytes()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    one_session = rss_bytes() - before
    for cycle in range(1, cycles + 1):
        del session
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        rss[cycle] = rss_bytes()
    return rss, one_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    cycles = parser.parse_args().cycles
    raw, raw_session = raw_cycles(cycles)
    served, version_memory = tidegate_cycles(cycles)
    mib = 1024 * 1024
    print(f"# {cycles} load/unload cycles of {MODEL} v1 (MLP, 64 features)\n")
    print("| | RSS after cycle 10 MiB | RSS after cycle N MiB | growth 10 -> N | first load MiB |")
    print("|---|---:|---:|---:|---:|")
    for label, rss, one in (
        ("onnxruntime in-process", raw, raw_session),
        ("tidegate serve", served, version_memory),
    ):
        growth = rss[cycles] / rss[10] - 1
        size = "n/a" if one is None else f"{one / mib:.2f}"
        print(
            f"| {label} | {rss[10] / mib:.1f} | {rss[cycles] / mib:.1f} | {growth:+.1%} | {size} |"
        )


if __name__ == "__main__":
    main()
