"""How throughput and latency scale with `tidegate serve --workers N`, and what each
worker process costs in memory, in one run.

One `tidegate serve --workers N` subprocess per N on 127.0.0.1, all started once, serves
the models of bench_vs_mlserver.py (`tabular`, `cnn`) from one fresh repository (batching
and drift on). Each must answer every model right and, for N > 1, once the kernel shows
N sockets listening on its port, 200 warm-up requests over fresh connections, so that
every worker has run its models. wrk (-t1, v2_request.lua, V2 JSON, one row per request)
drives each (model, concurrency) cell on each server in turn after a 1 s warm-up; who
goes first rotates by round, so that drifts of the machine hit all alike. Tables:
medians over rounds, ratios to 1 worker, scaling efficiency (req/s with N / (N x req/s
with 1)); memory: VmRSS of the supervisor and of each worker, and their summed PSS, after
one pass of every cell, drift on and off. wrk and the servers share the cores.

    .venv/bin/python benchmarks/bench_workers.py [--workers 1,2] [--concurrency 1,8,64]
        [--duration 5] [--rounds 3] [--models tabular,cnn] [--drift on,off] [--json FILE]
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tidegate
from bench_vs_mlserver import (
    INPUT_SEEDS,
    READY_TIMEOUT,
    WARMUP_SECONDS,
    WRK,
    Payload,
    Result,
    Server,
    batching_config,
    build_models,
    check,
    make_payload,
    measure,
    post,
    running,
    spawn_tidegate,
    stop,
    write_repo,
)

WARMUP_REQUESTS = 200  # over fresh connections, so the kernel spreads them over the workers
DRIFT_OFF = "\n[drift]\nenabled = false\n"
Cell = tuple[str, int, int]  # model, concurrency, workers


def start(root: Path, repo: Path, drift: str, workers: int) -> Server:
    """One server; its own state dir, so that servers sharing the repository do not share
    traffic policies or an audit log."""
    name = f"drift-{drift}-w{workers}"
    extra = ["--workers", str(workers), "--state-dir", str(root / f"state-{name}")]
    return spawn_tidegate(repo, root / f"{name}.log", *extra)


def warm(server: Server, payloads: list[Payload], workers: int) -> None:
    """Every model answers right; with N > 1, once all N workers listen, WARMUP_REQUESTS
    successful requests more, each on a new connection, so that no worker meets its first
    requests in a measured run."""
    for payload in payloads:
        check(server, payload, False)
    if workers == 1:
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while (ready := listeners(server.port)) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ready} of {workers} workers listen after {READY_TIMEOUT:g} s")
        time.sleep(0.1)
    bodies = [(p.model, p.json_file.read_bytes()) for p in payloads]
    done = failed = 0
    while done < WARMUP_REQUESTS and failed < WARMUP_REQUESTS:
        model, body = bodies[(done + failed) % len(bodies)]
        try:
            post(server.port, model, body, None)
            done += 1
        except (OSError, RuntimeError):
            failed += 1
            time.sleep(0.05)
    print(f"# {workers} workers warmed: {done} requests, {failed} failed", file=sys.stderr)
    if done < WARMUP_REQUESTS:
        raise RuntimeError(f"{workers} workers: {failed} warm-up requests failed")


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:`port` (SO_REUSEPORT: one per worker that has loaded
    its models; the supervisor's socket is bound but never listens), from the kernel."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(row[1] == f"0100007F:{port:04X}" and row[3] == "0A" for row in rows)


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (this kernel has no /proc/PID/task/*/children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return sorted(found)


def mib(path: str, field: str) -> float:
    """A `Field: N kB` line of a /proc file, in MiB."""
    return int(Path(path).read_text().split(f"\n{field}:", 1)[1].split()[0]) / 1024


def memory(server: Server, drift: str, workers: int) -> dict[str, Any]:
    """VmRSS of the supervisor and of its children, the workers (a server without children
    is one process, its own worker, with no supervisor); and their summed PSS, which
    counts once the pages they share (shared libraries), where the sum of RSS counts each."""
    pid = server.process.pid
    kids = children(pid)
    if kids and len(kids) != workers:
        print(f"# note: --workers {workers} has {len(kids)} children", file=sys.stderr)
    rss = {p: mib(f"/proc/{p}/status", "VmRSS") for p in [pid, *kids]}
    pss = sum(mib(f"/proc/{p}/smaps_rollup", "Pss") for p in rss)
    row: dict[str, Any] = {"drift": drift, "workers": workers, "pid": pid, "worker_pids": kids}
    row |= {"supervisor_mib": rss[pid] if kids else None, "total_pss_mib": pss}
    row |= {"worker_mib": [rss[k] for k in kids] or [rss[pid]], "total_mib": sum(rss.values())}
    return row


def one_pass(
    servers: dict[int, Server], order: list[int], payloads: list[Payload], args: argparse.Namespace
) -> list[tuple[int, Result]]:
    """Every (model, concurrency) cell once, on each server in `order` back to back."""
    results = []
    for payload in payloads:
        for conc in args.levels:
            for n in order:
                cell = measure(servers[n], payload, False, conc, args.duration)
                print(f"# w{n} {cell.model} c{conc}: {cell.rps:,.0f} req/s", file=sys.stderr)
                results.append((n, cell))
    return results


def header(args: argparse.Namespace, command: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    wrk = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.split()[1]
    return (
        f"`{command}`\n\n{cpu or platform.machine()}, os.cpu_count() = {os.cpu_count()}; "
        f"tidegate {tidegate.__version__} (Python {platform.python_version()}); wrk {wrk}. "
        f"V2 JSON, 1 row per request, batching on, drift on; wrk -t1 on 127.0.0.1; "
        f"{args.duration:g} s per cell after a {WARMUP_SECONDS:g} s warm-up; {args.rounds} "
        f"round(s), the servers' order rotating; medians over rounds.\n"
    )


def summarize(runs: list[Result]) -> dict[str, float]:
    """Medians over rounds, and the spread of req/s."""
    rps = [r.rps for r in runs]
    return {"rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps)} | {
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "errors": sum(r.errors for r in runs),
        "status_errors": sum(r.status_errors for r in runs),
    }


def print_model(model: str, stats: dict[Cell, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\n### {model}\n")
    print("| workers | conc | req/s | req/s min-max | p50 ms | p99 ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for workers in args.workers:
        for conc in args.levels:
            s = stats[(model, conc, workers)]
            errors = f"**{s['errors']:.0f} ({s['status_errors']:.0f} HTTP >= 400)**"
            spread = f"{s['rps_min']:,.0f}-{s['rps_max']:,.0f}"
            latency = f"{s['p50_ms']:.3f} | {s['p99_ms']:.3f}"
            print(f"| {workers} | {conc} | {s['rps']:,.0f} | {spread} | {latency} | ", end="")
            print(f"{errors if s['errors'] else 0} |")
    if 1 not in args.workers or len(args.workers) == 1:
        return  # nothing to compare with 1 worker
    low = min(args.levels)
    print(f"\nAgainst 1 worker (efficiency: req/s with N / (N x req/s with 1); p50 at c={low})\n")
    print(f"| workers | conc | req/s ratio | req/s per worker | efficiency | p50 ratio c={low} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers in args.workers:
        for conc in args.levels:
            s, one = stats[(model, conc, workers)], stats[(model, conc, 1)]
            ratio = s["rps"] / one["rps"]
            p50 = s["p50_ms"] / one["p50_ms"] if conc == low else None
            print(
                f"| {workers} | {conc} | {ratio:.2f} | {s['rps'] / workers:,.0f} | "
                f"{ratio / workers:.2f} | {'' if p50 is None else f'{p50:.2f}'} |"
            )


def print_memory(rows: list[dict[str, Any]]) -> None:
    print("\n### Memory\n\nVmRSS after one pass of every cell (supervisor -: a single")
    print("process, its own worker); PSS counts pages the processes share once.\n")
    print("| drift | workers | supervisor MiB | each worker MiB | total MiB | total PSS MiB |")
    print("|---|---:|---:|---|---:|---:|")
    for row in rows:
        sup = "-" if row["supervisor_mib"] is None else f"{row['supervisor_mib']:.0f}"
        each = ", ".join(f"{m:.0f}" for m in row["worker_mib"])
        total = f"{row['total_mib']:.0f} | {row['total_pss_mib']:.0f}"
        print(f"| {row['drift']} | {row['workers']} | {sup} | {each} | {total} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4")
    parser.add_argument("--concurrency", default="1,8,64", help="wrk connections per cell")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="tabular,cnn", help="from bench_vs_mlserver")
    parser.add_argument("--drift", default="on,off", help="drift settings to measure memory of")
    parser.add_argument("--json", type=Path, help="also dump everything to this file")
    args = parser.parse_args()
    args.workers = sorted({int(w) for w in args.workers.split(",") if w})
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    args.models = [m for m in args.models.split(",") if m]
    args.drift = [d for d in args.drift.split(",") if d]
    if not set(args.drift) <= {"on", "off"} or min(args.workers) < 1 or args.rounds < 1:
        raise SystemExit("--drift takes on, off or on,off; --workers and --rounds >= 1")
    return args


def main() -> None:
    args = parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    header_text = header(args, command)
    print(header_text)
    cells: dict[Cell, list[Result]] = defaultdict(list)
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench_workers-") as tmp:
        root = Path(tmp)
        paths = build_models(args.models, root / "onnx")
        payloads = [make_payload(m, paths[m], root, INPUT_SEEDS[m]) for m in args.models]
        for drift in ("on", *(d for d in args.drift if d == "off")):
            config = batching_config(True) + (DRIFT_OFF if drift == "off" else "")
            repo = write_repo(root / f"repo-drift-{drift}", paths, config)
            with ExitStack() as stack:
                servers = {n: start(root, repo, drift, n) for n in args.workers}
                for server in servers.values():  # stopped even if another never gets ready
                    stack.callback(stop, server.process)
                for n, server in servers.items():
                    stack.enter_context(running(server, args.models))
                    warm(server, payloads, n)
                # Throughput with drift on over all rounds; drift off gets one pass, the
                # load its memory figure is read after.
                for round_index in range(args.rounds if drift == "on" else 1):
                    turn = round_index % len(args.workers)
                    order = args.workers[turn:] + args.workers[:turn]
                    for n, result in one_pass(servers, order, payloads, args):
                        if drift == "on":
                            cells[(result.model, result.concurrency, n)].append(result)
                        extra = {"rps": result.rps, "workers": n, "round": round_index + 1}
                        raw.append(asdict(result) | extra | {"drift": drift})
                    if round_index == 0 and drift in args.drift:
                        rows += [memory(servers[n], drift, n) for n in args.workers]
    stats = {cell: summarize(runs) for cell, runs in cells.items()}
    for model in args.models:
        print_model(model, stats, args)
    print_memory(rows)
    if args.json:
        medians = [{"model": m, "conc": c, "workers": n} | s for (m, c, n), s in stats.items()]
        document = {"header": header_text, "cpu_count": os.cpu_count(), "args": vars(args)}
        document |= {"results": raw, "medians": medians, "memory": rows}
        args.json.write_text(json.dumps(document, indent=2, default=str))


if __name__ == "__main__":
    main()
