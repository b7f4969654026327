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
import sys
import tempfile
from pathlib import Path

from bench_vs_mlserver import (
    INPUT_SEEDS,
    MAX_BATCH_SIZE,
    Result,
    Server,
    build_models,
    make_payload,
    measure,
    running,
    spawn_tidegate,
    write_repo,
)

DEFAULT_SETTING = f"1x{max(1, (os.cpu_count() or 1) // 2)}"  # tidegate's defaults


def start(root: Path, models: dict[str, Path], intra: int, threads: int, spin: bool) -> Server:
    """tidegate serving `models` with `intra` intra-op threads (spinning or not while idle)
    and `threads` executor threads."""
    config = (
        f"[batching]\nmax_batch_size = {MAX_BATCH_SIZE}\n[runtime]\nintra_op_threads = {intra}\n"
        f"intra_op_spinning = {'true' if spin else 'false'}\n"
    )
    repo = write_repo(root / f"repo-{intra}x{threads}{'s' if spin else ''}", models, config)
    return spawn_tidegate(repo, root / f"{repo.name}.log", "--threads", str(threads))


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
    results: dict[tuple[str, int, str], Result] = {}
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
                        cell = measure(server, payload, True, conc, args.duration)
                        if cell.errors:
                            raise RuntimeError(f"{payload.model} c{conc}: {cell.errors} errors")
                        results[(payload.model, conc, setting)] = cell
                        print(f"# {payload.model} c{conc} {setting} {cell}", file=sys.stderr)
    print(f"Command: {' '.join(sys.argv)}\n")
    print("| model | conc | intra x threads | req/s | p50 ms | p99 ms | req/s vs default |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for (model, conc, setting), cell in results.items():
        default = results.get((model, conc, DEFAULT_SETTING))
        ratio = f"{cell.rps / default.rps:.2f}" if default else "-"
        print(
            f"| {model} | {conc} | {setting} | {cell.rps:,.0f} | {cell.p50_ms:.3f} | "
            f"{cell.p99_ms:.3f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
