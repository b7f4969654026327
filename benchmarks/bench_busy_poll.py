"""What busy polling after a response buys and what it costs: two tidegate servers on
the same repository (the tabular model, breast_cancer v1), one with `--busy-poll-us`
at its default, one with it at 0 (off), measured in turn in one run, the order
alternating round by round.

- Closed loop at concurrency 1 (wrk, V2 JSON): the client comes straight back, so the
  spin spares the wake-up of a halted CPU. Reported: p50 and p99, req/s, and the
  server's CPU time per request (user + system from /proc around the run), which is
  what the spin costs. And at concurrency 64, where it should change nothing.
- Open loop (`tidegate bench --rate R --arrivals poisson`): at rates where requests
  often come apart, the spin only starts after a quick comeback; reported: the
  server's CPU per request and per second (cores), p50 and p99. This is the cost an
  idle-ish server pays for having it on by default.

Placement as in bench_vs_mlserver (`taskset`): `split` puts the servers on CPU 1 and
the clients on CPU 0, `same` all on CPU 0, `any` leaves it to the scheduler.

    .venv/bin/python benchmarks/bench_busy_poll.py [--rounds 5] [--duration 4]
        [--rates 500,1000,2000] [--placement any|same|split] [--json FILE]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench_vs_mlserver as vs
from bench_dashboard import cpu_seconds, idle_cpu
from tidegate.config import DEFAULT_BUSY_POLL_US

MODEL = "tabular"
CONCURRENCIES = (1, 64)  # 64: where the loop never idles, so the spin must cost nothing


def start(root: Path, models: dict[str, Path], busy_poll_us: int) -> vs.Server:
    """A tidegate server (batching on, as shipped) with the given busy-poll window."""
    name = f"busy-poll-{busy_poll_us}"
    repo = vs.write_repo(root / name, models, vs.batching_config(True))
    return vs.spawn_tidegate(repo, root / f"{name}.log", "--busy-poll-us", str(busy_poll_us))


def closed_loop(
    server: vs.Server, payload: vs.Payload, concurrency: int, seconds: float
) -> dict[str, float]:
    """wrk after a warm-up; latency, req/s and server CPU per request."""
    vs.run_wrk(server.port, MODEL, payload.json_file, None, concurrency, vs.WARMUP_SECONDS)
    cpu = cpu_seconds(server.process.pid)
    raw = vs.run_wrk(server.port, MODEL, payload.json_file, None, concurrency, seconds)
    cpu = cpu_seconds(server.process.pid) - cpu
    if raw["errors"] or raw["status_errors"]:
        raise RuntimeError(f"wrk saw errors: {raw}")
    return {
        "req_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_us": raw["p50_us"],
        "p99_us": raw["p99_us"],
        "cpu_us_per_request": cpu / raw["requests"] * 1e6,
    }


def open_loop(server: vs.Server, rate: int, seconds: float, out: Path) -> dict[str, float]:
    """`tidegate bench` at `rate` Poisson arrivals; latency, server CPU per request and
    per second (the load's CPU, not counting the client's start-up, when the server idles)."""
    command = [sys.executable, "-m", "tidegate", "bench", f"127.0.0.1:{server.port}"]
    command += ["--model", MODEL, "--rate", str(rate), "--arrivals", "poisson"]
    command += ["--duration", str(seconds), "--warmup", "0", "--json", str(out)]
    cpu = cpu_seconds(server.process.pid)
    subprocess.run(vs.pinned(command, vs.placement[1]), check=True, stdout=subprocess.DEVNULL)
    cpu = cpu_seconds(server.process.pid) - cpu
    level = json.loads(out.read_text())["levels"][0]
    if level["errors"]:
        raise RuntimeError(f"tidegate bench saw errors: {level['error_kinds']}")
    return {
        "req_per_s": level["ok_per_s"],
        "p50_us": level["p50_ms"] * 1e3,
        "p99_us": level["p99_ms"] * 1e3,
        "cpu_us_per_request": cpu / level["ok"] * 1e6,
        "server_cores": cpu / level["seconds"],
    }


def measure(
    server: vs.Server, payload: vs.Payload, rates: list[int], seconds: float, root: Path
) -> dict[str, dict[str, float]]:
    """One round on one server: the closed loops, then each open-loop rate."""
    loads = {f"c={c}": closed_loop(server, payload, c, seconds) for c in CONCURRENCIES}
    for rate in rates:
        loads[f"{rate}/s"] = open_loop(server, rate, seconds, root / "bench.json")
    return loads


def median_row(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def print_table(label: str, on: dict[str, float], off: dict[str, float]) -> None:
    """One load's medians, on against off, as Markdown rows."""
    for key in on:
        ratio = f"{on[key] / off[key]:.3f}" if off[key] else "-"
        print(f"| {label} | {key} | {_figure(on[key])} | {_figure(off[key])} | {ratio} |")


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--rates", default="500,1000,2000", help="open-loop requests/s")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    parser.add_argument("--placement", choices=sorted(vs.PLACEMENTS), default="any")
    parser.add_argument("--json", type=Path, help="also dump every sample to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    vs.placement = vs.PLACEMENTS[args.placement]  # read by spawn_tidegate and run_wrk
    rates = [int(rate) for rate in args.rates.split(",") if rate]
    windows = {"on": DEFAULT_BUSY_POLL_US, "off": 0}
    print(f"`{' '.join(sys.argv)}`\n\n{vs.this_machine()}; placement {args.placement}\n")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {w: {} for w in windows}
    with tempfile.TemporaryDirectory(prefix="bench-busy-poll-") as tmp:
        root = Path(tmp)
        models = vs.build_models([MODEL], root / "models")
        payload = vs.make_payload(MODEL, models[MODEL], root, vs.INPUT_SEEDS[MODEL])
        servers = {w: start(root, models, us) for w, us in windows.items()}
        with vs.running(servers["on"], [MODEL]), vs.running(servers["off"], [MODEL]):
            for window, server in servers.items():
                vs.check(server, payload, binary=False)
                samples[window]["idle"] = [{"cores": idle_cpu(server.process.pid, args.idle, None)}]
            for round_ in range(args.rounds):
                order = list(windows) if round_ % 2 == 0 else list(reversed(windows))
                for window in order:
                    loads = measure(servers[window], payload, rates, args.duration, root)
                    for load, sample in loads.items():
                        samples[window].setdefault(load, []).append(sample)
                print(f"# round {round_ + 1}: {json.dumps(_last(samples))}", file=sys.stderr)
    print(f"Medians of {args.rounds} rounds of {args.duration:g} s (on: {windows['on']} us).\n")
    print("| load | figure | on | off | on/off |\n|---|---|---:|---:|---:|")
    for load in samples["on"]:
        print_table(load, median_row(samples["on"][load]), median_row(samples["off"][load]))
    if args.json:
        args.json.write_text(json.dumps(samples, indent=2))


def _last(samples: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    """This round's c=1 p50 and CPU per request, per window, for the progress log."""
    return {
        window: {key: round(loads["c=1"][-1][key]) for key in ("p50_us", "cpu_us_per_request")}
        for window, loads in samples.items()
    }


if __name__ == "__main__":
    main()
