"""Which model versions serve, and how they are loaded, swapped and unloaded.

Theory of operation
-------------------
The registry maps a model name to an immutable snapshot: a dict of version ->
Deployment. A request resolves its Deployment once, at the start, and keeps the
reference for its whole life. A load builds and warms every new session on a
loader thread, off the event loop, and only then replaces the snapshot in one
assignment: a request that resolved before the swap finishes on the old
Deployment, and one that resolves after it sees the new one. An old session is
released by reference counting once the last request holding it is done, so a
swap drains without bookkeeping. Loads and unloads of the same model are
serialised by a per-model lock; a failed load leaves the serving snapshot as it
was and reports the error.

Every change of a model's snapshot (a load, a reload that drops versions, an
unload of the model or of one version) goes through `_serve`, which releases the
versions it retires in one way: their drift monitors drop the served batches they
hold (a model's outputs are onnxruntime's buffers, each keeping its session's
memory arena alive), and once the versions are freed the C heap's free pages go
back to the OS (malloc_trim). glibc serves a block from its heap instead of a
mapping of its own once it has freed a mapped block as large (its mmap threshold
rises, up to 32 MiB), so sessions' weights soon live in the heap, where freed they
stayed resident: with 16 MiB of weights, 30 per-version
cycles kept 70-200 MiB (benchmarks/RESULTS.md). The trim does not reach the free
top of a thread's own heap, where one such block may stay.
"""

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tidegate.batcher import Batcher
from tidegate.config import DriftConfig, ModelConfig
from tidegate.drift import DriftMonitor, FeatureMap, kernels_in_use, prepare_kernels
from tidegate.errors import BadRequest, ModelLoadError, NotFound, TidegateError
from tidegate.executor import InferenceExecutor
from tidegate.protocol import ascii_number
from tidegate.repository import (
    Fingerprint,
    ModelSource,
    VersionSource,
    has_model_directory,
    load_reference,
    scan,
    scan_model,
)
from tidegate.runtime import OnnxModel
from tidegate.stats import VersionStats

log = logging.getLogger("tidegate.registry")


@dataclass(slots=True, eq=False)
class Deployment:
    """One loaded model version and everything a request needs to use it."""

    name: str
    version: int
    model: OnnxModel
    config: ModelConfig
    fingerprint: Fingerprint  # of the version's files when they were read
    memory_bytes: int | None  # growth of the process's RSS while loading it
    load_seconds: float  # building and warming it
    drift: DriftMonitor | None  # None when [drift] enabled = false
    executor: InitVar[InferenceExecutor]
    stats: VersionStats = field(default_factory=VersionStats)
    # Which change of the desired state built it (see `reconcile`): a process holding
    # another revision of this version must build it again; 0: built at start.
    revision: int = 0
    version_label: str = field(init=False)
    version_header: tuple[bytes, bytes] = field(init=False)
    max_batch_size: int = field(init=False)
    batcher: Batcher = field(init=False)

    def __post_init__(self, executor: InferenceExecutor) -> None:
        # Computed once: the hot path reads these on every request.
        self.version_label = str(self.version)
        self.version_header = (b"tidegate-model-version", self.version_label.encode())
        # Triton's max_batch_size: 0 when the model has no batch axis.
        self.max_batch_size = self.config.batching.max_batch_size if self.model.meta.batched else 0
        self.batcher = Batcher(
            self.model,
            self.config.batching,
            executor,
            self.stats,
            self.config.runtime.inline_below_us * 1000,
        )

    def drift_state(self, others: Sequence[dict[str, Any]] = ()) -> dict[str, object]:
        """The raw drift state, to merge with other workers' or replicas' (see
        `DriftMonitor.merge_snapshot`); plus `others`, other workers' `drift_state`s
        of this version. NotFound when this version has none yet."""
        if self.drift is None or not self.drift.ready:
            raise NotFound(f"model '{self.name}' version {self.version} has no drift state")
        with self.drift.lock:
            windows = self.drift.snapshot([other["windows"] for other in others])
            dropped = self.drift.dropped
        return {
            "model_name": self.name,
            "model_version": self.version_label,
            "reference": {"source": self.drift.source, "digest": self.drift.reference_digest},
            "inputs": list(self.drift.inputs.names),
            "outputs": list(self.drift.outputs.names),
            "dropped_batches": dropped + sum(other["dropped_batches"] for other in others),
            "windows": windows,
        }

    def drift_report(self, others: Sequence[dict[str, Any]] = ()) -> dict[str, object]:
        """The version's drift report (blocking: numpy work under the monitor's lock);
        with `others` (other workers' `drift_state`s), over the whole server's traffic."""
        head: dict[str, object] = {"model_name": self.name, "model_version": self.version_label}
        if self.drift is None:
            return {**head, "state": "disabled"}
        with self.drift.lock:
            report = self.drift.report(time.monotonic(), [other["windows"] for other in others])
            dropped = self.drift.dropped + sum(other["dropped_batches"] for other in others)
        return {**head, "dropped_batches": dropped, "kernels": kernels_in_use(), **report}


# Builds run one at a time, so that the RSS growth during one is its own.
_BUILD_LOCK = threading.Lock()


def _rss_bytes() -> int | None:
    """The process's resident memory, where the OS tells it (Linux /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _trim_heap() -> None:
    """Gives the C heap's free pages back to the OS: glibc's malloc_trim (under a
    millisecond); nothing where the C library has none."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _release(monitors: list[DriftMonitor]) -> None:
    """Lets go of what retired versions hold outside themselves, then of the heap's
    free pages (blocking: runs on a worker thread)."""
    for monitor in monitors:
        monitor.close()
    _trim_heap()


def _build(
    source: ModelSource, version: VersionSource, executor: InferenceExecutor, revision: int
) -> Deployment:
    """Loads and warms one version (blocking: runs on a loader thread)."""
    with _BUILD_LOCK:
        started = time.perf_counter()
        before = _rss_bytes()
        model = OnnxModel(version.model_path, source.config.runtime)
        sample = load_reference(version.reference_path) if version.reference_path else None
        model.warm_up(sample)
        drift = _drift_monitor(source.config.drift, model, sample)
        after = _rss_bytes()
        seconds = time.perf_counter() - started
    memory = None if before is None or after is None else max(after - before, 0)
    return Deployment(
        source.name,
        version.version,
        model,
        source.config,
        version.fingerprint,
        memory,
        seconds,
        drift,
        executor,
        revision=revision,
    )


_REFERENCE_CHUNK = 1024  # rows per run when passing reference data through the model


def _drift_monitor(
    config: DriftConfig, model: OnnxModel, sample: dict[str, np.ndarray] | None
) -> DriftMonitor | None:
    """The version's drift monitor, its reference profiled from reference.npz and the
    model's outputs on it; without one, the first rows served become the reference."""
    if not config.enabled:
        return None
    prepare_kernels()  # compiled (or loaded from cache) here, not on a request
    feeds = model.feeds(sample)
    if model.meta.batched:
        rows = len(next(iter(feeds.values())))
        chunks = [
            model.run(
                {name: array[start : start + _REFERENCE_CHUNK] for name, array in feeds.items()}
            )
            for start in range(0, rows, _REFERENCE_CHUNK)
        ]
        outputs = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
    else:
        outputs = model.run(feeds)
    numeric_outputs = tuple(s for s in model.meta.outputs if s.datatype.numpy.kind == "f")
    monitor = DriftMonitor(
        config,
        FeatureMap.for_tensors(model.meta.inputs, feeds),
        FeatureMap.for_tensors(numeric_outputs, outputs),
        model.meta.outputs,
        time.monotonic(),
    )
    if sample is not None:
        monitor.set_reference(feeds, outputs, "reference.npz")
    return monitor


def _check_inputs(name: str, built: list[Deployment], serving: Deployment | None) -> None:
    """Refuses a version whose inputs differ from the serving one's: clients that work
    now would start failing. Changing a model's inputs takes an unload first."""
    if serving is None:
        return
    want = {spec.name: spec.datatype.name for spec in serving.model.meta.inputs}
    for deployment in built:
        got = {spec.name: spec.datatype.name for spec in deployment.model.meta.inputs}
        if got != want:
            missing = sorted(set(want) - set(got))
            what = f"lacks input '{missing[0]}'" if missing else f"takes inputs {got}"
            raise ModelLoadError(
                f"{deployment.model.path}: version {deployment.version} of model '{name}' "
                f"{what}, unlike version {serving.version} serving now ({want}); "
                "unload the model first to change its inputs"
            )


def _unchanged(deployment: Deployment | None, source: ModelSource, version: VersionSource) -> bool:
    return (
        deployment is not None
        and deployment.fingerprint == version.fingerprint
        and deployment.config == source.config
    )


def _revision(deployment: Deployment | None) -> int | None:
    return None if deployment is None else deployment.revision


def _parse_version(name: str, version: str) -> int:
    number = ascii_number(version)
    if number is None or number < 1:
        raise NotFound(f"model '{name}' has no version '{version}'")
    return number


class Registry:
    def __init__(self, root: Path, executor: InferenceExecutor) -> None:
        self.root = root
        self._executor = executor  # where the versions' batches run
        self._models: dict[str, dict[int, Deployment]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._problems: dict[str, str] = {}  # model name -> why it is not serving
        # model name -> the version that answers when a request names none (its
        # traffic policy's stable); without one, or while it is not loaded, the highest.
        self._stable: dict[str, int] = {}
        self.load_failures: dict[str, int] = {}  # model name -> loads that failed

    # -- reading (the hot path) -------------------------------------------------

    def resolve(self, name: str, version: str | None = None) -> Deployment:
        """The Deployment that answers `name` (at `version`, else the stable one)."""
        versions = self._models.get(name)
        if not versions:
            raise NotFound(f"model '{name}' is not loaded")
        if version is None:
            pinned = versions.get(self._stable.get(name, 0))
            return versions[max(versions)] if pinned is None else pinned
        deployment = versions.get(_parse_version(name, version))
        if deployment is None:
            raise NotFound(f"model '{name}' has no loaded version '{version}'")
        return deployment

    def get(self, name: str, version: int) -> Deployment | None:
        """The loaded Deployment of `name` at `version`, if it is loaded."""
        return self._models.get(name, {}).get(version)

    def pin_stable(self, name: str, version: int | None) -> None:
        """Makes `version` answer requests that name none (None: the highest again)."""
        if version is None:
            self._stable.pop(name, None)
        else:
            self._stable[name] = version

    def versions(self, name: str) -> list[Deployment]:
        """The loaded versions of a model, ascending; NotFound if none is."""
        versions = self._models.get(name)
        if not versions:
            raise NotFound(f"model '{name}' is not loaded")
        return [versions[v] for v in sorted(versions)]

    def is_loaded(self, name: str) -> bool:
        return bool(self._models.get(name))

    def deployments(self) -> Iterator[Deployment]:
        for name in sorted(self._models):
            yield from self.versions(name)

    async def index(self) -> list[dict[str, object]]:
        """Every model of the repository and every loaded one, with its state."""
        result = await asyncio.to_thread(scan, self.root)
        names = sorted(set(result.models) | set(self._models) | set(result.problems))
        rows: list[dict[str, object]] = []
        for name in names:
            loaded = self._models.get(name, {})
            source = result.models.get(name)
            on_disk = set(source.versions) if source else set()
            for version in sorted(on_disk | set(loaded)):
                row: dict[str, object] = {"name": name, "version": str(version)}
                if version in loaded:
                    row |= {"state": "READY", "reason": ""}
                    row["memory_bytes"] = loaded[version].memory_bytes
                else:
                    row |= {"state": "UNAVAILABLE", "reason": self._problems.get(name, "unloaded")}
                rows.append(row)
            if not on_disk and not loaded:
                reason = result.problems.get(name) or self._problems.get(name, "")
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return rows

    # -- changing -------------------------------------------------------------------

    async def load_all(self) -> None:
        """Loads every model of the repository; a model that fails is logged and skipped."""
        result = await asyncio.to_thread(scan, self.root)
        for name, problem in result.problems.items():
            self._problems[name] = problem
            log.error("model %s not loaded: %s", name, problem)
        for name in result.models:
            try:
                await self.load(name)
            except TidegateError as exc:
                log.error("model %s not loaded: %s", name, exc.message)

    async def load(
        self,
        name: str,
        version: str | None = None,
        *,
        reuse_unchanged: bool = False,
        revision: int = 0,
    ) -> list[Deployment]:
        """(Re)loads a model from the repository and returns when the new versions serve.

        Without `version`, the versions the model's policy selects replace those
        serving. With `version`, that one version is (re)loaded beside the others.
        With `reuse_unchanged`, a serving version whose files and config are as they
        were is kept rather than built again (the poller's reload). What it builds
        carries `revision`.

        Raises:
            NotFound: the model or version is not in the repository.
            BadRequest: a file would not load (ModelLoadError, ConfigError); nothing changed.
        """
        async with self._lock(name):
            try:
                source = await asyncio.to_thread(scan_model, self.root, name)
                if version is None:
                    wanted = source.selected()
                else:
                    number = _parse_version(name, version)
                    if number not in source.versions:
                        raise NotFound(f"model '{name}' has no version {number} in the repository")
                    wanted = [source.versions[number]]
                serving = self._models.get(name, {})
                kept = {
                    v.version: serving[v.version]
                    for v in wanted
                    if reuse_unchanged and _unchanged(serving.get(v.version), source, v)
                }
                del serving  # what it retires is freed in _serve, not held by this frame
                to_build = [v for v in wanted if v.version not in kept]
                built = await asyncio.to_thread(
                    lambda: [_build(source, v, self._executor, revision) for v in to_build]
                )
                _check_inputs(name, built, self._highest(name))
            except BadRequest as exc:
                self._problems[name] = exc.message
                self.load_failures[name] = self.load_failures.get(name, 0) + 1
                raise
            snapshot = dict(kept) if version is None else dict(self._models.get(name, {}))
            snapshot.update({d.version: d for d in built})
            await self._serve(name, snapshot)
            self._problems.pop(name, None)
            log.info("model %s serving versions %s", name, sorted(snapshot))
            return built

    async def unload(self, name: str, version: str | None = None) -> str | None:
        """Stops serving a model (or one version); in-flight requests finish first.

        Idempotent, as Triton's unload is ("unloading a model that is not loaded on
        server has no affect and success code will be returned", tritonserver.h): a
        retried or repeated unload must not fail, whether the model was unloaded by an
        earlier call, by a rollout, or was never loaded, even under a name the
        repository does not hold.

        Returns:
            None when it unloaded something; else why there was nothing to unload.

        Raises:
            NotFound: `version` is not a version number at all.
        """
        number = None if version is None else _parse_version(name, version)
        async with self._lock(name):
            versions = self._models.get(name)
            if not versions or (number is not None and number not in versions):
                return await self._nothing_to_unload(name, number)
            remaining: dict[int, Deployment] = {}
            if number is not None:
                remaining = {v: d for v, d in versions.items() if v != number}
            del versions  # what it retires is freed in _serve, not held by this frame
            await self._serve(name, remaining)
            log.info("model %s unloaded (version %s)", name, version or "all")
            return None

    async def _nothing_to_unload(self, name: str, number: int | None) -> str:
        which = f"model '{name}'" if number is None else f"model '{name}' version {number}"
        if await asyncio.to_thread(has_model_directory, self.root, name):
            return f"{which} is already unloaded"
        return f"{which} is not loaded, nor in the repository: nothing to unload"

    async def _serve(self, name: str, snapshot: dict[int, Deployment]) -> None:
        """Makes `snapshot` the model's versions (empty: the model is unloaded) and
        releases the versions it retires (see the module doc). Called with the
        model's lock held, by callers that hold no reference to what it retires:
        the heap is trimmed once they are freed."""
        serving = self._models.get(name, {})
        if snapshot:
            self._models[name] = snapshot
        else:
            self._models.pop(name, None)
        monitors = [
            d.drift for v, d in serving.items() if snapshot.get(v) is not d and d.drift is not None
        ]
        del serving  # the retired versions' last reference, unless a request still holds one
        await asyncio.to_thread(_release, monitors)

    def revisions(self) -> dict[str, dict[int, int]]:
        """Each loaded model's versions and the revision each was built at."""
        return {
            name: {v: d.revision for v, d in versions.items()}
            for name, versions in self._models.items()
        }

    async def reconcile(self, name: str, target: dict[int, int], *, retire: bool) -> None:
        """Brings the model to `target` (version -> revision), the desired state's:
        builds what is missing or at another revision; with `retire`, also stops
        serving versions `target` lacks (an empty target unloads the model).

        Raises:
            NotFound, BadRequest: as `load`; what serves is then unchanged.
        """
        async with self._lock(name):
            serving = dict(self._models.get(name, {}))
            missing = sorted(v for v, rev in target.items() if _revision(serving.get(v)) != rev)
            if missing:
                source = await asyncio.to_thread(scan_model, self.root, name)
                absent = [v for v in missing if v not in source.versions]
                if absent:
                    raise NotFound(f"model '{name}' has no version {absent[0]} in the repository")
                built = await asyncio.to_thread(
                    lambda: [
                        _build(source, source.versions[v], self._executor, target[v])
                        for v in missing
                    ]
                )
                serving.update({d.version: d for d in built})
            if retire:
                serving = {v: d for v, d in serving.items() if v in target}
            if not missing and serving.keys() == self._models.get(name, {}).keys():
                return
            await self._serve(name, serving)
            log.info("model %s serving versions %s", name, sorted(serving))

    def _highest(self, name: str) -> Deployment | None:
        versions = self._models.get(name)
        return versions[max(versions)] if versions else None

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock
