"""Peak memory of a server with drift on: the kernels compiled ahead of time against Numba's JIT.

Serves two repositories with `python -m tidegate serve`, one server at a time on 127.0.0.1:
  * `shipped`: ./models as shipped (every model; drift on as configured);
  * `bench`: bench_vs_mlserver.py's four models (tabular, mlp, mlp_small, cnn; dynamic
    batching on), the repository whose peak RSS that benchmark compares with MLServer's;
each in three setups: drift on with the kernels compiled ahead of time
(TIDEGATE_KERNELS=aot: no numba in the server), drift on with Numba's JIT
(TIDEGATE_KERNELS=jit) and drift off in every model's config.toml. With --mlserver,
MLServer 1.7.1 serves the bench models too (batching off and on, as bench_vs_mlserver
starts it). wrk drives every model, JSON and binary (MLServer: JSON only), one row per
request, at each concurrency for --duration seconds after a 1 s warm-up. Reported per
server: RSS once ready, peak RSS (VmHWM) after the load, and whether numba's or
llvmlite's shared libraries are mapped in the server process (/proc/PID/maps).

    .venv/bin/python benchmarks/bench_kernel_memory.py [--duration 2] [--mlserver]
"""

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench_vs_mlserver import (
    ALL_MODELS,
    INPUT_SEEDS,
    ROOT,
    Payload,
    Server,
    batching_config,
    build_models,
    machine,
    make_payload,
    measure,
    peak_rss_mib,
    running,
    send,
    spawn_tidegate,
    start_mlserver,
    write_repo,
)
from tidegate.workload import input_specs, npz_requests

DRIFT_OFF = "\n[drift]\nenabled = false\n"
SETUPS = {  # name -> (drift on, TIDEGATE_KERNELS)
    "drift on, AOT kernels": (True, "aot"),
    "drift on, JIT kernels": (True, "jit"),
    "drift off": (False, "auto"),
}


@dataclass
class Row:
    repository: str
    server: str
    setup: str
    ready_mib: float
    peak_mib: float
    numba_mapped: bool
    requests: int
    errors: int


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def numba_mapped(pid: int) -> bool:
    """Whether numba's or llvmlite's shared libraries are in the process's memory."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "/llvmlite/" in maps or "/numba/" in maps


def shipped_repo(root: Path, drift: bool) -> Path:
    """A copy of ./models, with `[drift] enabled = false` added to each config if not drift."""
    repo = root / f"shipped-{'on' if drift else 'off'}"
    shutil.copytree(ROOT / "models", repo, ignore=shutil.ignore_patterns(".*"))
    if not drift:
        for model in repo.iterdir():
            config = model / "config.toml"
            config.write_text((config.read_text() if config.exists() else "") + DRIFT_OFF)
    return repo


def shipped_payloads(server: Server, repo: Path, out: Path) -> list[Payload]:
    """The first reference row of each model's highest version, JSON and binary."""
    payloads = []
    for model in sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")):
        metadata, _ = send(server.port, "GET", f"/v2/models/{model}", "", {})
        document = orjson.loads(metadata)
        version = document["versions"][-1]
        reference = repo / model / version / "reference.npz"
        specs = input_specs(document)
        bodies = [npz_requests(reference, specs, 1, binary, count=1)[0] for binary in (0, 1)]
        json_file, binary_file = out / f"{model}.json", out / f"{model}.bin"
        json_file.write_bytes(bodies[0].body)
        binary_file.write_bytes(bodies[1].body)
        header_length = bodies[1].header_length
        assert header_length is not None
        payloads.append(Payload(model, json_file, binary_file, header_length, {}))
    return payloads


def drive(server: Server, payloads: list[Payload], levels: list[int], seconds: float) -> Row:
    """Every payload x protocol x concurrency; then the server's memory."""
    ready = rss_mib(server.process.pid)
    requests = errors = 0
    protocols = [False, True] if server.name == "tidegate" else [False]
    for payload in payloads:
        for binary in protocols:
            for conc in levels:
                result = measure(server, payload, binary, conc, seconds)
                requests += result.requests
                errors += result.errors
    return Row(
        "", server.name, "", ready, peak_rss_mib(server.process.pid),
        numba_mapped(server.process.pid), requests, errors,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per cell")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--mlserver", action="store_true", help="also MLServer, bench models")
    parser.add_argument("--mlserver-python", default="/tmp/mls/bin/python")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]
    started = time.monotonic()
    print(f"`{shlex.join([sys.executable, *sys.argv])}`\n")
    if args.mlserver:
        print(f"{machine(args.mlserver_python)}\n")
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix="bench_kernel_memory-"))
    try:
        models = list(ALL_MODELS)
        paths = build_models(models, root / "onnx")
        bench_payloads = [make_payload(m, paths[m], root, seed=INPUT_SEEDS[m]) for m in models]
        for setup, (drift, kernels) in SETUPS.items():
            env = {"TIDEGATE_KERNELS": kernels}
            for repository in ("shipped", "bench"):
                if repository == "shipped":
                    repo = shipped_repo(root / setup.replace(" ", "_"), drift)
                    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
                else:
                    config = batching_config(True) + ("" if drift else DRIFT_OFF)
                    repo = write_repo(root / setup.replace(" ", "_") / "bench", paths, config)
                    names = models
                log = repo.parent / f"{repository}.log"
                server = spawn_tidegate(repo, log, env=env)
                with running(server, names):
                    out = repo.parent / f"{repository}-bodies"
                    out.mkdir()
                    payloads = (
                        shipped_payloads(server, repo, out)
                        if repository == "shipped"
                        else bench_payloads
                    )
                    row = drive(server, payloads, levels, args.duration)
                row.repository, row.setup = repository, setup
                print(f"# {row}", file=sys.stderr)
                rows.append(row)
        if args.mlserver:
            for batching in (False, True):
                server = start_mlserver(root, paths, batching, args.mlserver_python)
                with running(server, models):
                    row = drive(server, bench_payloads, levels, args.duration)
                row.repository, row.setup = "bench", f"batching {'on' if batching else 'off'}"
                print(f"# {row}", file=sys.stderr)
                rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print("| repository | server | setup | RSS ready MiB | peak RSS MiB | numba/LLVM mapped "
          "| requests | errors |")  # fmt: skip
    print("|---|---|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r.repository} | {r.server} | {r.setup} | {r.ready_mib:.0f} | {r.peak_mib:.0f} "
            f"| {'yes' if r.numba_mapped else 'no'} | {r.requests:,} | {r.errors} |"
        )
    print(f"\nTotal wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
