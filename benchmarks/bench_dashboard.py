"""What an open dashboard costs a serving server: throughput with and without a
dashboard reading it every second, in one run.

One `tidegate serve` subprocess on 127.0.0.1 serves a copy of the shipped models, with
a rollout of wine 2 held at its first step (so that the dashboard's summary carries a
traffic window, a judgement and a history, as while an operator watches a rollout).
"Open" is what the page does each second with its heaviest view (drift) shown:
`GET /dashboard/api/summary`, then the drift report of the version under load
(breast_cancer 2, 30 input features), read by a thread of this process (`--browser`:
the real page in headless Chromium instead, whose own CPU then competes with the
server's too).

Two measurements:
- Throughput. One `tidegate bench` closed loop drives breast_cancer (one row per V2
  JSON request) for the whole measurement, cut into `--slice`-second slices with the
  dashboard closed and open in turn (each pair's order alternating), each slice's
  requests counted by the server (its `/stats`, read at both ends of every slice, open
  or closed). Short paired slices, because the throughput of a shared 2-core machine
  wanders by more than the cost between runs of a few seconds. Printed: the medians,
  the median of the pairs' open/closed ratios against the target (at most 2 % cost).
- CPU. The server's own CPU time (user + system from /proc, workers included) over
  `--idle` seconds with no traffic, dashboard closed, then open: the CPU seconds a
  second the reads take, i.e. the share of throughput they take from a server that
  keeps a core busy, measured where nothing else competes.

    .venv/bin/python benchmarks/bench_dashboard.py [--pairs 10] [--slice 2]
        [--concurrency 16] [--workers 1] [--idle 10] [--browser] [--json FILE]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MODEL, VERSION = "breast_cancer", "2"
TARGET_COST = 0.02
POLL_S = 1.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(root: Path, workers: int) -> Iterator[tuple[str, int]]:
    """A server on a copy of the shipped models; yields its base URL and PID."""
    repository = root / "models"
    shutil.copytree(MODELS, repository, ignore=shutil.ignore_patterns(".*"))
    port = free_port()
    command = [sys.executable, "-m", "tidegate", "serve", str(repository), "--port", str(port)]
    command += ["--grpc-port", "0", "--state-dir", str(root / "state"), "--workers", str(workers)]
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.1)
        yield base, process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_load(base: str, concurrency: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """`tidegate bench` in a closed loop for `seconds`, in the background."""
    url = base.removeprefix("http://")
    command = [sys.executable, "-m", "tidegate", "bench", url, "--model", MODEL]
    command += ["--concurrency", str(concurrency), "--duration", str(seconds)]
    command += ["--warmup", "0", "--json", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def served(client: httpx.Client) -> int:
    """Requests the version under load has answered (the whole server's)."""
    stats = client.get(f"/v2/models/{MODEL}/versions/{VERSION}/stats").json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (the workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def idle_cpu(pid: int, seconds: float, poller: "Poller | None") -> float:
    """The server's CPU seconds per second over `seconds`, with no traffic but `poller`'s."""
    started, cpu = time.monotonic(), cpu_seconds(pid)
    if poller is None:
        time.sleep(seconds)
    else:
        with poller:
            time.sleep(seconds)
    return (cpu_seconds(pid) - cpu) / (time.monotonic() - started)


class Poller:
    """What the page does each second with the drift view open: the summary, then the
    drift report of the version shown. Keeps how long each pair of reads took."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.took_ms: list[float] = []
        self.reads_ms: dict[str, list[float]] = {"summary": [], "drift": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        drift = f"/v2/models/{MODEL}/versions/{VERSION}/drift"
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                for name, path in (("summary", "/dashboard/api/summary"), ("drift", drift)):
                    read_started = time.monotonic()
                    client.get(path).raise_for_status()
                    self.reads_ms[name].append((time.monotonic() - read_started) * 1000)
                took = time.monotonic() - started
                self.took_ms.append(took * 1000)
                self._stop.wait(max(0.0, POLL_S - took))

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@contextmanager
def browser_page(base: str) -> Iterator[None]:
    """The real dashboard, drift view on the version under load, in headless Chromium
    (the operating system's)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page()
        page.goto(f"{base}/dashboard#drift")
        page.wait_for_selector("#drift-version option")
        page.select_option("#drift-version", f"{MODEL}/{VERSION}")
        page.wait_for_selector("#drift-table tbody tr")
        try:
            yield
        finally:
            browser.close()


@contextmanager
def dashboard(base: str, browser: bool, took: list[float]) -> Iterator[None]:
    """The dashboard open for the block: the poller, or the real page."""
    if browser:
        with browser_page(base):
            yield
        return
    poller = Poller(base)
    with poller:
        yield
    took += poller.took_ms


def hold_a_rollout(base: str) -> None:
    started = httpx.post(
        f"{base}/v2/models/wine/rollout", json={"version": "2", "min_rows": 10**9}, timeout=60
    )
    started.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10, help="closed/open slice pairs")
    parser.add_argument("--slice", type=float, default=2.0, help="seconds per slice")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of each CPU reading")
    parser.add_argument("--browser", action="store_true", help="the real page in Chromium")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args()

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"# {machine}; load average at start {os.getloadavg()[0]:.2f} (a shared machine)")
    slices: list[dict[str, Any]] = []
    took: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        with serving(root, args.workers) as (base, pid):
            hold_a_rollout(base)
            quiet = idle_cpu(pid, args.idle, None)
            probe = Poller(base)
            watched = idle_cpu(pid, args.idle, probe)
            total = 3.0 + 2 * args.pairs * args.slice + 2.0  # warm-up, slices, spare
            bench = start_load(base, args.concurrency, total, root / "load.json")
            with httpx.Client(base_url=base, timeout=30) as client:
                time.sleep(3.0)  # the load's warm-up, not measured
                for pair in range(args.pairs):
                    order = ["closed", "open"] if pair % 2 == 0 else ["open", "closed"]
                    for state in order:
                        count, started = served(client), time.monotonic()
                        if state == "open":
                            with dashboard(base, args.browser, took):
                                time.sleep(args.slice)
                        else:
                            time.sleep(args.slice)
                        rps = (served(client) - count) / (time.monotonic() - started)
                        slices.append({"pair": pair, "dashboard": state, "requests_per_s": rps})
                        print(f"# pair {pair} {state}: {rps:,.0f} req/s", file=sys.stderr)
            if bench.wait() != 0:
                raise RuntimeError("tidegate bench failed")
            level = json.loads((root / "load.json").read_text())["levels"][0]
            if level["errors"]:
                raise RuntimeError(f"{level['errors']} requests failed")

    def rps(pair: int, state: str) -> float:
        return float(
            next(
                s["requests_per_s"] for s in slices if s["pair"] == pair and s["dashboard"] == state
            )
        )

    medians = {
        state: statistics.median(s["requests_per_s"] for s in slices if s["dashboard"] == state)
        for state in ("closed", "open")
    }
    ratios = [rps(pair, "open") / rps(pair, "closed") for pair in range(args.pairs)]
    ratio = statistics.median(ratios)
    reader = "headless Chromium" if args.browser else "a poller doing what the page does"
    print(
        f"tidegate serve --workers {args.workers}, {MODEL}, tidegate bench closed loop "
        f"c={args.concurrency}; {args.pairs} pairs of {args.slice:g} s slices; dashboard open "
        f"= {reader}, every {POLL_S:g} s"
    )
    print(f"req/s (median of slices): closed {medians['closed']:,.0f}, open {medians['open']:,.0f}")
    quartiles = statistics.quantiles(ratios, n=4)
    spread = f"quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
    spread += f"range {min(ratios):.3f}-{max(ratios):.3f}"
    print(f"open/closed, median of the pairs: {ratio:.3f} ({spread})")
    print(f"open/closed, ratio of the medians: {medians['open'] / medians['closed']:.3f}")
    verdict = "met" if 1 - ratio <= TARGET_COST else "missed"
    print(f"cost of an open dashboard: {1 - ratio:+.1%} of throughput (target <= 2 %: {verdict})")
    print(
        f"whole load: {level['requests_per_s']:,.0f} req/s, p50 {level['p50_ms']:.2f} ms, "
        f"p99 {level['p99_ms']:.2f} ms"
    )
    if took:
        print(
            f"the page's reads each second under load (summary + drift report): median "
            f"{statistics.median(took):.1f} ms, max {max(took):.1f} ms"
        )
    reads = ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in probe.reads_ms.items())
    print(
        f"server CPU with no traffic, {args.idle:g} s each: {quiet:.4f} s/s closed, "
        f"{watched:.4f} s/s open: the dashboard takes {watched - quiet:.2%} of a core "
        f"(reads, median: {reads})"
    )
    if args.json:
        document = {"machine": machine, "slices": slices, "ratios": ratios, "load": level}
        document |= {"idle_cpu": {"closed": quiet, "open": watched}, "reads_ms": took}
        args.json.write_text(json.dumps(document))


if __name__ == "__main__":
    main()
