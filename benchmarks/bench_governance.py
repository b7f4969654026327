"""What canary routing, shadow mirroring, access control and the request log cost the
server, in one run: each configuration against the same server with none of them, and
raw onnxruntime on the same request as the floor.

One model (`tabular`: the shipped breast_cancer classifier, one row per V2 JSON
request) with two identical versions, so that any difference is the serving
machinery's. Each configuration is its own `tidegate serve` subprocess on 127.0.0.1,
driven by wrk at concurrency 1 and 64; configurations take turns within a round and
their order rotates between rounds, so that drifts of the machine hit all alike.

    plain      no traffic policy, no auth file, no request log
    split      a canary (version 1) at 10 % of the traffic, stable version 2
    shadow     stable answers everything; 10 % mirrored to the canary
    auth       --auth-file: every request carries a bearer token
    reqlog     --request-log with sampling 1.0: every request written
    all        split + auth + request log

    python benchmarks/bench_governance.py [--seconds 5] [--rounds 3] [--configs plain,split]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench_vs_mlserver import (
    Payload,
    Result,
    Server,
    _session,
    build_models,
    check,
    make_payload,
    measure,
    running,
    send,
    spawn_tidegate,
    write_repo,
)
from tidegate.auth import hash_token

CONFIGS = ("plain", "split", "shadow", "auth", "reqlog", "all")
TOKEN = "bench-token"
AUTHORIZATION = f"Bearer {TOKEN}"
CANARY_WEIGHT = 10.0
MODEL = "tabular"


def write_repository(root: Path, model: Path) -> Path:
    """tabular versions 1 and 2 (the same file), both served, batching on."""
    repo = write_repo(root / "repo", {MODEL: model}, '[versions]\npolicy = "all"\n')
    shutil.copytree(repo / MODEL / "1", repo / MODEL / "2")
    return repo


def write_auth_file(root: Path) -> Path:
    path = root / "auth.toml"
    roles = '["reader", "inference", "operator"]'
    path.write_text(f'[tokens.bench]\nsha256 = "{hash_token(TOKEN)}"\nroles = {roles}\n')
    return path


def options(config: str, root: Path, auth_file: Path) -> list[str]:
    extra = ["--state-dir", str(root / f"state-{config}-{time.monotonic_ns()}")]
    if config in ("auth", "all"):
        extra += ["--auth-file", str(auth_file)]
    if config in ("reqlog", "all"):
        extra += ["--request-log", str(root / f"requests-{config}")]
    return extra


def set_traffic(server: Server, config: str) -> None:
    policy = {"split": "split", "all": "split", "shadow": "shadow"}.get(config)
    if policy is None:
        return
    body = json.dumps({"stable": "2", "canary": "1", "weight": CANARY_WEIGHT, "mode": policy})
    headers = {"Content-Type": "application/json"}
    if config == "all":
        headers["Authorization"] = AUTHORIZATION
    send(server.port, "PUT", f"/v2/models/{MODEL}/traffic", body, headers)


def raw_onnxruntime(model: Path, payload: Payload, seconds: float = 2.0) -> float:
    """Runs per second of session.run on the request's input, one thread: the floor."""
    session = _session(model)
    name = session.get_inputs()[0].name
    with np.load(
        Path(__file__).resolve().parent.parent / "models/breast_cancer/1/reference.npz"
    ) as npz:
        row = npz[npz.files[0]][:1].astype(np.float32)
    runs = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        session.run(None, {name: row})
        runs += 1
    return runs / seconds


def measure_config(
    config: str, root: Path, repo: Path, auth_file: Path, payload: Payload, seconds: float
) -> list[Result]:
    server = spawn_tidegate(repo, root / f"{config}.log", *options(config, root, auth_file))
    authorization = AUTHORIZATION if config in ("auth", "all") else ""
    with running(server, [MODEL], authorization):
        set_traffic(server, config)
        if not authorization:  # (the check's client sends no token)
            check(server, payload, False)
        return [measure(server, payload, False, conc, seconds, authorization) for conc in (1, 64)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="plain and any of the others")
    args = parser.parse_args(argv)
    configs = [c for c in CONFIGS if c in args.configs.split(",") or c == "plain"]
    results: dict[tuple[str, int], list[Result]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="tidegate-governance-") as tmp:
        root = Path(tmp)
        model = build_models([MODEL], root / "onnx")[MODEL]
        payload = make_payload(MODEL, model, root / "onnx", seed=100)
        repo = write_repository(root, model)
        auth_file = write_auth_file(root)
        floor = raw_onnxruntime(model, payload)
        for round_index in range(args.rounds):
            turn = round_index % len(configs)
            order = configs[turn:] + configs[:turn]
            for config in order:
                for result in measure_config(config, root, repo, auth_file, payload, args.seconds):
                    if result.errors or result.status_errors:
                        raise RuntimeError(f"{config}: {result.errors} errors")
                    results[(config, result.concurrency)].append(result)
                    rate = result.requests / result.seconds
                    cell = f"# round {round_index + 1} {config} c{result.concurrency}"
                    print(f"{cell}: {rate:,.0f} req/s, p50 {result.p50_ms:.3f} ms", file=sys.stderr)
    print(f"raw onnxruntime, one thread: {floor:,.0f} runs/s ({1e3 / floor:.3f} ms per run)")
    print(f"{'config':8} {'c':>3} {'req/s':>9} {'x plain':>8} {'x raw ORT':>9} "
          f"{'p50 ms':>7} {'x plain':>8} {'p99 ms':>7}")  # fmt: skip
    for conc in (1, 64):
        plain = results[("plain", conc)]
        plain_rps = statistics.median(r.requests / r.seconds for r in plain)
        plain_p50 = statistics.median(r.p50_ms for r in plain)
        for config in configs:
            cell = results[(config, conc)]
            rps = statistics.median(r.requests / r.seconds for r in cell)
            p50 = statistics.median(r.p50_ms for r in cell)
            p99 = statistics.median(r.p99_ms for r in cell)
            print(f"{config:8} {conc:>3} {rps:>9,.0f} {rps / plain_rps:>8.3f} {rps / floor:>9.3f} "
                  f"{p50:>7.3f} {p50 / plain_p50:>8.3f} {p99:>7.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
