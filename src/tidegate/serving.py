"""One inference request, whatever the transport: route it, batch it, record it.

HTTP (`infer`) and gRPC (`grpc_server`) decode a request into a `codec.InferRequest`
and encode the outputs in their own format; between the two, everything is here
and is the same for both: the traffic policy's choice of version (canary split,
sticky key, shadow), the version's batcher, Triton's statistics, the judge's
windows, and after the answer has left, the drift statistics and the shadow
mirror. So requests of both transports share one batcher per version, one policy,
one drift state and one set of statistics.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from tidegate.canary import ModelTraffic, Traffic
from tidegate.codec import InferRequest
from tidegate.errors import TidegateError
from tidegate.observer import DriftObserver
from tidegate.registry import Deployment, Registry
from tidegate.traffic import TrafficPolicy

Tensors = dict[str, np.ndarray]
Payload = TypeVar("Payload")


@dataclass(slots=True, frozen=True)
class Variant:
    """The role of the version that answered: in statistics, metrics and a header."""

    name: str
    header: tuple[bytes, bytes]


def _named(name: str) -> Variant:
    return Variant(name, (b"tidegate-variant", name.encode()))


STABLE, CANARY, OTHER = _named("stable"), _named("canary"), _named("other")


def _variant(policy: TrafficPolicy, version: int, stable: int) -> Variant:
    """The variant of a request that named its version."""
    if version == policy.canary:
        return CANARY
    return STABLE if version == stable else OTHER


@dataclass(slots=True)  # not frozen: see `codec.InferRequest`
class Served(Generic[Payload]):
    """An answered request: its encoded answer, and what is left to do once it is sent."""

    payload: Payload
    deployment: Deployment
    variant: Variant
    observed: tuple[Tensors, Tensors] | None  # the batch, for the drift statistics
    # In shadow mode, sampled: (model, inputs, rows, stable's outputs) to mirror.
    mirror: tuple[ModelTraffic, Tensors, int, Tensors] | None
    request_id: str | None  # the V2 request's `id`


class InferenceCore:
    def __init__(self, registry: Registry, traffic: Traffic, observer: DriftObserver) -> None:
        self.registry = registry
        self.traffic = traffic
        self.observer = observer

    def resolve(self, model: str, version: str | None) -> Deployment:
        """The version a request names (or the model's stable); NotFound if none."""
        return self.registry.resolve(model, version)

    @staticmethod
    def refused(deployment: Deployment, started: int) -> None:
        """Counts a request refused before it was routed (it did not decode)."""
        deployment.stats.record_failure(time.perf_counter_ns() - started, time.monotonic_ns())

    async def infer(
        self,
        deployment: Deployment,
        version: str | None,
        decoded: InferRequest,
        key: bytes | None,
        started: int,
        decode_ns: int,
        encode: Callable[[Deployment, Tensors], Payload],
    ) -> Served[Payload]:
        """Routes, runs (in a batch) and encodes one decoded request, and records it.
        `deployment` is what `resolve` gave for the request's model and `version`;
        `key` a routing key from the transport's metadata, which wins over the
        request's own parameter; `encode` the transport's answer from the outputs,
        timed as Triton's compute_output."""
        model = deployment.name
        first = next(iter(decoded.inputs.values()))
        rows = first.shape[0] if deployment.max_batch_size and first.ndim else 1
        live = self.traffic.live(model) if version is None else None
        variant = STABLE
        mirror = False
        if live is not None:
            chosen = self.traffic.route(live, key if key is not None else decoded.routing_key)
            canary = self.traffic.canary(live) if chosen and not live.shadow else None
            if canary is not None:
                deployment, variant = canary, CANARY
            mirror = chosen and live.shadow
        elif version is not None:
            stable = self.registry.resolve(model).version
            variant = _variant(self.traffic.policy(model), deployment.version, stable)
        windows = None if live is None else live.windows
        try:
            result = await deployment.batcher.infer(decoded.inputs, rows, decoded.timeout_us)
            encode_start = time.perf_counter_ns()
            payload = encode(deployment, result.outputs)
        except TidegateError:
            deployment.stats.record_failure(
                time.perf_counter_ns() - started, time.monotonic_ns(), variant.name
            )
            if windows is not None:
                self.traffic.record(windows, variant is CANARY, None, None)
            raise
        finished = time.perf_counter_ns()
        deployment.stats.record_success(
            rows,
            (
                finished - started,
                result.queue_ns,
                decode_ns,
                result.run_ns,
                finished - encode_start,
            ),
            time.monotonic_ns(),
            variant.name,
        )
        if windows is not None and rows:  # an empty batch says nothing about a canary
            batch_ns = result.queue_ns + result.run_ns
            self.traffic.record(windows, variant is CANARY, batch_ns, result.outputs)
        mirrored = (
            (live, decoded.inputs, rows, result.outputs) if mirror and live and rows else None
        )
        return Served(payload, deployment, variant, result.observed, mirrored, decoded.id)

    def after(self, served: "Served[Payload]") -> None:
        """What follows a sent answer: the drift statistics of the whole batch, off this
        thread (one request of each batch carries them), and the shadow's mirror."""
        if served.observed is not None:
            drift = served.deployment.drift
            if drift is not None:
                self.observer.submit(drift, *served.observed)
        if served.mirror is not None:
            self.traffic.mirror(*served.mirror)
