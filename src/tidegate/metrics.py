"""What `GET /metrics` exposes (with `metrics_merge`, the only prometheus_client
importer).

Everything is computed when scraped, never on the request path: request counts
from the per-version statistics that `/stats` reads too, drift gauges from each
version's drift report. Label cardinality is bounded: at most
`MAX_FEATURES_PER_VERSION` features per model version get a PSI series (the
first ones, in a stable order, so series do not come and go between scrapes);
the per-version maximum PSI covers the rest.

Under `--workers N`, each worker's collectors (`collectors`) cover its own share,
and the worker that is scraped adds the others' (`metrics_merge`, by the rules in
`GAUGE_MERGE`); then `server_collectors` adds what belongs to no worker: the
worker count and restarts, from the supervisor's file, once.
"""

import bisect
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tidegate.control import ControlPlane
from tidegate.drift import kernels_in_use
from tidegate.metrics_merge import Rule
from tidegate.observer import DriftObserver
from tidegate.registry import Registry
from tidegate.requestlog import RequestLog
from tidegate.rollout import STATUSES
from tidegate.stats import LATENCY_BOUNDS_S, Buckets, VersionStats
from tidegate.supervisor import read_status

MAX_FEATURES_PER_VERSION = 100
VERDICTS = {"no_drift": 0.0, "drift": 1.0, "insufficient_data": -1.0}
CONTENT_TYPE = CONTENT_TYPE_LATEST

# How the workers' values of each gauge make the whole server's (see `metrics_merge`;
# counters and histograms are summed). A gauge not named here is summed: fit for a
# per-process quantity, wrong for anything else, so a new gauge belongs here.
GAUGE_MERGE: dict[str, Rule] = {
    "tidegate_inflight_requests": "sum",
    "tidegate_queue_depth": "sum",
    "tidegate_drift_queue_batches": "sum",
    # Each worker loaded the version itself: the slowest load.
    "tidegate_model_load_seconds": "max",
    # With workers, no worker's exposition has these: they are computed once on the
    # windows of every worker added (`whole_server_drift`). Max, should one appear.
    "tidegate_drift_psi": "max",
    "tidegate_drift_max_psi": "max",
    "tidegate_drift_verdict": "max",  # 1 drift, over 0 no drift, over -1 insufficient
    # The same on every worker (one desired state, one kernel build): not summed.
    "tidegate_drift_kernels_info": "same",
    "tidegate_rollout_step": "same",
    "tidegate_rollout_weight_percent": "same",
    "tidegate_rollout_status": "same",
    "tidegate_rollout_check": "same",
}


# Other workers' drift states, per (model, version label): what a version's drift
# gauges add to this worker's own windows (see `drift_collectors`).
OtherDriftStates = dict[tuple[str, str], list[dict[str, Any]]]


class DriftCollector:
    """Drift gauges of every serving version, read from their monitors at scrape time:
    with `others`, over the whole server's windows, else this process's."""

    def __init__(self, registry: Registry, others: OtherDriftStates | None = None) -> None:
        self._registry = registry
        self._others = others or {}

    def collect(self) -> Iterator[Metric]:
        psi = GaugeMetricFamily(
            "tidegate_drift_psi",
            "Population stability index of a feature against the version's reference.",
            labels=["model", "version", "tensor_kind", "feature"],
        )
        max_psi = GaugeMetricFamily(
            "tidegate_drift_max_psi",
            "Largest PSI over the version's features and outputs.",
            labels=["model", "version"],
        )
        verdict = GaugeMetricFamily(
            "tidegate_drift_verdict",
            "The version's drift verdict: 1 drift, 0 no drift, -1 insufficient data.",
            labels=["model", "version"],
        )
        dropped = CounterMetricFamily(
            "tidegate_drift_dropped_batches",
            "Served batches left out of the drift statistics because the queue was full.",
            labels=["model", "version"],
        )
        for deployment in self._registry.deployments():
            others = self._others.get((deployment.name, deployment.version_label), [])
            report: dict[str, Any] = deployment.drift_report(others)
            if report.get("state") != "ready":
                continue
            labels = [deployment.name, deployment.version_label]
            rows = [("input", r) for r in report["inputs"]] + [
                ("output", r) for r in report["outputs"] + report["classes"]
            ]
            for kind, row in rows[:MAX_FEATURES_PER_VERSION]:
                psi.add_metric([*labels, kind, row["name"]], row["psi"])
            summary = report["summary"]
            if summary["max_psi"] is not None:
                max_psi.add_metric(labels, summary["max_psi"])
            verdict.add_metric(labels, VERDICTS[summary["verdict"]])
            dropped.add_metric(labels, report["dropped_batches"])
        yield from (psi, max_psi, verdict, dropped)


class DriftProcessCollector:
    """The drift observer's queue and the kernels this process runs."""

    def __init__(self, observer: DriftObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        observer = self._observer.statistics()
        queue = GaugeMetricFamily(
            "tidegate_drift_queue_batches", "Batches waiting for the drift observer."
        )
        queue.add_metric([], observer.queued)
        kernels = GaugeMetricFamily(
            "tidegate_drift_kernels_info",
            "The drift kernels in use (1): backend aot (compiled ahead of time, no Numba in "
            "the process) or jit (Numba's JIT in the process); absent until drift is on.",
            labels=["backend"],
        )
        if (backend := kernels_in_use()) is not None:
            kernels.add_metric([backend], 1)
        yield from (queue, kernels)


def _histogram(name: str, documentation: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, labels=labels)


def _add_buckets(family: HistogramMetricFamily, labels: list[str], buckets: Buckets) -> None:
    """Adds one series of cumulative buckets (Prometheus's `le`), in seconds."""
    cumulative = list(itertools.accumulate(buckets.counts))
    edges = [*(str(bound) for bound in LATENCY_BOUNDS_S), "+Inf"]
    family.add_metric(labels, list(zip(edges, cumulative, strict=True)), buckets.sum_ns / 1e9)


def _batch_sizes(stats: VersionStats) -> tuple[list[tuple[str, float]], float]:
    """Runs by rows, in power-of-two buckets: (le, cumulative count) pairs and the sum."""
    largest = max(stats.batches, default=1)
    bounds = [2**i for i in range(max(largest, 1).bit_length() + 1)]
    counts = [0] * len(bounds)
    total = 0
    for rows, batch in stats.batches.items():
        runs = batch.compute_infer.count
        counts[bisect.bisect_left(bounds, rows)] += runs
        total += rows * runs
    cumulative = list(itertools.accumulate(counts))
    buckets = [(str(float(b)), float(c)) for b, c in zip(bounds, cumulative, strict=True)]
    return [*buckets, ("+Inf", float(cumulative[-1]))], float(total)


class InferenceCollector:
    """Request, row and run counts, latency and batch-size histograms and queue depth
    of every serving version, read at scrape time from the statistics the hot path
    keeps anyway (Triton's /stats and its bucket counts)."""

    def __init__(self, registry: Registry, in_flight: Callable[[], int]) -> None:
        self._registry = registry
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        variant = [*labels, "variant"]
        requests = CounterMetricFamily(
            "tidegate_inference_requests",
            "Inference requests answered, by variant (stable, canary, shadow: mirrored, "
            "other: a version named in the path) and outcome (success, or failure: 4xx, 503).",
            labels=[*variant, "outcome"],
        )
        latency = {
            part: _histogram(
                f"tidegate_request_{part}_seconds",
                f"Successful requests' {what}, by variant.",
                variant,
            )
            for part, what in (
                ("duration", "time from arrival to the response"),
                ("queue", "time waiting in the version's batch queue"),
                ("compute", "time decoding, running and encoding"),
            )
        }
        batch_size = HistogramMetricFamily(
            "tidegate_batch_size_rows", "Rows per model run (a joined batch).", labels=labels
        )
        rows = CounterMetricFamily(
            "tidegate_inference_rows", "Rows inferred (a batch counts each row).", labels=labels
        )
        runs = CounterMetricFamily(
            "tidegate_inference_runs", "Model runs: one per (joined) batch.", labels=labels
        )
        depth = GaugeMetricFamily(
            "tidegate_queue_depth", "Requests waiting in the version's batch queue.", labels=labels
        )
        load = GaugeMetricFamily(
            "tidegate_model_load_seconds",
            "Seconds the serving version took to build and warm up.",
            labels=labels,
        )
        for deployment in self._registry.deployments():
            version = [deployment.name, deployment.version_label]
            stats = deployment.stats
            # "stable" always, so a version's series exist before its first request.
            for name in sorted({"stable", *stats.latency, *stats.failures}):
                series = stats.latency.get(name)
                success = sum(series.total.counts) if series is not None else 0
                requests.add_metric([*version, name, "success"], success)
                requests.add_metric([*version, name, "failure"], stats.failures.get(name, 0))
                if series is not None:
                    _add_buckets(latency["duration"], [*version, name], series.total)
                    _add_buckets(latency["queue"], [*version, name], series.queue)
                    _add_buckets(latency["compute"], [*version, name], series.compute)
            buckets, total = _batch_sizes(stats)
            batch_size.add_metric(version, buckets, total)
            rows.add_metric(version, stats.inference_count)
            runs.add_metric(version, stats.execution_count)
            depth.add_metric(version, deployment.batcher.depth)
            load.add_metric(version, deployment.load_seconds)
        failures = CounterMetricFamily(
            "tidegate_model_load_failures",
            "Loads of the model that failed (the serving versions were kept).",
            labels=["model"],
        )
        for name, count in sorted(self._registry.load_failures.items()):
            failures.add_metric([name], count)
        in_flight = GaugeMetricFamily(
            "tidegate_inflight_requests", "Inference requests being answered now."
        )
        in_flight.add_metric([], self._in_flight())
        yield from (requests, *latency.values(), batch_size, rows, runs, depth, load)
        yield from (failures, in_flight)


CHECK_VALUES = {"pass": 1.0, "continue": 0.0, "fail": -1.0}


class RolloutCollector:
    """Each model's rollout (step, weight, status, the judge's last verdicts) and its
    shadow traffic, read from the control plane at scrape time."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    def collect(self) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            "tidegate_rollout_step", "The rollout's current step (1-based).", labels=["model"]
        )
        weight = GaugeMetricFamily(
            "tidegate_rollout_weight_percent", "The canary's weight now.", labels=["model"]
        )
        status = GaugeMetricFamily(
            "tidegate_rollout_status",
            "1 for the rollout's status (running, paused, promoted, rolled_back).",
            labels=["model", "status"],
        )
        check = GaugeMetricFamily(
            "tidegate_rollout_check",
            "The judge's last verdict per check: 1 pass, 0 continue, -1 fail.",
            labels=["model", "check"],
        )
        for name, rollout in sorted(self._control.rollouts.items()):
            step.add_metric([name], rollout.step + 1)
            weight.add_metric([name], rollout.weight)
            for state in STATUSES:
                status.add_metric([name, state], float(rollout.status == state))
            for verdict in (rollout.judgement or {}).get("checks", []):
                check.add_metric([name, verdict["name"]], CHECK_VALUES[verdict["verdict"]])
        traffic = self._control.traffic
        mirrored = CounterMetricFamily(
            "tidegate_shadow_mirrored_requests",
            "Requests copied to a shadow canary.",
            labels=["model"],
        )
        dropped = CounterMetricFamily(
            "tidegate_shadow_dropped_requests",
            "Shadow copies dropped because the mirror was full (the request never waited).",
            labels=["model"],
        )
        for name in sorted({*traffic.mirrored, *traffic.mirror_dropped}):
            mirrored.add_metric([name], traffic.mirrored.get(name, 0))
            dropped.add_metric([name], traffic.mirror_dropped.get(name, 0))
        yield from (step, weight, status, check, mirrored, dropped)


class RequestLogCollector:
    """What the request log wrote and dropped (its queue full, or its disk failing)."""

    def __init__(self, request_log: RequestLog) -> None:
        self._log = request_log

    def collect(self) -> Iterator[Metric]:
        written = CounterMetricFamily(
            "tidegate_request_log_written", "Request log entries written."
        )
        written.add_metric([], self._log.written)
        dropped = CounterMetricFamily(
            "tidegate_request_log_dropped",
            "Request log entries dropped: the queue was full, or writing failed.",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], self._log.dropped_full)
        dropped.add_metric(["write_error"], self._log.dropped_error)
        yield from (written, dropped)


class WorkersCollector:
    """The worker count and each slot's restarts, read from the supervisor's file in
    the run directory at scrape time (see `supervisor`); a one-process server (no run
    directory) is one worker, never restarted."""

    def __init__(self, run_dir: Path | None) -> None:
        self._run_dir = run_dir

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "tidegate_workers", "Worker processes the server is configured to run."
        )
        restarts = CounterMetricFamily(
            "tidegate_worker_restarts",
            "Times a worker died and the supervisor restarts it (counted at the death: "
            "the restart follows a back-off).",
            labels=["worker"],
        )
        status = (1, {}) if self._run_dir is None else read_status(self._run_dir)
        if status is not None:
            workers.add_metric([], status[0])
            for slot, count in sorted(status[1].items()):
                restarts.add_metric([slot], count)
        yield from (workers, restarts)


def collectors(
    registry: Registry,
    observer: DriftObserver,
    control: ControlPlane,
    in_flight: Callable[[], int],
    request_log: RequestLog | None,
) -> CollectorRegistry:
    """A private collector registry (not the process-wide default) for one app."""
    collected = CollectorRegistry(auto_describe=False)
    collected.register(InferenceCollector(registry, in_flight))
    collected.register(DriftProcessCollector(observer))
    if not control.peers.enabled:  # else computed once on the merged windows
        collected.register(DriftCollector(registry))
    collected.register(RolloutCollector(control))
    if request_log is not None:
        collected.register(RequestLogCollector(request_log))
    return collected


def server_collectors(run_dir: Path | None) -> CollectorRegistry:
    """What the server has once, not each worker: rendered after the workers' sum."""
    collected = CollectorRegistry(auto_describe=False)
    collected.register(WorkersCollector(run_dir))
    return collected


def whole_server_drift(registry: Registry, others: OtherDriftStates) -> CollectorRegistry:
    """The drift gauges of a server with workers: each version's windows added over
    every worker (`others`: the other workers' drift states), then reported once,
    as `/drift` does. Rendered after the workers' sum."""
    collected = CollectorRegistry(auto_describe=False)
    collected.register(DriftCollector(registry, others))
    return collected


def render(collected: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in `collected` (blocking: reports)."""
    return generate_latest(collected)
