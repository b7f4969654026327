"""Configuration as frozen dataclasses, built from TOML in one place.

A model's `config.toml` is optional; every key has a default. An unknown section
or key, or a value of the wrong type, is a `ConfigError` naming the file and the
key, so a typo never silently falls back to a default.
"""

import itertools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidegate.errors import ConfigError

# One intra-op thread is fastest for the small tabular models this runtime targets
# on a small machine: parallelism comes from serving many requests at once. Models
# heavy enough to gain from more say so in their config.toml (bench_threads.py).
DEFAULT_INTRA_OP_THREADS = 1
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_QUEUE_SIZE = 1024
DEFAULT_INLINE_BELOW_US = 50
# A request's head: its target plus header lines, and its number of header fields.
# 32 KiB is what nginx takes at most (4 buffers of 8 KiB), between Node's 16 KiB and
# Envoy's 60 KiB; 100 fields is Apache's and Envoy's limit. V2 clients send a handful of
# short headers; the room is for proxies' forwarding and tracing headers and for
# long bearer tokens.
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_KEEP_ALIVE_S = 5  # uvicorn's default
# How long the event loop keeps polling after a response (see `busy_poll`): a client
# that comes straight back took 20-60 us between a response and its next request on
# the benchmark machine (p90 under 110 us), so 100 us catches it without spinning long
# for one that does not.
DEFAULT_BUSY_POLL_US = 100
# Seconds gRPC calls in flight get at shutdown, after HTTP's drain (a supervisor waits
# for both before it kills a worker).
GRPC_GRACE_S = 30.0
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")


@dataclass(slots=True, frozen=True)
class VersionPolicy:
    """Which versions of a model serve: the highest N, all of them, or a fixed list."""

    kind: str = "latest"  # "latest" | "all" | "specific"
    versions: tuple[int, ...] = ()  # for "specific"
    num_versions: int = 1  # for "latest"

    def select(self, available: list[int]) -> list[int]:
        """The versions to load, ascending, out of those present in the repository."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :]


@dataclass(slots=True, frozen=True)
class BatchingConfig:
    """How a version's requests queue and merge into batches (Triton's dynamic batching)."""

    # The most rows of one request, and of one merged batch (0 = the model has no batch axis).
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # Merge queued requests into one run; false runs every request alone.
    dynamic: bool = True
    # How long the first request of a batch may wait for more to arrive. 0, as in Triton:
    # never wait, take what is queued.
    max_queue_delay_us: int = 0
    # Requests that may wait for a run, per version, before new ones are answered 503.
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE


@dataclass(slots=True, frozen=True)
class RuntimeConfig:
    """onnxruntime session options."""

    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
    inter_op_threads: int = 1
    # Let idle intra-op threads spin waiting for work (onnxruntime's default): lower
    # latency per run, but they take CPU the event loop needs on a small machine.
    intra_op_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    graph_optimization: str = "all"
    execution_mode: str = "sequential"
    # Runs predicted to take less than this run on the event loop itself: handing a
    # run to a thread and back costs ~100-150 us of wake-ups on a small VM, far more
    # than a small tabular model takes. 0 sends every run to the thread pool.
    inline_below_us: int = DEFAULT_INLINE_BELOW_US


@dataclass(slots=True, frozen=True)
class ValidationConfig:
    """Checks on request data beyond datatype and shape."""

    reject_nan: bool = False  # answer 400 to NaN/inf in float inputs the model cannot take


@dataclass(slots=True, frozen=True)
class DriftConfig:
    """Online drift statistics (docs/drift.md): reference bins, decay and the verdict gates."""

    enabled: bool = True
    bins: int = 16  # equal-mass bins per feature, from the reference's quantiles
    reference_rows: int = 1000  # without reference.npz: the first rows served become it
    half_life: int = 100_000  # rows: the weight of traffic halves every this many rows
    psi_warn: float = 0.1  # the effect gate: drift needs PSI at least this ...
    psi_alert: float = 0.25  # ... and PSI above this is a major shift
    alpha: float = 0.05  # ... and the p-value below alpha / number of features


@dataclass(slots=True, frozen=True)
class RolloutConfig:
    """A progressive rollout's steps, pace and the canary judge's thresholds (docs/rollouts.md).

    A model's `[rollout]` section sets its defaults; a rollout request may override any
    key. Reaching the last step, 100 %, is the promotion: at 100 % stable serves
    nothing, so there is nothing left to compare the canary against."""

    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)  # canary weight per step, percent
    mode: str = "split"  # or "shadow": stable answers, the canary runs on a mirrored share
    min_rows: int = 500  # canary requests a step needs before it can pass
    min_dwell_s: float = 30.0  # seconds a step lasts at least
    max_dwell_s: float = 600.0  # past this with no verdict the step holds (and says so)
    epoch_s: float = 1.0  # seconds between two looks of the judge
    alpha: float = 0.05  # false-rollback budget of the whole rollout
    error_margin: float = 0.1  # canary error rate may be at most stable's * (1 + this)
    latency_p99_ratio: float = 1.5  # canary p99 / stable p99 budget
    min_latency_samples: int = 200  # per side, before latency is judged
    psi: float = 0.1  # effect gate of the prediction check (class-share PSI)
    disagreement: float = 0.05  # shadow mode: budget for the rate of differing predictions


@dataclass(slots=True, frozen=True)
class ModelConfig:
    versions: VersionPolicy = field(default_factory=VersionPolicy)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass(slots=True, frozen=True)
class ServerConfig:
    """Settings of one server process, from the CLI."""

    repository: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 * 1024 * 1024
    # The V2 protocol's gRPC transport, as Triton's port; 0: off.
    grpc_port: int = 8001
    # Over these a request gets 431 (a target alone over the bytes, 414): see `connection`.
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S  # an idle connection's life after a response
    busy_poll_us: int = DEFAULT_BUSY_POLL_US  # 0: the event loop blocks at once when idle
    # Threads that run onnxruntime batches, one batch each at a time. Half the cores:
    # the event loop needs the rest. On 2 cores one thread beat two for every model
    # measured, at concurrency 1 and 64 (benchmarks/bench_threads.py).
    executor_threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1) // 2))
    # Seconds between scans of the repository for new, changed or removed versions;
    # None: models change only through the repository API.
    poll_interval: float | None = None
    log_level: str = "info"
    log_format: str = "text"  # or "json": one JSON object per line
    # Traffic policies, rollouts and the audit log; None: <repository>/.tidegate
    state_dir: Path | None = None
    # Named bearer tokens and their roles (see `auth`); None: no access control, which
    # is only allowed on a loopback address unless `insecure_no_auth` says otherwise.
    auth_file: Path | None = None
    insecure_no_auth: bool = False
    # The sampled request log (see `requestlog`): off without a directory.
    request_log_dir: Path | None = None
    request_log_sample: float = 1.0
    request_log_payload: bool = False


class _Section:
    """Reads typed keys out of one TOML table and remembers which it consumed."""

    def __init__(self, path: Path, name: str, table: object) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.table = path, name, table
        self.seen: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        # bool is an int subclass; a flag where a number belongs is a typo, not a 1.
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ConfigError(f"{self.path}: {self.name}.{key} has the wrong type: {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            raise ConfigError(f"{self.path}: {self.name}.{key} must be one of {choices}")
        return value

    def count(self, key: str, default: int, minimum: int) -> int:
        value: int = self.get(key, int, default)
        if value < minimum:
            raise ConfigError(f"{self.path}: {self.name}.{key} must be >= {minimum}")
        return value

    def fraction(self, key: str, default: float, low: float, high: float) -> float:
        value = float(self.get(key, (int, float), default))
        if not low < value < high:
            raise ConfigError(f"{self.path}: {self.name}.{key} must be between {low} and {high}")
        return value

    def number(self, key: str, default: float, minimum: float) -> float:
        value = float(self.get(key, (int, float), default))
        if not value >= minimum:  # also refuses NaN
            raise ConfigError(f"{self.path}: {self.name}.{key} must be >= {minimum}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(f"{self.path}: unknown key {self.name}.{unknown[0]}")


def _version_policy(section: _Section) -> VersionPolicy:
    policy = section.get("policy", (str, list), "latest")
    num_versions = section.count("num_versions", 1, 1)
    if "num_versions" in section.table and policy != "latest":
        raise ConfigError(f"{section.path}: versions.num_versions needs policy = 'latest'")
    if isinstance(policy, list):
        if not policy or not all(isinstance(v, int) and v > 0 for v in policy):
            raise ConfigError(f"{section.path}: versions.policy must list positive version numbers")
        return VersionPolicy("specific", tuple(sorted(policy)))
    if policy not in ("latest", "all"):
        raise ConfigError(f"{section.path}: versions.policy must be 'latest', 'all' or a list")
    return VersionPolicy(policy, num_versions=num_versions)


def _providers(section: _Section) -> tuple[str, ...]:
    providers = section.get("providers", list, ["CPUExecutionProvider"])
    if not providers or not all(isinstance(p, str) for p in providers):
        raise ConfigError(f"{section.path}: runtime.providers must be a list of names")
    return tuple(providers)


def parse_model_config(path: Path, data: dict[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from parsed TOML; `path` is only used in error messages."""
    known = {"versions", "batching", "runtime", "validation", "drift", "rollout"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]")
    sections = {name: _Section(path, name, data.get(name, {})) for name in known}

    versions = _version_policy(sections["versions"])
    batching = _batching(sections["batching"])
    rt = sections["runtime"]
    runtime = RuntimeConfig(
        intra_op_threads=rt.count("intra_op_threads", DEFAULT_INTRA_OP_THREADS, 0),
        inter_op_threads=rt.count("inter_op_threads", 1, 0),
        intra_op_spinning=rt.get("intra_op_spinning", bool, False),
        providers=_providers(rt),
        graph_optimization=rt.choice("graph_optimization", GRAPH_OPTIMIZATION_LEVELS, "all"),
        execution_mode=rt.choice("execution_mode", EXECUTION_MODES, "sequential"),
        inline_below_us=rt.count("inline_below_us", DEFAULT_INLINE_BELOW_US, 0),
    )
    validation = ValidationConfig(sections["validation"].get("reject_nan", bool, False))
    drift = _drift(sections["drift"])
    rollout = _rollout(sections["rollout"], RolloutConfig())
    for section in sections.values():
        section.done()
    return ModelConfig(versions, batching, runtime, validation, drift, rollout)


def _batching(section: _Section) -> BatchingConfig:
    default = BatchingConfig()
    return BatchingConfig(
        max_batch_size=section.count("max_batch_size", default.max_batch_size, 0),
        dynamic=section.get("dynamic", bool, default.dynamic),
        max_queue_delay_us=section.count("max_queue_delay_us", default.max_queue_delay_us, 0),
        max_queue_size=section.count("max_queue_size", default.max_queue_size, 1),
    )


def _drift(section: _Section) -> DriftConfig:
    default = DriftConfig()
    config = DriftConfig(
        enabled=section.get("enabled", bool, default.enabled),
        bins=section.count("bins", default.bins, 2),
        reference_rows=section.count("reference_rows", default.reference_rows, 10),
        half_life=section.count("half_life", default.half_life, 1),
        psi_warn=section.fraction("psi_warn", default.psi_warn, 0, 10),
        psi_alert=section.fraction("psi_alert", default.psi_alert, 0, 10),
        alpha=section.fraction("alpha", default.alpha, 0, 1),
    )
    if config.psi_alert < config.psi_warn:
        raise ConfigError(f"{section.path}: drift.psi_alert must be >= drift.psi_warn")
    return config


def parse_rollout(where: str, table: object, base: RolloutConfig) -> RolloutConfig:
    """`base` with the keys `table` sets (a rollout request's body); unknown keys and
    bad values are a ConfigError (400) naming `where` and the key."""
    section = _Section(Path(where), "rollout", table)
    config = _rollout(section, base)
    section.done()
    return config


def _rollout(section: _Section, base: RolloutConfig) -> RolloutConfig:
    steps = section.get("steps", list, list(base.steps))
    if (
        len(steps) < 2
        or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in steps)
        or any(not 0 < w <= 100 for w in steps)
        or any(a >= b for a, b in itertools.pairwise(steps))
        or steps[-1] != 100
    ):
        raise ConfigError(
            f"{section.path}: rollout.steps must be two or more increasing weights in (0, 100] "
            "ending at 100"
        )
    config = RolloutConfig(
        steps=tuple(float(w) for w in steps),
        mode=section.choice("mode", ("split", "shadow"), base.mode),
        min_rows=section.count("min_rows", base.min_rows, 1),
        min_dwell_s=section.number("min_dwell_s", base.min_dwell_s, 0),
        max_dwell_s=section.number("max_dwell_s", base.max_dwell_s, 0),
        epoch_s=section.number("epoch_s", base.epoch_s, 0.01),
        alpha=section.fraction("alpha", base.alpha, 0, 1),
        error_margin=section.number("error_margin", base.error_margin, 0),
        latency_p99_ratio=section.number("latency_p99_ratio", base.latency_p99_ratio, 1),
        min_latency_samples=section.count("min_latency_samples", base.min_latency_samples, 1),
        psi=section.number("psi", base.psi, 0),
        disagreement=section.fraction("disagreement", base.disagreement, 0, 1),
    )
    if config.max_dwell_s < config.min_dwell_s:
        raise ConfigError(f"{section.path}: rollout.max_dwell_s must be >= rollout.min_dwell_s")
    return config


def load_model_config(path: Path) -> ModelConfig:
    """Reads a model's config.toml; a missing file means all defaults."""
    if not path.exists():
        return ModelConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_model_config(path, data)
