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
  the median of the pairs' open/closed ratios against the target (at most 2 % cost),
  and the same for the server's CPU time per request in each slice (from /proc), which
  wanders less than req/s when other programs take the cores.
- CPU. The server's own CPU time (user + system from /proc, workers included) over
  `--idle` seconds with no traffic, dashboard closed, then open; and, more precisely,
  over `--polls` seconds' worth of the page's reads sent back to back: the server CPU
  one second of an open page takes, i.e. the share of throughput it takes from a
  server that keeps a core busy, measured where nothing else competes.

    .venv/bin/python benchmarks/bench_dashboard.py [--pairs 10] [--slice 2]
        [--concurrency 16] [--workers 1] [--idle 10] [--browser]
        [--reads summary,drift] [--polls 200] [--json FILE]
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


def cpu_per_poll_ms(pid: int, base: str, reads: tuple[str, ...], polls: int) -> float:
    """The server's CPU milliseconds for one second's reads of the page, from `polls` of
    them back to back on the idle server (enough CPU to measure in clock ticks)."""
    poller = Poller(base, reads)
    with httpx.Client(base_url=base, timeout=30) as client:
        client.get("/v2/health/ready")
        cpu = cpu_seconds(pid)
        for _ in range(polls):
            for name in reads:
                client.get(poller.paths[name]).raise_for_status()
        return (cpu_seconds(pid) - cpu) / polls * 1000


class Poller:
    """What the page does each second with the drift view open: the summary, then the
    drift report of the version shown. Keeps how long each pair of reads took."""

    def __init__(self, base: str, reads: tuple[str, ...] = ("summary", "drift")) -> None:
        self.base = base
        self.reads = reads
        self.paths = {
            "summary": "/dashboard/api/summary",
            "drift": f"/v2/models/{MODEL}/versions/{VERSION}/drift",
            "health": "/v2/health/ready",  # a control: a read that costs next to nothing
        }
        self.took_ms: list[float] = []
        self.reads_ms: dict[str, list[float]] = {name: [] for name in reads}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        paths = self.paths
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                for name, path in ((name, paths[name]) for name in self.reads):
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


class BrowserDashboard:
    """The real dashboard in headless Chromium (the operating system's), launched once:
    opened on the drift view of the version under load, closed (about:blank) between."""

    def __init__(self, base: str) -> None:
        from playwright.sync_api import sync_playwright

        self.base = base
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path="/usr/bin/chromium")
        self._page = self._browser.new_page()

    @contextmanager
    def shown(self) -> Iterator[None]:
        page = self._page
        page.goto(f"{self.base}/dashboard#drift")
        page.wait_for_selector("#drift-version option", state="attached")
        page.select_option("#drift-version", f"{MODEL}/{VERSION}")
        try:
            yield
        finally:
            page.goto("about:blank")

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()


@contextmanager
def dashboard(
    browser: BrowserDashboard | None, base: str, reads: tuple[str, ...], took: list[float]
) -> Iterator[None]:
    """The dashboard open for the block: the real page, or the poller."""
    if browser is not None:
        with browser.shown():
            yield
        return
    poller = Poller(base, reads)
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
    parser.add_argument("--polls", type=int, default=200, help="back-to-back polls timed")
    parser.add_argument("--browser", action="store_true", help="the real page in Chromium")
    parser.add_argument(
        "--reads",
        default="summary,drift",
        help="what the poller reads each second: summary, drift, health (a control)",
    )
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args()
    reads = tuple(args.reads.split(","))

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
            per_poll = cpu_per_poll_ms(pid, base, reads, args.polls)
            total = 3.0 + 2 * args.pairs * args.slice + 2.0  # warm-up, slices, spare
            browser = BrowserDashboard(base) if args.browser else None
            bench = start_load(base, args.concurrency, total, root / "load.json")
            with httpx.Client(base_url=base, timeout=30) as client:
                time.sleep(3.0)  # the load's warm-up, not measured
                for pair in range(args.pairs):
                    order = ["closed", "open"] if pair % 2 == 0 else ["open", "closed"]
                    for state in order:
                        count, started, cpu = served(client), time.monotonic(), cpu_seconds(pid)
                        if state == "open":
                            with dashboard(browser, base, reads, took):
                                time.sleep(args.slice)
                        else:
                            time.sleep(args.slice)
                        done = served(client) - count
                        rps = done / (time.monotonic() - started)
                        us = (cpu_seconds(pid) - cpu) / max(done, 1) * 1e6
                        row = {"pair": pair, "dashboard": state, "requests_per_s": rps}
                        slices.append(row | {"cpu_us": us})
                        print(
                            f"# pair {pair} {state}: {rps:,.0f} req/s, {us:.0f} us CPU/req",
                            file=sys.stderr,
                        )
            if browser is not None:
                browser.close()
            if bench.wait() != 0:
                raise RuntimeError("tidegate bench failed")
            level = json.loads((root / "load.json").read_text())["levels"][0]
            if level["errors"]:
                raise RuntimeError(f"{level['errors']} requests failed")

    def rps(pair: int, state: str, key: str = "requests_per_s") -> float:
        return float(next(s[key] for s in slices if s["pair"] == pair and s["dashboard"] == state))

    medians = {
        state: statistics.median(s["requests_per_s"] for s in slices if s["dashboard"] == state)
        for state in ("closed", "open")
    }
    ratios = [rps(pair, "open") / rps(pair, "closed") for pair in range(args.pairs)]
    ratio = statistics.median(ratios)
    reader = "headless Chromium" if args.browser else f"a poller reading {'+'.join(reads)}"
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
    cpu_ratios = [rps(p, "open", "cpu_us") / rps(p, "closed", "cpu_us") for p in range(args.pairs)]
    cpu_quartiles = statistics.quantiles(cpu_ratios, n=4)
    closed_us = statistics.median(s["cpu_us"] for s in slices if s["dashboard"] == "closed")
    print(
        f"server CPU per request, open/closed, median of the pairs: "
        f"{statistics.median(cpu_ratios):.3f} (quartiles {cpu_quartiles[0]:.3f}-"
        f"{cpu_quartiles[2]:.3f}; closed {closed_us:.0f} us)"
    )
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
    read_times = ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in probe.reads_ms.items())
    print(
        f"server CPU with no traffic, {args.idle:g} s each: {quiet:.4f} s/s closed, "
        f"{watched:.4f} s/s open: the dashboard takes {watched - quiet:.2%} of a core "
        f"(reads, median: {read_times})"
    )
    print(
        f"server CPU per second's reads ({'+'.join(reads)}), {args.polls} back to back on the "
        f"idle server: {per_poll:.2f} ms, i.e. {per_poll / 10:.2f} % of a core with the page "
        f"open (the cost to a server that keeps one core busy)"
    )
    if args.json:
        document = {"machine": machine, "slices": slices, "ratios": ratios, "load": level}
        document |= {"cpu_ratios": cpu_ratios, "cpu_per_poll_ms": per_poll}
        document |= {"idle_cpu": {"closed": quiet, "open": watched}, "reads_ms": took}
        args.json.write_text(json.dumps(document))


if __name__ == "__main__":
    main()
