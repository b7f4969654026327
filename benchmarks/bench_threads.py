"""Which thread settings suit a small machine: onnxruntime's intra-op threads and
tidegate's executor threads, measured on the models of bench_vs_mlserver.py.

For each setting, a `tidegate serve` subprocess with `[runtime] intra_op_threads`
and `--threads` set serves the models (batching on); wrk drives each at the given
concurrencies over the binary protocol (the lightest on the HTTP side, so the
compute shows), and the table gives requests/s and p50/p99 per setting, with the
ratio to the default setting (1 intra-op thread, an executor thread per two cores)
measured in the same run.

    .venv/bin/python benchmarks/bench_threads.py [--duration 4] [--concurrency 1,64]
        [--models tabular,mlp_small,mlp,cnn] [--settings 1x1,1x2,2x1,2x1s,2x2]

A setting "IxT" is I intra-op threads and T executor threads; "IxTs" lets the
intra-op threads spin while idle (onnxruntime's default; tidegate's is not to).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_vs_mlserver import (
    INPUT_SEEDS,
    MAX_BATCH_SIZE,
    Payload,
    Server,
    build_models,
    free_port,
    make_payload,
    run_wrk,
    running,
)

DEFAULT_SETTING = f"1x{max(1, (os.cpu_count() or 1) // 2)}"  # tidegate's defaults


def start(root: Path, models: dict[str, Path], intra: int, threads: int, spin: bool) -> Server:
    """tidegate serving `models` with `intra` intra-op threads (spinning or not while idle)
    and `threads` executor threads."""
    repo = root / f"repo-{intra}x{threads}{'s' if spin else ''}"
    config = (
        f"[batching]\nmax_batch_size = {MAX_BATCH_SIZE}\n[runtime]\nintra_op_threads = {intra}\n"
        f"intra_op_spinning = {'true' if spin else 'false'}\n"
    )
    for name, path in models.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(path, repo / name / "1" / "model.onnx")
        (repo / name / "config.toml").write_text(config)
    port = free_port()
    log = root / f"{repo.name}.log"
    command = [sys.executable, "-m", "tidegate", "serve", str(repo), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--threads", str(threads)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out)
    return Server("tidegate", True, port, process, log)


def measure(server: Server, payload: Payload, conc: int, seconds: float) -> dict[str, float]:
    run_wrk(server.port, payload.model, payload.binary_file, payload.header_length, conc, 1)
    raw = run_wrk(
        server.port, payload.model, payload.binary_file, payload.header_length, conc, seconds
    )
    if raw["errors"]:
        raise RuntimeError(f"{payload.model} c{conc}: {raw['errors']} errors")
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50": raw["p50_us"] / 1e3,
        "p99": raw["p99_us"] / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--models", default="tabular,mlp_small,mlp,cnn")
    parser.add_argument("--settings", default="1x1,1x2,2x1,2x1s,2x2")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.models.split(",")
    settings = args.settings.split(",")
    results: dict[tuple[str, int, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tidegate-threads-") as tmp:
        root = Path(tmp)
        models = build_models(names, root / "onnx")
        payloads = [make_payload(n, models[n], root, INPUT_SEEDS[n]) for n in names]
        for setting in settings:
            intra, threads = (int(n) for n in setting.rstrip("s").split("x"))
            server = start(root, models, intra, threads, setting.endswith("s"))
            with running(server, names) as server:
                for payload in payloads:
                    for conc in levels:
                        cell = measure(server, payload, conc, args.duration)
                        results[(payload.model, conc, setting)] = cell
                        print(f"# {payload.model} c{conc} {setting} {cell}", file=sys.stderr)
    print(f"Command: {' '.join(sys.argv)}\n")
    print("| model | conc | intra x threads | req/s | p50 ms | p99 ms | req/s vs default |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for (model, conc, setting), cell in results.items():
        default = results.get((model, conc, DEFAULT_SETTING))
        ratio = f"{cell['rps'] / default['rps']:.2f}" if default else "-"
        print(
            f"| {model} | {conc} | {setting} | {cell['rps']:,.0f} | {cell['p50']:.3f} | "
            f"{cell['p99']:.3f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
