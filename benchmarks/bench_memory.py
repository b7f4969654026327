"""Memory over repeated load/unload cycles: tidegate against raw onnxruntime.

Two kinds of cycle (`--mode`):

* `model`: each cycle unloads and loads the digits MLP (a small shipped model with
  a reference.npz, drift on) through the repository API and runs one inference.
* `version`: the benchmarks' `mlp` (64-2048-2048-10, 16 MiB of weights; no
  reference.npz, drift on) under `[versions] policy = "all"`. Each cycle copies
  version N to N+1 in the repository, loads N+1 by number
  (`{"parameters": {"version": "N+1"}}`), runs one inference (answered by N+1),
  unloads N by number and deletes N's directory (so the disk holds two versions).

tidegate is a `tidegate serve` subprocess on 127.0.0.1, its RSS read from /proc
after every cycle. Raw onnxruntime does the same cycle in this process: build the
new session, run it once, drop the old one. Both report RSS after the 10th and the
last cycle, the growth between them and the range after the 10th: a leak shows as
growth that keeps climbing with the cycle count.

    python benchmarks/bench_memory.py [--mode model|version] [--cycles 100]
"""

import argparse
import json
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench_http import free_port, start_server
from bench_vs_mlserver import mlp_model

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = "digits"
MLP = "mlp"
MLP_WIDTHS = [64, 2048, 2048, 10]
ZEROS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc")


def post(port: int, path: str, body: object = None) -> tuple[object, str | None]:
    """The JSON answer and the version that gave it (the tidegate-model-version header)."""
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read() or b"{}")
        return answer, response.headers.get("tidegate-model-version")


def version_memory(port: int, model: str) -> int | None:
    """What the server reports for the model's version: RSS growth while loading it."""
    index, _ = post(port, "/v2/repository/index")
    assert isinstance(index, list)
    rows = [r for r in index if r["name"] == model and r["state"] == "READY"]
    return rows[-1]["memory_bytes"]


def model_cycle(port: int, repo: Path, cycle: int) -> None:
    post(port, f"/v2/repository/models/{DIGITS}/unload")
    post(port, f"/v2/repository/models/{DIGITS}/load")
    post(port, f"/v2/models/{DIGITS}/infer", ZEROS)


def version_cycle(port: int, repo: Path, cycle: int) -> None:
    old, new = str(cycle), str(cycle + 1)
    shutil.copytree(repo / MLP / old, repo / MLP / new)
    post(port, f"/v2/repository/models/{MLP}/load", {"parameters": {"version": new}})
    _, answered = post(port, f"/v2/models/{MLP}/infer", ZEROS)
    assert answered == new, f"version {answered} answered, not {new}"
    post(port, f"/v2/repository/models/{MLP}/unload", {"parameters": {"version": old}})
    shutil.rmtree(repo / MLP / old)


def write_repository(root: Path, mode: str) -> tuple[Path, str]:
    """The repository the server serves, and the model the cycles load and unload."""
    repo = root / "models"
    if mode == "model":
        shutil.copytree(MODELS, repo, ignore=shutil.ignore_patterns(".tidegate"))
        return repo, DIGITS
    (repo / MLP / "1").mkdir(parents=True)
    onnx.save(mlp_model(MLP, MLP_WIDTHS, seed=1), repo / MLP / "1" / "model.onnx")
    (repo / MLP / "config.toml").write_text('[versions]\npolicy = "all"\n')
    return repo, MLP


def tidegate_cycles(mode: str, cycles: int) -> tuple[dict[int, int], int | None]:
    cycle = model_cycle if mode == "model" else version_cycle
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as root:
        repo, model = write_repository(Path(root), mode)
        port = free_port()
        server = start_server(port, repo)
        try:
            first_load = version_memory(port, model)  # at start-up
            rss = {}
            for number in range(1, cycles + 1):
                cycle(port, repo, number)
                rss[number] = rss_bytes(server.pid)
            return rss, first_load
        finally:
            server.terminate()
            server.wait(30)


def raw_cycles(mode: str, cycles: int) -> tuple[dict[int, int], int]:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as root:
        path = MODELS / DIGITS / "1" / "model.onnx"
        if mode == "version":
            path = Path(root) / "mlp.onnx"
            onnx.save(mlp_model(MLP, MLP_WIDTHS, seed=1), path)
        feeds = {"input": np.zeros((1, 64), dtype=np.float32)}
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1

        def build() -> ort.InferenceSession:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            session.run(None, feeds)
            return session

        # onnxruntime's one-time set-up first, as in the server, where other models load first.
        other = MODELS / "diabetes" / "1" / "model.onnx"
        ort.InferenceSession(str(other), options, providers=["CPUExecutionProvider"])
        before = rss_bytes()
        session = build()
        one_session = rss_bytes() - before
        rss = {}
        for cycle in range(1, cycles + 1):
            if mode == "model":  # unload, then load
                del session
                session = build()
            else:  # load the next version beside it, then unload it
                session = build()
            rss[cycle] = rss_bytes()
        return rss, one_session


def row(label: str, rss: dict[int, int], one: int | None, cycles: int) -> str:
    mib = 1024 * 1024
    growth = rss[cycles] / rss[10] - 1
    later = [rss[c] for c in range(10, cycles + 1)]
    size = "n/a" if one is None else f"{one / mib:.2f}"
    return (
        f"| {label} | {rss[10] / mib:.1f} | {rss[cycles] / mib:.1f} | {growth:+.1%} "
        f"| {min(later) / mib:.1f}-{max(later) / mib:.1f} | {size} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["model", "version"], default="model")
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    cycles: int = args.cycles
    if cycles < 10:
        raise SystemExit("--cycles must be at least 10")
    runs: list[tuple[str, Callable[[str, int], tuple[dict[int, int], int | None]]]] = [
        ("onnxruntime in-process", raw_cycles),
        ("tidegate serve", tidegate_cycles),
    ]
    what = {
        "model": f"load/unload cycles of {DIGITS} v1 (MLP, 64 features)",
        "version": f"per-version cycles of {MLP} (policy all: load N+1, infer, unload N)",
    }[args.mode]
    print(f"# {cycles} {what}\n")
    print(
        "| | RSS after cycle 10 MiB | RSS after cycle N MiB | growth 10 -> N "
        "| range from cycle 10 MiB | first load MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, run in runs:
        rss, one = run(args.mode, cycles)
        print(row(label, rss, one, cycles))


if __name__ == "__main__":
    main()
