"""The whole server's `/metrics` under `--workers N`: every worker's exposition, added.

Why not prometheus-client's multiprocess mode: it aggregates Counter and Gauge
objects that write their values to mmap files as they change. Tidegate has no such
objects: its metrics are custom collectors that compute every value from live
objects (statistics, queues, rollouts) when scraped (see `metrics`). So the worker
that receives `GET /metrics` asks the others for their own exposition (see
`internal`) and adds them to its own here, as the rest of the server merges
statistics: by addition.

How each kind is combined, per sample name and labels:

- counters, and histograms' buckets, `_count` and `_sum`: summed. A histogram
  whose buckets differ between workers (the batch size histogram's end where
  each worker's largest batch is) counts, for each worker, at a bound it lacks,
  what it has at its next lower bound: its buckets stay cumulative.
- summaries: `_count` and `_sum` summed; quantiles cannot be added and are left out
  (tidegate has no summaries).
- gauges: by a rule per family (`metrics.GAUGE_MERGE`): "sum" for per-process
  quantities (requests in flight, queue depths: the default for a gauge not in
  the table), "max" for what cannot be added and has a worst case (a timestamp,
  a load time, a drift PSI or verdict computed from one worker's share of the
  traffic), "same" for what every worker holds alike (an `*_info` gauge of 1,
  a rollout's step): the first exposition's value, the receiving worker's own.

A family that only some workers have is kept with what they have. Exemplars and
sample timestamps are dropped.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Rule = Literal["sum", "max", "same"]
Labels = tuple[tuple[str, str], ...]
HISTOGRAMS = ("histogram", "gaugehistogram")


def _key(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


class _Family:
    """One family's samples over the expositions read so far, in first-seen order."""

    def __init__(self, family: Metric, rule: Rule) -> None:
        self.first = family  # its name, help, type and unit
        self.rule = rule
        self.values: dict[tuple[str, Labels], float] = {}
        # A histogram series (its labels but `le`) -> each worker's {le: cumulative}.
        self.buckets: dict[Labels, list[dict[str, float]]] = {}
        self.order: dict[tuple[str, Labels], None] = {}  # samples, buckets as ("", series)

    def add(self, family: Metric) -> None:
        buckets: dict[Labels, dict[str, float]] = {}
        for sample in family.samples:
            if family.type == "summary" and sample.name == family.name:
                continue  # a quantile
            if family.type in HISTOGRAMS and sample.name == f"{family.name}_bucket":
                series = _key({k: v for k, v in sample.labels.items() if k != "le"})
                buckets.setdefault(series, {})[sample.labels["le"]] = sample.value
                self.order.setdefault(("", series))
                continue
            key = (sample.name, _key(sample.labels))
            self.order.setdefault(key)
            if key not in self.values or self.rule == "same":
                self.values.setdefault(key, sample.value)
            elif self.rule == "sum":
                self.values[key] += sample.value
            else:
                self.values[key] = max(self.values[key], sample.value)
        for series, bounds in buckets.items():
            self.buckets.setdefault(series, []).append(bounds)

    def merged(self) -> Metric:
        first = self.first
        family = Metric(first.name, first.documentation, first.type, first.unit)
        for name, labels in self.order:
            if name:
                family.add_sample(name, dict(labels), self.values[name, labels])
                continue
            for le, count in _cumulative_sum(self.buckets[labels]):
                family.add_sample(f"{family.name}_bucket", {**dict(labels), "le": le}, count)
        return family


def _cumulative_sum(workers: list[dict[str, float]]) -> list[tuple[str, float]]:
    """Adds cumulative buckets whose bounds may differ: at each bound, each worker's
    count at its own greatest bound not above it (0 below its first)."""
    edges = sorted({le for bounds in workers for le in bounds}, key=float)
    totals = []
    for le in edges:
        total = 0.0
        for bounds in workers:
            below = [b for b in bounds if float(b) <= float(le)]
            if below:
                total += bounds[max(below, key=float)]
        totals.append((le, total))
    return totals


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(expositions: Sequence[str], gauges: Mapping[str, Rule]) -> bytes:
    """The expositions (Prometheus text format, the receiving worker's first) as one,
    combined as the module doc says; `gauges` maps a gauge family's name to its rule."""
    families: dict[str, _Family] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                rule = gauges.get(family.name, "sum") if family.type == "gauge" else "sum"
                families[family.name] = _Family(family, rule)
            families[family.name].add(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([family.merged() for family in families.values()]))
    return generate_latest(registry)
