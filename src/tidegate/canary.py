"""Canary and shadow traffic: which version answers, and what the judge sees of it.

Theory of operation
-------------------
A model with a canary has a `ModelTraffic`: its policy and the windows of the
current rollout step (see `judge`). The inference path asks `route` which side a
request falls on and reports back with `record` once it is answered; a model
without a canary costs one dict lookup. The windows count, per side, requests,
errors, the time spent in the version's batcher (queue and run: what differs
between two versions of a model, unlike decoding or the network) and the
predicted classes.

In shadow mode stable answers every request. A sampled share is mirrored to the
canary after the response has been sent: the copy runs through the canary's own
batcher as a task on the event loop, at most `MIRROR_LIMIT` at a time per model;
past that the copy is dropped and counted, so the client never waits for the
mirror. The canary's outputs are compared with stable's row by row.
"""

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from tidegate.errors import BadRequest, NotFound, TidegateError
from tidegate.judge import ShadowWindow, VariantWindow
from tidegate.observer import DriftObserver
from tidegate.registry import Deployment, Registry
from tidegate.step_windows import StepWindows
from tidegate.traffic import TrafficPolicy, key_point, random_point

log = logging.getLogger("tidegate.canary")

MIRROR_LIMIT = 64  # mirrored requests in flight per model; past it copies are dropped
SHADOW = "shadow"  # the variant of mirrored requests in the canary's statistics

Tensors = dict[str, np.ndarray]


def predictions(outputs: Tensors) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per row: the predicted class (a label output, else the argmax of a score matrix)
    and the scores (a score matrix, else a regressor's single output), where the
    model has them."""
    labels = scores = None
    for array in outputs.values():
        kind = array.dtype.kind
        if labels is None and kind in "iubOSU" and array.ndim == 1:
            labels = array
        elif scores is None and kind == "f" and array.ndim in (1, 2):
            scores = array
    if labels is None and scores is not None and scores.ndim == 2 and scores.shape[1] > 1:
        labels = scores.argmax(axis=1)
    return labels, scores


SMALL_BATCH = 32  # rows below which labels are counted one by one (np.unique costs ~13 us)


def count_labels(window: VariantWindow, labels: np.ndarray) -> None:
    if len(labels) < SMALL_BATCH:
        pairs = zip(labels.tolist(), itertools.repeat(1))
    else:
        values, counts = np.unique(labels, return_counts=True)
        pairs = zip(values.tolist(), counts.tolist(), strict=True)
    table = window.predictions
    for value, count in pairs:
        label = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        table[label] = table.get(label, 0) + count


def score_bins(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each row's bin of its (first) score among `edges`, named "bin <k>": a regressor's
    predictions counted as classes, so the same class-share test judges them."""
    first = scores.reshape(len(scores), -1)[:, 0]
    indices = np.searchsorted(edges, first, side="right")
    return np.array([f"bin {index}" for index in indices.tolist()], dtype=object)


def _score_edges(stable: Deployment) -> np.ndarray | None:
    """The inner edges of stable's first output feature, from its drift reference."""
    drift = stable.drift
    if drift is None or drift.output_profile is None:
        return None
    return np.asarray(drift.output_profile.edges[0])


@dataclass(slots=True, eq=False)
class ModelTraffic:
    """One model's live policy and step windows."""

    name: str
    policy: TrafficPolicy
    windows: StepWindows
    score_edges: np.ndarray | None = None  # see StepWindows
    mirroring: int = 0  # mirrored requests in flight

    @property
    def shadow(self) -> bool:
        return self.policy.mode == "shadow"

    def new_step(self) -> None:
        shadow = ShadowWindow() if self.shadow else None
        self.windows = StepWindows(shadow=shadow, score_edges=self.score_edges)


class Traffic:
    """Every model's traffic policy; routes requests and feeds the judge's windows."""

    def __init__(self, registry: Registry, observer: DriftObserver) -> None:
        self.registry = registry
        self.observer = observer
        self._policies: dict[str, TrafficPolicy] = {}
        self._live: dict[str, ModelTraffic] = {}  # models with a canary, for the hot path
        self._mirrors: set[asyncio.Task[None]] = set()
        # model -> mirrored copies sent and dropped since the start (for /metrics)
        self.mirrored: dict[str, int] = {}
        self.mirror_dropped: dict[str, int] = {}

    # -- policy ---------------------------------------------------------------------

    def policy(self, name: str) -> TrafficPolicy:
        return self._policies.get(name, TrafficPolicy())

    def policies(self) -> dict[str, TrafficPolicy]:
        return dict(self._policies)

    def live(self, name: str) -> ModelTraffic | None:
        return self._live.get(name)

    def check(self, name: str, policy: TrafficPolicy) -> None:
        """NotFound unless every version the policy names is loaded."""
        for role, version in (("stable", policy.stable), ("canary", policy.canary)):
            if version is not None and self.registry.get(name, version) is None:
                raise NotFound(f"{role} version {version} of model '{name}' is not loaded")
        if policy.weight > 0 and policy.canary is None:
            raise BadRequest("a weight above 0 needs a canary version")

    def apply(self, name: str, policy: TrafficPolicy) -> None:
        """Makes `policy` the model's: routing follows it from the next request on. The
        step windows start afresh when the canary, its weight or the mode changes."""
        self._policies[name] = policy
        self.registry.pin_stable(name, policy.stable)
        if not policy.has_canary:
            self._live.pop(name, None)
            return
        current = self._live.get(name)
        if current is None:
            edges = _score_edges(self.registry.resolve(name))
            current = self._live[name] = ModelTraffic(name, policy, StepWindows(), edges)
            current.new_step()
        elif current.policy != policy:
            current.policy = policy
            current.new_step()

    def new_window(self, name: str) -> None:
        """Starts the model's step windows afresh."""
        live = self._live.get(name)
        if live is not None:
            live.new_step()

    # -- the inference path ---------------------------------------------------------

    def route(self, model: ModelTraffic, key: bytes | None) -> bool:
        """Whether this request goes to (or, in shadow mode, is mirrored to) the canary."""
        weight = model.policy.weight
        if key is not None:
            return key_point(key) < weight
        hit = random_point() < weight
        if hit:
            model.windows.split_canary += 1
        else:
            model.windows.split_stable += 1
        return hit

    def canary(self, model: ModelTraffic) -> Deployment | None:
        """The canary's Deployment, while it is loaded."""
        return self.registry.get(model.name, model.policy.canary or 0)

    @staticmethod
    def record(
        windows: StepWindows, canary: bool, batch_ns: int | None, outputs: Tensors | None
    ) -> None:
        """One request answered (`batch_ns` its time in the batcher) or failed (None)."""
        window = windows.canary if canary else windows.stable
        window.requests += 1
        if batch_ns is None or outputs is None:
            window.errors += 1
            return
        window.latency.record(batch_ns)
        labels, scores = predictions(outputs)
        if labels is None and scores is not None and windows.score_edges is not None:
            labels = score_bins(scores, windows.score_edges)
        if labels is not None:
            count_labels(window, labels)

    def mirror(self, model: ModelTraffic, inputs: Tensors, rows: int, answered: Tensors) -> None:
        """Runs a copy of a request stable answered on the canary, later; never waits."""
        windows = model.windows
        shadow = windows.shadow
        canary = self.canary(model)
        if shadow is None or canary is None:
            return
        name = model.name
        if model.mirroring >= MIRROR_LIMIT:
            shadow.dropped += 1
            self.mirror_dropped[name] = self.mirror_dropped.get(name, 0) + 1
            return
        model.mirroring += 1
        shadow.mirrored += 1
        self.mirrored[name] = self.mirrored.get(name, 0) + 1
        task = asyncio.get_running_loop().create_task(
            self._mirrored(model, windows, canary, inputs, rows, answered)
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _mirrored(
        self,
        model: ModelTraffic,
        windows: StepWindows,
        canary: Deployment,
        inputs: Tensors,
        rows: int,
        answered: Tensors,
    ) -> None:
        started = time.perf_counter_ns()
        try:
            result = await canary.batcher.infer(inputs, rows, None)
        except TidegateError:
            canary.stats.record_failure(
                time.perf_counter_ns() - started, time.monotonic_ns(), SHADOW
            )
            windows.canary.requests += 1
            windows.canary.errors += 1
            return
        except Exception:  # a bug must not surface as an unretrieved task error
            log.exception("mirrored request to %s version %s failed", canary.name, canary.version)
            return
        finally:
            model.mirroring -= 1
        batch_ns = result.queue_ns + result.run_ns
        durations = (batch_ns, result.queue_ns, 0, result.run_ns, 0)
        canary.stats.record_success(rows, durations, time.monotonic_ns(), SHADOW)
        self.record(windows, True, batch_ns, result.outputs)
        if windows.shadow is not None:
            stable_labels, stable_scores = predictions(answered)
            canary_labels, canary_scores = predictions(result.outputs)
            windows.shadow.record(stable_labels, canary_labels, stable_scores, canary_scores)
        if result.observed is not None and canary.drift is not None:
            self.observer.submit(canary.drift, *result.observed)
