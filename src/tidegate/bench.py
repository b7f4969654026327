"""`tidegate bench` without the terminal: model metadata, the request pool, load levels
run in one or several client processes, the server's own statistics around each
level, and the results as plain data (JSON and CSV rows). Over HTTP (tidegate.loadgen)
or, for a gRPC target, over gRPC (tidegate.loadgen_grpc).

Several processes split a level (concurrency or rate) between them and their
tallies merge exactly: counts add up and the latency histograms merge by addition.
"""

import csv
import http.client
import multiprocessing
from collections.abc import Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from tidegate import loadgen_grpc
from tidegate.histogram import LatencyHistogram
from tidegate.loadgen import ClientLoad, LevelResult, Plan, Tally, Target, run_level
from tidegate.workload import (
    PreparedRequest,
    input_specs,
    json_requests,
    npz_requests,
    random_requests,
)

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def get_json(target: Target, path: str, timeout: float = 10.0) -> Any:
    """GET a JSON document from the server; None when it answers 404 (no such endpoint)."""
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        connection.request("GET", target.base_path + path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status == 404:
        return None
    if response.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status}: {body[:300]!r}")
    return orjson.loads(body)


def _model_path(model: str, version: str | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def prepare(
    target: Target,
    model: str,
    version: str | None,
    source: str,
    batch_size: int,
    binary: bool,
) -> list[PreparedRequest]:
    """The request pool: from a JSON file of V2 requests, a .npz of rows, or random data
    shaped after the model's metadata. Binary bodies for gRPC, whatever `binary` says."""
    if source.endswith(".json"):
        return json_requests(Path(source))
    if target.grpc:
        binary = True
        metadata = loadgen_grpc.model_metadata(target, model, version)
    else:
        metadata = get_json(target, _model_path(model, version))
    if metadata is None:
        raise RuntimeError(
            f"the server has no model '{model}'" + (f" version {version}" if version else "")
        )
    specs = input_specs(metadata)
    if source == "random":
        return random_requests(specs, batch_size, binary)
    if source.endswith(".npz"):
        return npz_requests(Path(source), specs, batch_size, binary)
    raise ValueError(f"--input must be 'random', a .npz or a .json file, not {source!r}")


@dataclass(frozen=True, slots=True)
class ServerTimes:
    """What the server's Triton-style /stats say about one level: its own count of
    successes, and mean queue and compute time per request."""

    success: int
    queue_ms: float
    compute_ms: float
    total_ms: float


def server_stats(target: Target, model: str, version: str | None) -> dict[str, Any] | None:
    """The model's inference_stats summed over its versions, or None if not offered."""
    try:
        if target.grpc:
            document = loadgen_grpc.model_statistics(target, model, version)
        else:
            document = get_json(target, _model_path(model, version) + "/stats")
    except (OSError, RuntimeError, orjson.JSONDecodeError):
        return None
    if not isinstance(document, dict) or not document.get("model_stats"):
        return None
    total: dict[str, Any] = {}
    for entry in document["model_stats"]:
        for key, value in entry.get("inference_stats", {}).items():
            slot = total.setdefault(key, {"count": 0, "ns": 0})
            slot["count"] += value.get("count", 0)
            slot["ns"] += value.get("ns", 0)
    return total


def server_times(before: dict[str, Any] | None, after: dict[str, Any] | None) -> ServerTimes | None:
    if before is None or after is None or "success" not in after:
        return None

    def delta(key: str) -> tuple[int, int]:
        a, b = after.get(key, {}), before.get(key, {})
        return a.get("count", 0) - b.get("count", 0), a.get("ns", 0) - b.get("ns", 0)

    count, total_ns = delta("success")
    if count <= 0:
        return ServerTimes(count, 0.0, 0.0, 0.0)
    _, queue_ns = delta("queue")
    _, infer_ns = delta("compute_infer")
    return ServerTimes(
        count, queue_ns / count / 1e6, infer_ns / count / 1e6, total_ns / count / 1e6
    )


def split(plan: Plan, parts: int) -> list[Plan]:
    """The plan shared by `parts` client processes: concurrency and rate divided."""
    if parts <= 1:
        return [plan]
    if plan.concurrency is not None:
        shares = [plan.concurrency // parts + (i < plan.concurrency % parts) for i in range(parts)]
        plans = [replace(plan, concurrency=s, seed=plan.seed + i) for i, s in enumerate(shares)]
        return [p for p in plans if p.concurrency]
    assert plan.rate is not None
    return [replace(plan, rate=plan.rate / parts, seed=plan.seed + i) for i in range(parts)]


def _level(
    target: Target,
    model: str,
    version: str | None,
    prepared: list[PreparedRequest],
    plan: Plan,
    live: Tally | None = None,
) -> Coroutine[Any, Any, LevelResult]:
    if target.grpc:
        return loadgen_grpc.run_level(target, model, version, prepared, plan, live)
    return run_level(target, target.infer_path(model, version), prepared, plan, live)


def _run_in_process(
    target: Target, model: str, version: str | None, prepared: list[PreparedRequest], plan: Plan
) -> dict[str, Any]:
    import uvloop

    return level_to_dict(uvloop.run(_level(target, model, version, prepared, plan)))


def run(
    target: Target,
    model: str,
    version: str | None,
    prepared: list[PreparedRequest],
    plan: Plan,
    processes: int = 1,
    live: Tally | None = None,
) -> LevelResult:
    """One level in this process (the caller's event loop is not used), counting into
    `live` as it goes, or split over `processes` client processes, merged at the end."""
    plans = split(plan, processes)
    if len(plans) == 1:
        import uvloop

        return uvloop.run(_level(target, model, version, prepared, plans[0], live))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(plans), mp_context=context) as pool:
        futures = [pool.submit(_run_in_process, target, model, version, prepared, p) for p in plans]
        parts = [level_from_dict(f.result()) for f in futures]
    merged = parts[0]
    for part in parts[1:]:
        merged.tally.merge(part.tally)
        merged.client.lag.merge(part.client.lag)
        merged.client.late.merge(part.client.late)
    seconds = max(part.seconds for part in parts)
    cpu = sum(part.client.cpu for part in parts)
    return LevelResult(
        plan, seconds, merged.tally, ClientLoad(cpu, merged.client.lag, merged.client.late)
    )


def level_to_dict(result: LevelResult) -> dict[str, Any]:
    return {
        "plan": asdict(result.plan),
        "seconds": result.seconds,
        "ok": result.tally.ok,
        "rows": result.tally.rows,
        "errors": result.tally.errors,
        "latency": result.tally.latency.to_dict(),
        "client_cpu": result.client.cpu,
        "client_lag": result.client.lag.to_dict(),
        "client_late": result.client.late.to_dict(),
    }


def level_from_dict(data: dict[str, Any]) -> LevelResult:
    tally = Tally(
        LatencyHistogram.from_dict(data["latency"]), data["ok"], data["rows"], dict(data["errors"])
    )
    client = ClientLoad(
        data["client_cpu"],
        LatencyHistogram.from_dict(data["client_lag"]),
        LatencyHistogram.from_dict(data["client_late"]),
    )
    return LevelResult(Plan(**data["plan"]), data["seconds"], tally, client)


def summary(result: LevelResult, server: ServerTimes | None) -> dict[str, Any]:
    """The numbers of one level, flat: what the table, the CSV and the JSON show."""
    tally, plan = result.tally, result.plan
    row: dict[str, Any] = {
        "mode": plan.mode,
        "arrivals": ("poisson" if plan.poisson else "constant") if plan.mode == "open" else "",
        "level": plan.level,
        "seconds": round(result.seconds, 3),
        "ok": tally.ok,
        "errors": sum(tally.errors.values()),
        "requests_per_s": tally.sent / result.seconds,
        "ok_per_s": tally.ok / result.seconds,
        "rows_per_s": tally.rows / result.seconds,
    }
    for q in PERCENTILES:
        row[f"p{q:g}_ms"] = tally.latency.percentile(q) / 1e6 if tally.latency.count else None
    row["max_ms"] = tally.latency.max_ns / 1e6 if tally.latency.count else None
    row["error_kinds"] = dict(sorted(tally.errors.items()))
    row["client_cpu"] = round(result.client.cpu, 3)
    lag = result.client.lag
    row["client_lag_p99_ms"] = lag.percentile(99) / 1e6 if lag.count else None
    late = result.client.late
    row["client_late_p99_ms"] = late.percentile(99) / 1e6 if late.count else None
    row["excludes_waiting"] = plan.mode == "closed"
    if server is not None:
        row["server_success"] = server.success
        row["server_queue_ms"] = server.queue_ms
        row["server_compute_ms"] = server.compute_ms
        row["server_total_ms"] = server.total_ms
    return row


def write_json(
    path: Path, meta: dict[str, Any], levels: list[tuple[LevelResult, dict[str, Any]]]
) -> None:
    document = {
        **meta,
        "levels": [{**row, "raw": level_to_dict(result)} for result, row in levels],
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    fields = [key for key in rows[0] if key != "error_kinds"] + ["error_kinds"]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "error_kinds": orjson.dumps(row["error_kinds"]).decode()})


def read_json(path: Path) -> dict[str, Any]:
    document = orjson.loads(path.read_bytes())
    if not isinstance(document, dict) or "levels" not in document:
        raise ValueError(f"{path} is not a `tidegate bench --json` file")
    return document
