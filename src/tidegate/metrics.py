"""The only prometheus_client importer: what `GET /metrics` exposes.

Everything is computed when scraped, never on the request path: request counts
from the per-version statistics that `/stats` reads too, drift gauges from each
version's drift report. Label cardinality is bounded: at most
`MAX_FEATURES_PER_VERSION` features per model version get a PSI series (the
first ones, in a stable order, so series do not come and go between scrapes);
the per-version maximum PSI covers the rest.
"""

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tidegate.observer import DriftObserver
from tidegate.registry import Registry

MAX_FEATURES_PER_VERSION = 100
VERDICTS = {"no_drift": 0.0, "drift": 1.0, "insufficient_data": -1.0}
CONTENT_TYPE = CONTENT_TYPE_LATEST


class DriftCollector:
    """Drift gauges of every serving version, read from their monitors at scrape time."""

    def __init__(self, registry: Registry, observer: DriftObserver) -> None:
        self._registry = registry
        self._observer = observer

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
            report: dict[str, Any] = deployment.drift_report()
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
        observer = self._observer.statistics()
        queue = GaugeMetricFamily(
            "tidegate_drift_queue_batches", "Batches waiting for the drift observer."
        )
        queue.add_metric([], observer.queued)
        yield from (psi, max_psi, verdict, dropped, queue)


class InferenceCollector:
    """Request, row and run counts and queue depth of every serving version, read from
    the statistics the hot path keeps anyway (Triton's /stats), at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "tidegate_inference_requests",
            "Inference requests answered, by outcome (success, or failure: 4xx and 503).",
            labels=[*labels, "outcome"],
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
        for deployment in self._registry.deployments():
            version = [deployment.name, deployment.version_label]
            stats = deployment.stats
            requests.add_metric([*version, "success"], stats.success.count)
            requests.add_metric([*version, "failure"], stats.fail.count)
            rows.add_metric(version, stats.inference_count)
            runs.add_metric(version, stats.execution_count)
            depth.add_metric(version, deployment.batcher.depth)
        yield from (requests, rows, runs, depth)


def collectors(registry: Registry, observer: DriftObserver) -> CollectorRegistry:
    """A private collector registry (not the process-wide default) for one app."""
    collected = CollectorRegistry(auto_describe=False)
    collected.register(InferenceCollector(registry))
    collected.register(DriftCollector(registry, observer))
    return collected


def render(collected: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in `collected` (blocking: reports)."""
    return generate_latest(collected)
