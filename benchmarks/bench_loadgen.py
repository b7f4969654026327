"""How honest `tidegate bench` is: its requests/s and p50 against wrk's, on the same
tidegate server and model, in one run.

A `tidegate serve` subprocess serves the shipped models on 127.0.0.1. For each
round, wrk (`-t1`, benchmarks/v2_request.lua) and `tidegate bench` (closed loop)
take turns driving the same pre-encoded V2 JSON request for digits at the same
concurrency, each after a 1 s warm-up, the order alternating by round. The table
gives each run and the ratios tidegate bench / wrk; the last line their sums.

    .venv/bin/python benchmarks/bench_loadgen.py [--rounds 4] [--duration 8]
        [--concurrency 8]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_vs_mlserver import run_wrk, running, spawn_tidegate
from tidegate.workload import encode_request

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits"


def request_file(folder: Path) -> Path:
    """One V2 JSON request of digits' first reference row."""
    rows = np.load(ROOT / "models" / MODEL / "1" / "reference.npz")["input"][:1]
    body, _ = encode_request({"input": rows.astype(np.float32)}, {"input": "FP32"}, binary=False)
    path = folder / "request.json"
    path.write_bytes(body)
    return path


def wrk(port: int, body: Path, conc: int, seconds: float) -> tuple[float, float]:
    """requests/s and p50 ms."""
    run_wrk(port, MODEL, body, None, conc, 1)
    raw = run_wrk(port, MODEL, body, None, conc, seconds)
    return raw["requests"] / (raw["duration_us"] / 1e6), raw["p50_us"] / 1e3


def tidegate_bench(
    port: int, body: Path, conc: int, seconds: float, out: Path
) -> tuple[float, float]:
    command = [sys.executable, "-m", "tidegate", "bench", f"127.0.0.1:{port}", "--model", MODEL]
    command += ["--input", str(body), "--concurrency", str(conc), "--duration", str(seconds)]
    command += ["--warmup", "1", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    level = json.loads(out.read_text())["levels"][0]
    if level["errors"]:
        raise RuntimeError(f"tidegate bench saw errors: {level['error_kinds']}")
    return level["ok_per_s"], level["p50_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tidegate-loadgen-") as tmp:
        folder = Path(tmp)
        body = request_file(folder)
        rows = []
        server = spawn_tidegate(ROOT / "models", folder / "server.log")
        with running(server, [MODEL]):
            for round_ in range(args.rounds):
                order = ["wrk", "tidegate"] if round_ % 2 == 0 else ["tidegate", "wrk"]
                cell: dict[str, tuple[float, float]] = {}
                for tool in order:
                    if tool == "wrk":
                        cell[tool] = wrk(server.port, body, args.concurrency, args.duration)
                    else:
                        out_json = folder / f"round{round_}.json"
                        cell[tool] = tidegate_bench(
                            server.port, body, args.concurrency, args.duration, out_json
                        )
                rows.append(cell)
    print(f"Command: {' '.join(sys.argv)}\n")
    print("| round | wrk req/s | bench req/s | bench/wrk | wrk p50 ms | bench p50 ms | bench/wrk |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    cells = [(str(i), *c["wrk"], *c["tidegate"]) for i, c in enumerate(rows, 1)]
    mean = [float(np.mean([c[k] for c in cells])) for k in range(1, 5)]
    for label, wr, wp, tr, tp in [*cells, ("mean", *mean)]:
        ratios = f"{tr / wr:.3f} | {wp:.3f} | {tp:.3f} | {tp / wp:.3f}"
        print(f"| {label} | {wr:,.0f} | {tr:,.0f} | {ratios} |")


if __name__ == "__main__":
    main()
