"""tidegate against MLServer 1.7.1 over the V2 gRPC protocol, one client for both:
`tidegate bench --protocol grpc` (its own HTTP/2 client, tidegate.http2_client, since
2026-12-06: grpcio's took three quarters of the c=1 latency it measured against
tidegate); and what gRPC costs tidegate's HTTP, in one run.

Serves the `tabular` model of bench_vs_mlserver.py (the shipped breast_cancer
logistic regression, one row per request) at once from six servers on 127.0.0.1:
  * tidegate, dynamic batching on, gRPC on a free port (`--grpc-port P`);
  * tidegate, the same, gRPC off (`--grpc-port 0`);
  * MLServer, adaptive batching off and on (its settings as in bench_vs_mlserver.py,
    gRPC on the free `grpc_port` its settings.json names);
  * two transports' floors (grpc_floor.py), each answering the bytes tidegate
    answered, nothing else: grpc.aio on uvloop, the least a server on grpc.aio
    (MLServer's; tidegate's gRPC until it got its own) could cost here; and
    tidegate's own HTTP/2 and call layer (`tidegate.grpc_wire`), what tidegate's
    gRPC costs before its servicer and inference.
Every gRPC server's answer is first checked against onnxruntime run here
(tritonclient.grpc); a mismatch aborts. Then, for each round, every cell in turn (the
order reversed every other round), each a `tidegate bench` subprocess with a 1 s
warm-up and `--duration` seconds measured, closed loop:
  * gRPC (`--protocol grpc`, the request of a JSON file as raw_input_contents):
    tidegate and MLServer off and on, at concurrency 1 and 64;
  * tidegate over HTTP (`--protocol http`), the same row as the binary tensor
    extension and as V2 JSON, at 1 and 64.
After the rounds, `--idle-pairs` pairs of cells of `--idle-seconds` each: HTTP binary
at 64 on the tidegate with gRPC on (idle) and on the one without gRPC, back to back,
which goes first alternating.
It prints markdown tables of the medians over the rounds: each cell; tidegate gRPC /
MLServer gRPC (its faster batching setting) at c=64 req/s (goal >= 2x) and c=1 p50
(goal <= 0.5x), and the same ratios for the floors; and per pair the HTTP
throughput with gRPC idle / gRPC off (goal: the median within 3 %). It also gives each server's
CPU time per request: its process's CPU over a cell, warm-up included, over the
requests tidegate's /stats counted meanwhile; for MLServer and the floors (no such
count) estimated, `~`, as if the warm-up had the measured rate (the same estimate's
error on the tidegate cells is printed). Client and servers
share the machine's cores.

Usage (tidegate's venv; MLServer's as in bench_vs_mlserver.py):

    .venv/bin/python benchmarks/bench_grpc.py [--rounds 5] [--duration 5] \
        [--idle-pairs 8] [--idle-seconds 3] [--mlserver-python /tmp/mls/bin/python]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bench_dashboard import cpu_seconds
from bench_vs_mlserver import (
    INPUT_SEEDS,
    Payload,
    Server,
    batching_config,
    build_models,
    free_port,
    machine,
    make_payload,
    running,
    spawn_tidegate,
    start_mlserver,
    stop,
    write_repo,
)
from tidegate.bench import server_stats
from tidegate.grpc_server import SERVICE
from tidegate.loadgen import Target
from tidegate.proto import grpc_service_pb2 as pb

MODEL = "tabular"
LEVELS = (1, 64)
WARMUP_SECONDS = 1.0
# grpc_floor.py's modes measured, and what each is (its threaded one costs as grpc.aio).
FLOORS = {"asyncio": "grpc.aio", "tidegate": "tidegate's own (grpc_wire)"}
FLOOR_SCRIPT = Path(__file__).resolve().parent / "grpc_floor.py"


@dataclass
class Cell:
    """One measured configuration: which server, over what, at which concurrency."""

    label: str  # e.g. "MLServer gRPC, batching off"
    server: str  # "tidegate" | "tidegate, gRPC off" | "MLServer off" | "MLServer on"
    address: str  # host:port
    protocol: str  # "grpc" | "http"
    encoding: str  # "raw" (gRPC) | "binary" | "json"
    concurrency: int
    pid: int  # the server process
    stats_port: int | None  # a tidegate's HTTP port, whose /stats count its requests
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(run[key] for run in self.runs)


def payload_inputs(payload: Payload) -> list[tuple[str, str, np.ndarray]]:
    """The payload's inputs as (name, V2 datatype, array), read back from its JSON."""
    document = json.loads(payload.json_file.read_text())
    return [
        (
            entry["name"],
            entry["datatype"],
            np.asarray(entry["data"], np.float32).reshape(entry["shape"]),
        )
        for entry in document["inputs"]
    ]


def write_npz(payload: Payload, folder: Path) -> Path:
    """The payload's row as a .npz (one array per input), for HTTP's binary encoding."""
    arrays = {name: data for name, _, data in payload_inputs(payload)}
    path = folder / f"{payload.model}.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def check_grpc(address: str, payload: Payload, who: str) -> None:
    """Aborts unless the gRPC server's outputs match onnxruntime's (waits up to 60 s for
    the gRPC port to answer)."""
    client = grpcclient.InferenceServerClient(address)
    inputs = []
    for name, datatype, data in payload_inputs(payload):
        infer_input = grpcclient.InferInput(name, list(data.shape), datatype)
        infer_input.set_data_from_numpy(data)
        inputs.append(infer_input)
    deadline = time.monotonic() + 60
    while True:
        try:
            result = client.infer(payload.model, inputs)
            break
        except InferenceServerException:  # the gRPC port may answer after HTTP's readiness
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    for name, want in payload.expected.items():
        got = result.as_numpy(name)
        if got is None or not np.allclose(got.ravel(), want.ravel(), rtol=1e-4, atol=1e-6):
            raise SystemExit(f"{who} over gRPC: output {name} {got} != {want.ravel()}")
    client.close()


def record_answers(address: str, payload: Payload, folder: Path) -> tuple[Path, Path]:
    """The serialized ModelMetadata and ModelInfer answers of the gRPC server at
    `address` to the payload's request, as files for grpc_floor.py."""
    request = pb.ModelInferRequest(model_name=payload.model)
    for name, datatype, data in payload_inputs(payload):
        request.inputs.add(name=name, datatype=datatype, shape=data.shape)
        request.raw_input_contents.append(data.tobytes())
    with grpc.insecure_channel(address) as channel:
        metadata = channel.unary_unary(f"/{SERVICE}/ModelMetadata")(
            pb.ModelMetadataRequest(name=payload.model).SerializeToString(), timeout=10
        )
        answer = channel.unary_unary(f"/{SERVICE}/ModelInfer")(
            request.SerializeToString(), timeout=10
        )
    paths = folder / "floor-metadata.bin", folder / "floor-infer.bin"
    paths[0].write_bytes(metadata)
    paths[1].write_bytes(answer)
    return paths


def start_floor(mode: str, answers: tuple[Path, Path], root: Path) -> Server:
    """grpc_floor.py in `mode` on a free port (the Server's port is its gRPC port)."""
    port = free_port()
    log = root / f"floor-{mode}.log"
    command = [sys.executable, str(FLOOR_SCRIPT), mode, str(port), *map(str, answers)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return Server(f"floor, {FLOORS[mode]}", False, port, process, log)


def served(cell: Cell) -> int:
    """The tidegate's count of successful requests of the model (over both transports)."""
    assert cell.stats_port is not None
    stats = server_stats(Target("127.0.0.1", cell.stats_port, ""), MODEL, None)
    assert stats is not None
    return int(stats["success"]["count"])


def bench(cell: Cell, inputs: dict[str, Path], seconds: float, out: Path) -> dict[str, float]:
    """One `tidegate bench` level for the cell; its numbers, and for tidegate the server's
    CPU time per request it served meanwhile (the warm-up's and the level's)."""
    command = [sys.executable, "-m", "tidegate", "bench", cell.address, "--model", MODEL]
    command += ["--protocol", cell.protocol, "--concurrency", str(cell.concurrency)]
    if cell.protocol == "http":
        command += ["--encoding", cell.encoding]
    command += ["--input", str(inputs[cell.encoding]), "--duration", f"{seconds:g}"]
    command += ["--warmup", f"{WARMUP_SECONDS:g}", "--json", str(out)]
    count, cpu = (served(cell) if cell.stats_port else 0), cpu_seconds(cell.pid)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    cpu, count = cpu_seconds(cell.pid) - cpu, (served(cell) - count if cell.stats_port else 0)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    level = json.loads(out.read_text())["levels"][0]
    return {
        "rps": level["ok_per_s"],
        "p50_ms": level["p50_ms"],
        "p99_ms": level["p99_ms"],
        "errors": level["errors"],
        "client_cpu": level["client_cpu"],
        "server_us": cpu / count * 1e6 if count else math.nan,
        # Without a server's count: as many requests in the warm-up as in as long measured.
        "server_us_est": cpu / (level["ok_per_s"] * (WARMUP_SECONDS + seconds)) * 1e6,
    }


def make_cells(
    servers: dict[str, Server], grpc_ports: dict[str, int]
) -> tuple[list[Cell], tuple[Cell, Cell]]:
    """Every cell of a round, in its forward order; and the idle pair: HTTP binary at
    c=64 on the tidegate with gRPC on (and idle) and on the one with gRPC off."""

    def cell(label: str, name: str, protocol: str, encoding: str, conc: int) -> Cell:
        server = servers[name]
        port = grpc_ports[name] if protocol == "grpc" else server.port
        stats = server.port if server.name == "tidegate" else None
        address = f"127.0.0.1:{port}"
        return Cell(label, name, address, protocol, encoding, conc, server.process.pid, stats)

    cells = []
    for conc in LEVELS:
        cells.append(cell("tidegate gRPC, batching on", "tidegate", "grpc", "raw", conc))
        for mode in ("off", "on"):
            label = f"MLServer gRPC, batching {mode}"
            cells.append(cell(label, f"MLServer {mode}", "grpc", "raw", conc))
        for encoding in ("json", "binary"):
            label = f"tidegate HTTP {encoding}, batching on"
            cells.append(cell(label, "tidegate", "http", encoding, conc))
        cells += [cell(f"floor, {FLOORS[m]}", f"floor {m}", "grpc", "raw", conc) for m in FLOORS]
    idle = cell("tidegate HTTP binary, gRPC idle", "tidegate", "http", "binary", 64)
    off = cell("tidegate HTTP binary, --grpc-port 0", "tidegate, gRPC off", "http", "binary", 64)
    return cells, (idle, off)


def versions(mlserver_python: str) -> str:
    probe = "import grpc; print(grpc.__version__)"
    mls = subprocess.run(
        [mlserver_python, "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    return (
        f"{machine(mlserver_python)}; grpcio {grpc.__version__} (tidegate's servicers), "
        f"{mls.stdout.strip()} (MLServer)"
    )


def print_cells(cells: list[Cell]) -> None:
    checks: list[float] = []
    head = "| server, transport | conc | req/s | p50 ms | p99 ms | server CPU us/req "
    print(head + "| client CPU | errors | req/s by round |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for cell in cells:
        errors = sum(int(run["errors"]) for run in cell.runs)
        flagged = f"**{errors}**" if errors else "0"
        by_round = ", ".join(f"{run['rps']:,.0f}" for run in cell.runs)
        if cell.stats_port:
            checks += [run["server_us_est"] / run["server_us"] for run in cell.runs]
        print(
            f"| {cell.label} | {cell.concurrency} | {cell.median('rps'):,.0f} | "
            f"{cell.median('p50_ms'):.3f} | {cell.median('p99_ms'):.3f} | "
            f"{_us(cell.median('server_us'), cell.median('server_us_est'))} | "
            f"{cell.median('client_cpu') * 100:.0f} % | {flagged} "
            f"| {by_round} |"
        )
    print(
        f"\n~: estimated; on the tidegate cells that estimate is {min(checks):.2f} to "
        f"{max(checks):.2f} times the counted figure"
    )


def _us(value: float, estimate: float) -> str:
    return f"~{estimate:.0f}" if math.isnan(value) else f"{value:.0f}"


def _find(cells: list[Cell], server: str, protocol: str, conc: int, encoding: str) -> Cell:
    return next(
        c
        for c in cells
        if (c.server, c.protocol, c.concurrency, c.encoding) == (server, protocol, conc, encoding)
    )


def print_ratios(cells: list[Cell]) -> None:
    mine_64 = _find(cells, "tidegate", "grpc", 64, "raw")
    mine_1 = _find(cells, "tidegate", "grpc", 1, "raw")
    theirs_64 = [_find(cells, f"MLServer {b}", "grpc", 64, "raw") for b in ("off", "on")]
    theirs_1 = [_find(cells, f"MLServer {b}", "grpc", 1, "raw") for b in ("off", "on")]
    best_64 = max(theirs_64, key=lambda c: c.median("rps"))
    best_1 = min(theirs_1, key=lambda c: c.median("p50_ms"))
    print("\ntidegate gRPC / MLServer gRPC (MLServer: its faster batching setting per figure)\n")
    print("| figure | tidegate | MLServer | MLServer setting | ratio | goal |")
    print("|---|---:|---:|---|---:|---|")
    rps = mine_64.median("rps") / best_64.median("rps")
    p50 = mine_1.median("p50_ms") / best_1.median("p50_ms")
    print(
        f"| req/s at c=64 | {mine_64.median('rps'):,.0f} | {best_64.median('rps'):,.0f} | "
        f"{best_64.label.split(', ')[1]} | {rps:.2f}x | >= 2x: {'met' if rps >= 2 else 'missed'} |"
    )
    print(
        f"| p50 ms at c=1 | {mine_1.median('p50_ms'):.3f} | {best_1.median('p50_ms'):.3f} | "
        f"{best_1.label.split(', ')[1]} | {p50:.2f}x | <= 0.5x: "
        f"{'met' if p50 <= 0.5 else 'missed'} |"
    )
    print(
        "\nThe transports' floors against the same MLServer figures: the least a server on "
        "each could cost (server CPU per call estimated, ~)\n"
    )
    print("| floor | req/s at c=64 | ratio | CPU us/call | p50 ms at c=1 | ratio | CPU us/call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in FLOORS:
        floor_64 = _find(cells, f"floor {mode}", "grpc", 64, "raw")
        floor_1 = _find(cells, f"floor {mode}", "grpc", 1, "raw")
        print(
            f"| {FLOORS[mode]} | {floor_64.median('rps'):,.0f} | "
            f"{floor_64.median('rps') / best_64.median('rps'):.2f}x | "
            f"~{floor_64.median('server_us_est'):.0f} | {floor_1.median('p50_ms'):.3f} | "
            f"{floor_1.median('p50_ms') / best_1.median('p50_ms'):.2f}x | "
            f"~{floor_1.median('server_us_est'):.0f} |"
        )
    print("\ntidegate over HTTP and over gRPC (same client, same row)\n")
    print(
        "| conc | HTTP binary req/s | HTTP JSON req/s | gRPC req/s | gRPC / HTTP binary "
        "| HTTP binary p50 | HTTP JSON p50 | gRPC p50 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for conc in LEVELS:
        binary = _find(cells, "tidegate", "http", conc, "binary")
        plain = _find(cells, "tidegate", "http", conc, "json")
        over_grpc = _find(cells, "tidegate", "grpc", conc, "raw")
        print(
            f"| {conc} | {binary.median('rps'):,.0f} | {plain.median('rps'):,.0f} | "
            f"{over_grpc.median('rps'):,.0f} | "
            f"{over_grpc.median('rps') / binary.median('rps'):.2f} | "
            f"{binary.median('p50_ms'):.3f} | {plain.median('p50_ms'):.3f} | "
            f"{over_grpc.median('p50_ms'):.3f} |"
        )


def measure_idle(
    pair: tuple[Cell, Cell], count: int, inputs: dict[str, Path], seconds: float, out: Path
) -> None:
    """`count` back-to-back pairs of the idle cells, which one goes first alternating: a
    slow spell of a shared machine then falls on both sides alike."""
    for index in range(count):
        for cell in pair if index % 2 == 0 else pair[::-1]:
            cell.runs.append(bench(cell, inputs, seconds, out))
            print(
                f"# pair {index + 1} {cell.label}: {cell.runs[-1]['rps']:,.0f} req/s",
                file=sys.stderr,
            )


def print_idle(pair: tuple[Cell, Cell]) -> None:
    idle, off = pair
    print("\nHTTP binary at c=64: gRPC on and idle / --grpc-port 0 (pairs back to back)\n")
    print(
        "| pair | gRPC idle req/s | gRPC off req/s | idle / off | gRPC idle server CPU "
        "us/req | gRPC off | idle / off |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ratios, cpu_ratios = [], []
    for index, (a, b) in enumerate(zip(idle.runs, off.runs, strict=True), 1):
        ratios.append(a["rps"] / b["rps"])
        cpu_ratios.append(a["server_us"] / b["server_us"])
        print(
            f"| {index} | {a['rps']:,.0f} | {b['rps']:,.0f} | {ratios[-1]:.3f} | "
            f"{a['server_us']:.0f} | {b['server_us']:.0f} | {cpu_ratios[-1]:.3f} |"
        )
    ratio = statistics.median(ratios)
    verdict = "met" if abs(ratio - 1) <= 0.03 else "missed"
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio,) * 3
    print(
        f"| median | {idle.median('rps'):,.0f} | {off.median('rps'):,.0f} | {ratio:.3f} | "
        f"{idle.median('server_us'):.0f} | {off.median('server_us'):.0f} | "
        f"{statistics.median(cpu_ratios):.3f} |"
    )
    print(
        f"\nreq/s idle / off, median of the per-pair ratios: {ratio:.3f} (quartiles "
        f"{low:.3f}-{high:.3f}; goal within 3 %: {verdict}); server CPU per request idle / "
        f"off: {statistics.median(cpu_ratios):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument(
        "--idle-pairs", type=int, default=8, help="pairs of HTTP cells, gRPC idle and off"
    )
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="seconds per pair's cell")
    parser.add_argument(
        "--mlserver-python",
        default=os.environ.get("MLSERVER_PYTHON", "/tmp/mls/bin/python"),
        help="python of the venv with mlserver 1.7.1 (env MLSERVER_PYTHON)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    command = shlex.join([sys.executable, *sys.argv])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"`{command}`\n\n{versions(args.mlserver_python)}\n\n{args.rounds} rounds, "
        f"{args.duration:g} s per cell after a {WARMUP_SECONDS:g} s warm-up, 1 row per "
        f"request, one `tidegate bench` process per cell on 127.0.0.1; load average at "
        f"start {load}\n"
    )
    root = Path(tempfile.mkdtemp(prefix="bench_grpc-"))
    try:
        paths = build_models([MODEL], root / "onnx")
        payload = make_payload(MODEL, paths[MODEL], root, seed=INPUT_SEEDS[MODEL])
        inputs = {"raw": payload.json_file, "json": payload.json_file}
        inputs["binary"] = write_npz(payload, root)
        grpc_ports = {"tidegate": free_port()}
        with ExitStack() as stack:
            servers = {}
            for name, folder, port in (
                ("tidegate", "tidegate-grpc", grpc_ports["tidegate"]),
                ("tidegate, gRPC off", "tidegate-nogrpc", 0),
            ):
                repo = write_repo(root / folder, paths, batching_config(True))
                server = spawn_tidegate(repo, root / f"{folder}.log", "--grpc-port", str(port))
                servers[name] = stack.enter_context(running(server, [MODEL]))
            for mode in ("off", "on"):
                server = start_mlserver(root, paths, mode == "on", args.mlserver_python)
                servers[f"MLServer {mode}"] = stack.enter_context(running(server, [MODEL]))
                settings = json.loads((root / f"mlserver-{mode}" / "settings.json").read_text())
                grpc_ports[f"MLServer {mode}"] = settings["grpc_port"]
            for name, port in grpc_ports.items():
                check_grpc(f"127.0.0.1:{port}", payload, name)
            answers = record_answers(f"127.0.0.1:{grpc_ports['tidegate']}", payload, root)
            for mode in FLOORS:
                floor = start_floor(mode, answers, root)
                stack.callback(stop, floor.process)
                servers[f"floor {mode}"], grpc_ports[f"floor {mode}"] = floor, floor.port
                check_grpc(f"127.0.0.1:{floor.port}", payload, floor.name)
            cells, idle_pair = make_cells(servers, grpc_ports)
            for round_ in range(args.rounds):
                for cell in cells if round_ % 2 == 0 else cells[::-1]:
                    cell.runs.append(bench(cell, inputs, args.duration, root / "level.json"))
                    print(
                        f"# round {round_ + 1} {cell.label} c={cell.concurrency}: "
                        f"{cell.runs[-1]['rps']:,.0f} req/s, p50 {cell.runs[-1]['p50_ms']:.3f} ms",
                        file=sys.stderr,
                    )
            out = root / "level.json"
            measure_idle(idle_pair, args.idle_pairs, inputs, args.idle_seconds, out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_cells(cells)
    print_ratios(cells)
    print_idle(idle_pair)
    print(f"\nTotal wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
