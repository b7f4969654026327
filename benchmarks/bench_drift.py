"""What the inline drift statistics cost the server: throughput and latency with
drift on and off, in one run, and the memory of the drift state per feature.

Two `tidegate serve` subprocesses on 127.0.0.1 serve the same shipped models,
one with `[drift] enabled = false` in every config.toml. The same lean HTTP
client as bench_http.py drives breast_cancer v1 (the tabular model), one row
per V2 JSON request, at concurrency 1 and 64; the two servers take turns, and
which goes first alternates by round, so that drifts of the machine hit both alike.
Besides the ratios of the totals it prints, for concurrency 64, each round's pair:
req/s on/off and server CPU per request on/off (the process's CPU, the drift
thread's included), and their medians over the rounds. A slow spell of a shared
machine moves one cell of a round and so the ratio of the totals; the median of
the rounds' ratios leaves it out.

`--simultaneous` measures concurrency 64 differently: both servers pinned to CPU 1
and loaded at the same time, one wrk each (on CPU 0, 64 connections), so that they
share one CPU and whatever the machine does at each instant; the ratio of the
requests they answer is then the inverse ratio of their CPU cost per request, and
the machine's wandering, which moves sequential cells by 10-20 %, cancels within
each round. Which wrk starts first alternates by round.

`--placement split` pins both servers (every thread) to CPU 1 and this client to
CPU 0: unpinned, whichever vCPU a server's event loop lands on, and what else runs
there, moved one server's throughput by 10-20 % for minutes at a time on the
2-vCPU benchmark machine, in either direction. `--control` serves the "off" side
with drift on too: an on/on run, whose ratios show what the bench itself puts
between two identical servers.

    python benchmarks/bench_drift.py [--duration 5] [--rounds 2] [--placement any|split]
        [--control] [--simultaneous]
"""

import argparse
import os
import shutil
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import bench_vs_mlserver as vs
from bench_dashboard import cpu_seconds
from bench_http import Result, bench_http, first_row, free_port, infer_request, start_server
from tidegate.config import ModelConfig
from tidegate.executor import InferenceExecutor
from tidegate.registry import _build
from tidegate.repository import scan_model

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL, VERSION = "breast_cancer", 1


def without_drift(target: Path) -> Path:
    shutil.copytree(MODELS, target)
    for model in target.iterdir():
        config = model / "config.toml"
        text = config.read_text() if config.exists() else ""
        config.write_text(text + "\n[drift]\nenabled = false\n")
    return target


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def drift_bytes_per_feature() -> tuple[int, int]:
    """Bytes of drift state (profile and windows) of the model version, per feature."""
    source = scan_model(MODELS, MODEL)
    deployment = _build(source, source.versions[VERSION], InferenceExecutor(1), 0)
    monitor = deployment.drift
    assert monitor is not None
    assert monitor.input_profile is not None
    arrays = [monitor.input_profile.edges, monitor.input_profile.lo, monitor.input_profile.hi]
    arrays += [monitor.input_profile.mean, monitor.input_profile.std]
    arrays += list(monitor.input_profile.reference.to_arrays().values())
    for window in (monitor.windows()["inputs"], monitor._epoch["inputs"]):
        arrays += list(window.to_arrays().values())
    features = len(monitor.input_profile.names)
    return sum(a.nbytes for a in arrays) // features, ModelConfig().drift.bins


def print_rounds(
    results: dict[tuple[str, int], list[Result]],
    cpu_per_request: dict[tuple[str, int], list[float]],
    conc: int,
) -> None:
    """Each round's on/off pair at `conc`, and the medians of their ratios."""
    print(f"\nConcurrency {conc}, round by round (server CPU per request in us)\n")
    print("| round | req/s on | req/s off | on/off | CPU on | CPU off | on/off |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    pairs = zip(
        results[("on", conc)],
        results[("off", conc)],
        cpu_per_request[("on", conc)],
        cpu_per_request[("off", conc)],
        strict=True,
    )
    rate_ratios, cpu_ratios = [], []
    for number, (on, off, cpu_on, cpu_off) in enumerate(pairs, 1):
        rate_ratios.append(on.rps / off.rps)
        cpu_ratios.append(cpu_on / cpu_off)
        print(
            f"| {number} | {on.rps:,.0f} | {off.rps:,.0f} | {rate_ratios[-1]:.3f} | "
            f"{cpu_on:.1f} | {cpu_off:.1f} | {cpu_ratios[-1]:.3f} |"
        )
    print(
        f"\nMedians of the rounds' ratios at concurrency {conc}: req/s on/off "
        f"{statistics.median(rate_ratios):.3f}, server CPU per request on/off "
        f"{statistics.median(cpu_ratios):.3f}"
    )


def at_once(ports: dict[str, int], body: Path, first: str, seconds: float) -> dict[str, float]:
    """Both servers under wrk at the same time (`first`'s started first); req/s each."""
    order = [first, *(mode for mode in ports if mode != first)]
    with ThreadPoolExecutor(len(order)) as pool:
        runs = {
            mode: pool.submit(
                vs.run_wrk, ports[mode], MODEL, body, None, 64, seconds, version=str(VERSION)
            )
            for mode in order
        }
        raw = {mode: run.result() for mode, run in runs.items()}
    for mode, numbers in raw.items():
        if numbers["errors"] or numbers["status_errors"]:
            raise RuntimeError(f"wrk saw errors from the {mode} server: {numbers}")
    return {mode: n["requests"] / (n["duration_us"] / 1e6) for mode, n in raw.items()}


def simultaneous(ports: dict[str, int], request: bytes, rounds: int, seconds: float) -> None:
    """Rounds of `at_once` at concurrency 64, printed with their on/off ratios."""
    vs.placement = vs.PLACEMENTS["split"]  # wrk on CPU 0
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        Path(body.name).write_bytes(request.split(b"\r\n\r\n", 1)[1])
        at_once(ports, Path(body.name), "on", 1.0)  # warm
        firsts = [("on", "off")[number % 2] for number in range(rounds)]
        pairs = [at_once(ports, Path(body.name), first, seconds) for first in firsts]
    print("| round | started first | req/s on | req/s off | on/off |\n|---:|---|---:|---:|---:|")
    for number, (first, pair) in enumerate(zip(firsts, pairs, strict=True), 1):
        print(
            f"| {number} | {first} | {pair['on']:,.0f} | {pair['off']:,.0f} | "
            f"{pair['on'] / pair['off']:.3f} |"
        )
    ratios = [pair["on"] / pair["off"] for pair in pairs]
    totals = sum(pair["on"] for pair in pairs) / sum(pair["off"] for pair in pairs)
    print(
        f"\nConcurrency 64, both servers at once: req/s on/off {totals:.3f} (totals), "
        f"{statistics.median(ratios):.3f} (median of the rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--placement", choices=("any", "split"), default="any")
    parser.add_argument("--control", action="store_true", help="drift on in both servers")
    parser.add_argument("--simultaneous", action="store_true", help="c=64, both at once")
    args = parser.parse_args()
    request = infer_request(MODEL, VERSION, first_row(MODEL, VERSION), binary=False)
    with tempfile.TemporaryDirectory() as scratch:
        ports = {"on": free_port(), "off": free_port()}
        off_models = Path(scratch) / "models"
        if args.control:
            shutil.copytree(MODELS, off_models)
        else:
            without_drift(off_models)
        servers = {
            "on": start_server(ports["on"], MODELS),
            "off": start_server(ports["off"], off_models),
        }
        try:
            if args.placement == "split" or args.simultaneous:
                for server in servers.values():
                    pin(server.pid, {1})
                os.sched_setaffinity(0, {0})
            if args.simultaneous:
                print(
                    f"# {MODEL} v{VERSION}, V2 JSON, 1 row per request, {args.rounds} rounds "
                    f"of {args.duration:g} s, both servers at once on CPU 1"
                    f"{', CONTROL: drift on in both servers' if args.control else ''}\n"
                )
                simultaneous(ports, request, args.rounds, args.duration)
                return
            results: dict[tuple[str, int], list[Result]] = {}
            cpu_per_request: dict[tuple[str, int], list[float]] = {}
            for round_number in range(args.rounds):
                # Alternate who goes first: whichever does was measured ~4 % slower at
                # concurrency 64 in an on/on control run of this script.
                order = ("on", "off") if round_number % 2 == 0 else ("off", "on")
                for conc in (1, 64):
                    for mode in order:
                        bench_http(ports[mode], request, conc, 0.5)  # warm
                        cpu = cpu_seconds(servers[mode].pid)
                        result = bench_http(ports[mode], request, conc, args.duration)
                        cpu = cpu_seconds(servers[mode].pid) - cpu
                        results.setdefault((mode, conc), []).append(result)
                        per_request = cpu / result.requests * 1e6
                        cpu_per_request.setdefault((mode, conc), []).append(per_request)
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(30)
    print(
        f"# {MODEL} v{VERSION}, V2 JSON, 1 row per request, {args.rounds} rounds of "
        f"{args.duration:g} s per cell, placement {args.placement}"
        f"{', CONTROL: drift on in both servers' if args.control else ''}\n"
    )
    print("| conc | drift | req/s | p50 ms | p99 ms | req/s on/off | p50 on/off | p99 on/off |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for conc in (1, 64):
        rows = {}
        for mode in ("on", "off"):
            runs = results[(mode, conc)]
            latencies = np.concatenate([r.latencies_ns for r in runs])
            rps = sum(r.requests for r in runs) / sum(r.seconds for r in runs)
            rows[mode] = (
                rps,
                np.percentile(latencies, 50) / 1e6,
                np.percentile(latencies, 99) / 1e6,
            )
        for mode in ("on", "off"):
            rps, p50, p99 = rows[mode]
            ratios = [
                f"{rows['on'][i] / rows['off'][i]:.3f}" if mode == "on" else "" for i in range(3)
            ]
            print(
                f"| {conc} | {mode} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {' | '.join(ratios)} |"
            )
    print_rounds(results, cpu_per_request, 64)
    per_feature, bins = drift_bytes_per_feature()
    print(
        f"\nDrift state: {per_feature} bytes per feature ({bins} bins), "
        f"{per_feature * 30 / 1024:.1f} KiB for the model's 30 input features."
    )


if __name__ == "__main__":
    main()
