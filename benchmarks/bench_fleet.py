"""What the fleet judge's polling costs a replica: the server's CPU and latency for
the judge's read of it, against one inference request measured in the same run.

Each look of `tidegate fleet rollout` (every `epoch_s`, 1 s by default) reads
`GET /v2/models/{model}/traffic/state` from every replica, over a new connection
(`ControlClient`); after a decision, `GET /v2/state` from each (rare: one per step).
Per replica configuration (`--workers 1,2`): one `tidegate serve` subprocess on
127.0.0.1 (`bench_dashboard.serving`: a copy of the shipped models, gRPC off, its
own state dir), a fleet-judged rollout of wine 2 that nothing judges (so it holds
at step 1), `--warm` single-row wine requests over fresh connections (so that every
worker's step windows hold data), then `--rounds` rounds, each calling in turn, its
order rotating by round:

- poll: sequential `ControlClient.fleet_view` calls (the judge's read, a new
  connection each);
- poll keep-alive: the same read over one kept-alive connection (how much of the
  poll is the connection);
- state: sequential `ControlClient.applied_state` calls (after a decision);
- infer: sequential single-row V2 JSON wine requests over one kept-alive connection
  (a client's serving traffic), the in-run reference;

each kind for `--block` seconds (at least 20 calls): /proc counts CPU in ticks of
10 ms, so a block must hold far more than that.

Server CPU of each block: user + system of the whole process tree (the supervisor and
its workers) from /proc, less the tree's idle CPU rate (measured over `--idle` s
before the rounds) times the block's wall time. Medians over rounds. The share of a
core the polling takes: CPU per poll x one poll a second.

Then (`--pairs` > 0) throughput with and without a judge polling the replica once a
second: one `tidegate bench` closed loop (`bench_dashboard.start_load`, breast_cancer,
`--concurrency`) cut into `--slice`-second slices with the poller off and on in turn,
each slice's requests counted by the server; the median of the pairs' on/off ratios.

    .venv/bin/python benchmarks/bench_fleet.py [--workers 1,2] [--rounds 5] [--block 1]
        [--warm 2000] [--idle 3] [--pairs 6] [--slice 2]
        [--concurrency 16] [--json FILE]
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import tidegate
from bench_dashboard import MODELS, Poller, served, serving, start_load
from bench_workers import listeners
from tidegate.client import ControlClient

MODEL = "wine"
ROLLOUT = {"version": "2", "judge": "fleet", "min_dwell_s": 100000, "max_dwell_s": 100000}
EPOCH_S = 1.0  # the fleet judge's default look interval
KINDS = ("poll", "poll keep-alive", "state", "infer")
MIN_CALLS = 20


def tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc/PID/task/*/children."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(child) for child in children.read_text().split()]
            except OSError:
                continue  # the thread is gone meanwhile
    return found


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants, from /proc/PID/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for process in tree(pid):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def idle_rate(pid: int, seconds: float) -> float:
    """The tree's CPU seconds per second with nothing calling it."""
    cpu, started = tree_cpu(pid), time.monotonic()
    time.sleep(seconds)
    return (tree_cpu(pid) - cpu) / (time.monotonic() - started)


def infer_bodies() -> list[bytes]:
    """One V2 JSON request per reference row of wine 1."""
    rows = np.load(MODELS / MODEL / "1" / "reference.npz")["input"].astype(np.float32)
    tensor = {"name": "input", "shape": [1, rows.shape[1]], "datatype": "FP32"}
    return [json.dumps({"inputs": [tensor | {"data": row.tolist()}]}).encode() for row in rows]


def fill_windows(base: str, bodies: list[bytes], count: int) -> None:
    """`count` inference requests, each on a new connection so that the kernel spreads
    them over the workers: every worker's step windows hold data."""
    path = f"{base}/v2/models/{MODEL}/infer"
    headers = {"Content-Type": "application/json", "Connection": "close"}
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            client.post(path, content=bodies[i % len(bodies)], headers=headers).raise_for_status()


def block(pid: int, idle: float, call: Callable[[int], object], seconds: float) -> dict[str, float]:
    """Sequential calls for `seconds` (at least MIN_CALLS): the server's CPU per call,
    less idle, and the calls' latencies."""
    took: list[float] = []
    cpu, started = tree_cpu(pid), time.monotonic()
    while len(took) < MIN_CALLS or time.monotonic() - started < seconds:
        begun = time.perf_counter()
        call(len(took))
        took.append(time.perf_counter() - begun)
    wall = time.monotonic() - started
    used = tree_cpu(pid) - cpu - idle * wall
    percentiles = statistics.quantiles(took, n=100)
    return {"calls": len(took), "cpu_us": used / len(took) * 1e6} | {
        "p50_ms": percentiles[49] * 1e3,
        "p99_ms": percentiles[98] * 1e3,
    }


class JudgePoller(Poller):
    """The fleet judge's read of one replica every EPOCH_S, in a thread: the dashboard
    benchmark's poller (its thread, start and stop), reading what the judge reads."""

    def _run(self) -> None:
        client = ControlClient(self.base, timeout=30)
        while not self._stop.is_set():
            started = time.monotonic()
            client.fleet_view(MODEL)
            took = time.monotonic() - started
            self.took_ms.append(took * 1000)
            self._stop.wait(max(0.0, EPOCH_S - took))


def throughput(base: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Paired slices of one closed-loop load, the judge's poller off and on in turn."""
    total = 3.0 + 2 * args.pairs * args.slice + 2.0  # warm-up, slices, spare
    out = root / f"load-{time.monotonic_ns()}.json"
    bench = start_load(base, args.concurrency, total, out)
    slices: dict[str, list[float]] = {"off": [], "on": []}
    polls_ms: list[float] = []
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            time.sleep(3.0)  # the load's warm-up, not measured
            for pair in range(args.pairs):
                for state in ("off", "on") if pair % 2 == 0 else ("on", "off"):
                    count, started = served(client), time.monotonic()
                    if state == "on":
                        with JudgePoller(base) as poller:
                            time.sleep(args.slice)
                        polls_ms += poller.took_ms
                    else:
                        time.sleep(args.slice)
                    slices[state].append((served(client) - count) / (time.monotonic() - started))
    finally:
        if bench.wait() != 0:
            raise RuntimeError("tidegate bench failed")
    level = json.loads(out.read_text())["levels"][0]
    if level["errors"]:
        raise RuntimeError(f"{level['errors']} requests failed")
    ratios = [on / off for on, off in zip(slices["on"], slices["off"], strict=True)]
    return {"slices": slices, "ratios": ratios, "ratio": statistics.median(ratios)} | {
        "off_rps": statistics.median(slices["off"]),
        "on_rps": statistics.median(slices["on"]),
        "poll_under_load_ms": statistics.median(polls_ms),
    }


def measure(workers: int, bodies: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_fleet-") as scratch:
        root = Path(scratch)
        with serving(root, workers) as (base, pid):
            if workers > 1:
                wait_for_workers(base, workers)
            rollout = httpx.post(f"{base}/v2/models/{MODEL}/rollout", json=ROLLOUT, timeout=60)
            rollout.raise_for_status()
            fill_windows(base, bodies, args.warm)
            judge = ControlClient(base, timeout=30)
            view = judge.fleet_view(MODEL)
            windows = view["windows"]
            if windows is None or view["rollout"]["status"] != "running":
                raise RuntimeError(f"no live rollout with windows: {view}")
            idle = idle_rate(pid, args.idle)
            keep = httpx.Client(base_url=base, timeout=30)
            infer = f"/v2/models/{MODEL}/infer"
            headers = {"Content-Type": "application/json"}
            calls: dict[str, tuple[Callable[[int], object], float]] = {
                "poll": (lambda i: judge.fleet_view(MODEL), args.block),
                "poll keep-alive": (
                    lambda i: keep.get(f"/v2/models/{MODEL}/traffic/state").raise_for_status(),
                    args.block,
                ),
                "state": (lambda i: judge.applied_state(), args.block),
                "infer": (
                    lambda i: keep.post(
                        infer, content=bodies[i % len(bodies)], headers=headers
                    ).raise_for_status(),
                    args.block,
                ),
            }
            rounds: list[dict[str, dict[str, float]]] = []
            with keep:
                for kind in KINDS:  # one warm-up call of each, not measured
                    calls[kind][0](0)
                for index in range(args.rounds):
                    turn = index % len(KINDS)
                    order = KINDS[turn:] + KINDS[:turn]
                    rounds.append({kind: block(pid, idle, *calls[kind]) for kind in order})
                    line = ", ".join(f"{k} {v['cpu_us']:.0f} us" for k, v in rounds[-1].items())
                    print(f"# w{workers} round {index + 1}: {line}", file=sys.stderr)
            load = throughput(base, root, args) if args.pairs else None
            processes = len(tree(pid))
    size = len(json.dumps(windows))
    return {"workers": workers, "processes": processes, "idle_cpu_s_per_s": idle} | {
        "windows_bytes": size,
        "rounds": rounds,
        "throughput": load,
    }


def wait_for_workers(base: str, workers: int) -> None:
    """Until the kernel shows `workers` sockets listening on the port (a worker listens
    once its models are loaded)."""
    port = int(base.rsplit(":", 1)[1])
    deadline = time.monotonic() + 120
    while listeners(port) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers not listening after 120 s")
        time.sleep(0.2)


def summarize(result: dict[str, Any]) -> dict[str, float]:
    rounds: list[dict[str, dict[str, float]]] = result["rounds"]

    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in rounds)

    row = {f"{kind} {key}": med(kind, key) for kind in KINDS for key in ("cpu_us", "p50_ms")}
    row["ratio"] = statistics.median(r["poll"]["cpu_us"] / r["infer"]["cpu_us"] for r in rounds)
    row["core_share"] = row["poll cpu_us"] * 1e-6 / EPOCH_S
    return row


def header(command: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    return (
        f"`{command}`\n\n{cpu or platform.machine()}, nproc = {os.cpu_count()}; tidegate "
        f"{tidegate.__version__} (Python {platform.python_version()}); load average at "
        f"start {os.getloadavg()[0]:.2f}. Client and server share the cores."
    )


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        "\n| workers | poll CPU us | poll p50 ms | poll keep-alive CPU us | state CPU us ", end=""
    )
    print("| infer CPU us | infer p50 ms | poll/infer CPU | core share at 1 poll/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        s = summarize(result)
        print(
            f"| {result['workers']} | {s['poll cpu_us']:,.0f} | {s['poll p50_ms']:.2f} | "
            f"{s['poll keep-alive cpu_us']:,.0f} | {s['state cpu_us']:,.0f} | "
            f"{s['infer cpu_us']:,.0f} | {s['infer p50_ms']:.2f} | {s['ratio']:.1f}x | "
            f"{s['core_share']:.3%} |"
        )
    print()
    for result in results:
        spread = [f"{cpu:.0f}" for cpu in sorted(r["poll"]["cpu_us"] for r in result["rounds"])]
        print(
            f"- workers {result['workers']} ({result['processes']} processes): idle "
            f"{result['idle_cpu_s_per_s']:.2%} of a core, subtracted; poll CPU us, sorted "
            f"{', '.join(spread)}; windows state {result['windows_bytes']:,} bytes of JSON"
        )
        load = result["throughput"]
        if load is not None:
            quartiles = statistics.quantiles(load["ratios"], n=4)
            print(
                f"  - throughput, {args.pairs} pairs of {args.slice:g} s, c={args.concurrency}: "
                f"off {load['off_rps']:,.0f}, on {load['on_rps']:,.0f} req/s; on/off median "
                f"{load['ratio']:.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, range "
                f"{min(load['ratios']):.3f}-{max(load['ratios']):.3f}); a poll under this "
                f"load took {load['poll_under_load_ms']:.1f} ms (median)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="replica configurations")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=float, default=1.0, help="seconds of each kind's calls")
    parser.add_argument("--warm", type=int, default=2000, help="requests filling the windows")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of the idle reading")
    parser.add_argument("--pairs", type=int, default=6, help="throughput pairs (0: none)")
    parser.add_argument("--slice", type=float, default=2.0, help="seconds per slice")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w]
    print(header(shlex.join([sys.executable, *sys.argv])))
    bodies = infer_bodies()
    started = time.monotonic()
    results = [measure(n, bodies, args) for n in workers]
    report(results, args)
    took = time.monotonic() - started
    print(f"\n(took {took:.0f} s; load average at the end {os.getloadavg()[0]:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str))


if __name__ == "__main__":
    main()
