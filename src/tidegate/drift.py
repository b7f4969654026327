"""Online drift statistics of one model version: the reference profile, the state
updated on every batch, and the report computed when read (see docs/drift.md).

Theory of operation
-------------------
A batch's tensors become a matrix of features (`FeatureMap`): each column of a
numeric input is a feature, an input of rank 3 or more (an image) is profiled
by its per-channel means, and a BYTES input by the UTF-8 length of each string.
Numeric outputs are profiled the same way; a 2-D float output with several
columns (class scores) also counts its argmax class and its top score, and an
integer or string label output counts its labels.

The reference (`Profile`) holds, per feature, B equal-mass bin edges from the
reference's quantiles, the reference's own bin counts, mean, standard
deviation and range. It comes from reference.npz (run through the model for
the outputs) or from the first `reference_rows` rows served.

The state (`Window`) is sums only: integer bin counts and range/NaN counts,
shifted moments, and min/max, updated by one fused kernel call per batch in
`kernels`. Two windows merge by addition. Recent traffic weighs more through
epochs: the counts of the current epoch are exact integers; when an epoch
closes (every `EPOCH_SECONDS`), the decayed window is multiplied by
2^(-rows / half_life) for the rows the epoch saw and the epoch is added to it.
Decay costs nothing per row and a quiet model keeps its history.

Pure: no I/O and no clock of its own; time comes in as an argument. The caller
serialises updates and reads (see `observer`).
"""

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidegate import kernel_backend
from tidegate.config import DriftConfig
from tidegate.kernel_backend import KernelSet
from tidegate.pending import PendingBatches
from tidegate.protocol import TensorSpec

EPOCH_SECONDS = 10.0
# A monitor's raw state (see `DriftMonitor.snapshot`): window -> field -> nested lists.
Snapshot = dict[str, dict[str, list[Any]]]


MIN_ROWS_PER_BIN = 5  # fewer than 5 * B rows in the window: insufficient data


def _kernels() -> KernelSet:
    """The drift kernels, chosen on first use rather than with tidegate: by default the
    ahead-of-time extension, which keeps Numba and LLVM (about 130 MiB) out of the
    process; Numba's JIT where that cannot be built (see `kernel_backend`)."""
    return kernel_backend.kernels()


def prepare_kernels() -> None:
    """Builds or loads the kernels (or has Numba compile them) before any request."""
    _kernels().warm_up()


def kernels_in_use() -> str | None:
    """ "aot" or "jit" once a model with drift has loaded; None before."""
    chosen = kernel_backend.active()
    return None if chosen is None else chosen.backend


# -- features ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class FeatureMap:
    """How a batch's tensors become a (rows, features) float matrix."""

    specs: tuple[TensorSpec, ...]
    names: tuple[str, ...]

    @classmethod
    def for_tensors(
        cls, specs: tuple[TensorSpec, ...], sample: dict[str, np.ndarray]
    ) -> "FeatureMap":
        """The features of `specs`, named after a sample batch's shapes."""
        kept, names = [], []
        for spec in specs:
            if spec.name not in sample:
                continue
            columns = _columns(spec, sample[spec.name]).shape[1]
            kept.append(spec)
            prefix = f"len({spec.name})" if spec.datatype.name == "BYTES" else spec.name
            names += [prefix] if columns == 1 else [f"{prefix}[{j}]" for j in range(columns)]
        return cls(tuple(kept), tuple(names))

    def extract(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """The batch as one C-contiguous float matrix (float32 when every part is)."""
        parts = [_columns(spec, tensors[spec.name]) for spec in self.specs]
        matrix = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if matrix.dtype not in (np.float32, np.float64):
            matrix = matrix.astype(np.float64)
        return np.ascontiguousarray(matrix)


def _columns(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """One tensor as (rows, columns): rows on axis 0, as the batch axis."""
    if spec.datatype.name == "BYTES":
        lengths = np.asarray(np.vectorize(_utf8_length, otypes=[np.float64])(array))
        return lengths.reshape(len(array), -1) if array.ndim else lengths.reshape(1, 1)
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim >= 3:  # an image: the mean of each channel
        return np.asarray(array.reshape(array.shape[0], array.shape[1], -1).mean(axis=2))
    return array.reshape(len(array), -1)


def _utf8_length(value: object) -> float:
    if isinstance(value, bytes | bytearray):
        return float(len(value))
    return float(len(str(value).encode("utf-8")))


# -- the reference ---------------------------------------------------------------------


@dataclass(slots=True)
class Window:
    """Additive state for F features in B bins (decayed float or exact int counts)."""

    counts: np.ndarray  # (F, B)
    below: np.ndarray  # (F,)
    above: np.ndarray
    nonfinite: np.ndarray
    n: np.ndarray
    s1: np.ndarray  # sum of (v - reference mean)
    s2: np.ndarray  # sum of (v - reference mean) ** 2
    vmin: np.ndarray
    vmax: np.ndarray

    @classmethod
    def empty(cls, features: int, bins: int, dtype: type = np.int64) -> "Window":
        def zeros(*shape: int) -> np.ndarray:
            return np.zeros(shape, dtype=dtype)

        return cls(
            zeros(features, bins),
            zeros(features),
            zeros(features),
            zeros(features),
            zeros(features),
            np.zeros(features),
            np.zeros(features),
            np.full(features, np.inf),
            np.full(features, -np.inf),
        )

    def merged(self, other: "Window") -> "Window":
        """The state of both windows' traffic: sums add, ranges widen."""
        return Window(
            self.counts + other.counts,
            self.below + other.below,
            self.above + other.above,
            self.nonfinite + other.nonfinite,
            self.n + other.n,
            self.s1 + other.s1,
            self.s2 + other.s2,
            np.minimum(self.vmin, other.vmin),
            np.maximum(self.vmax, other.vmax),
        )

    def decayed(self, factor: float) -> "Window":
        """Every sum scaled by `factor`; min and max are not weights and stay."""
        return Window(
            self.counts * factor,
            self.below * factor,
            self.above * factor,
            self.nonfinite * factor,
            self.n * factor,
            self.s1 * factor,
            self.s2 * factor,
            self.vmin.copy(),
            self.vmax.copy(),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).copy() for name in self.__slots__}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Window":
        return cls(**{name: np.asarray(arrays[name]) for name in cls.__slots__})


@dataclass(slots=True, frozen=True)
class Profile:
    """The reference distribution of F features."""

    names: tuple[str, ...]
    edges: np.ndarray  # (F, B-1) inner edges, ascending
    lo: np.ndarray  # (F,) reference min
    hi: np.ndarray  # (F,) reference max
    mean: np.ndarray
    std: np.ndarray
    reference: Window  # the reference's own counts in those bins

    @classmethod
    def from_matrix(cls, names: tuple[str, ...], matrix: np.ndarray, bins: int) -> "Profile":
        features = matrix.shape[1]
        values = np.asarray(matrix, dtype=np.float64)
        finite = np.where(np.isfinite(values), values, np.nan)
        quantiles = np.linspace(0, 1, bins + 1)[1:-1]
        edges = np.zeros((features, bins - 1))
        lo, hi = np.zeros(features), np.zeros(features)
        mean, std = np.zeros(features), np.ones(features)
        for f in range(features):
            column = finite[:, f][~np.isnan(finite[:, f])]
            if column.size:
                edges[f] = np.quantile(column, quantiles)
                lo[f], hi[f] = column.min(), column.max()
                mean[f], std[f] = column.mean(), column.std()
        profile = cls(names, edges, lo, hi, mean, std, Window.empty(features, bins))
        profile.update(profile.reference, values)
        return profile

    @property
    def bins(self) -> int:
        return int(self.edges.shape[1]) + 1

    def update(self, window: Window, matrix: np.ndarray) -> None:
        """Adds a batch's features to an integer window: one kernel call."""
        _kernels().update_features(
            matrix,
            self.edges,
            self.lo,
            self.hi,
            self.mean,
            window.counts,
            window.below,
            window.above,
            window.nonfinite,
            window.n,
            window.s1,
            window.s2,
            window.vmin,
            window.vmax,
        )


# -- categorical outputs ------------------------------------------------------------------


@dataclass(slots=True)
class Classes:
    """Counts of predicted classes: argmax of a score matrix, or labels."""

    labels: tuple[str, ...]  # class names; for labels, the last one is "other"
    counts: np.ndarray  # (C,) float or int
    confidence_sum: np.ndarray  # (1,): sum of the top score (argmax kind only)

    def merged(self, other: "Classes") -> "Classes":
        return Classes(
            self.labels, self.counts + other.counts, self.confidence_sum + other.confidence_sum
        )

    def decayed(self, factor: float) -> "Classes":
        return Classes(self.labels, self.counts * factor, self.confidence_sum * factor)

    def empty(self) -> "Classes":
        return Classes(self.labels, np.zeros_like(self.counts, dtype=np.int64), np.zeros(1))


@dataclass(slots=True, frozen=True)
class ClassOutput:
    """How one categorical output is counted, and its reference counts."""

    name: str
    kind: str  # "argmax" | "label"
    reference: Classes
    index: dict[Any, int] = field(default_factory=dict)  # label -> class, for "label"
    numeric: np.ndarray | None = None  # the labels, sorted, when they are numbers

    @classmethod
    def for_output(cls, spec: TensorSpec, reference: np.ndarray) -> "ClassOutput | None":
        kind = spec.datatype.numpy.kind
        if kind == "f" and reference.ndim == 2 and reference.shape[1] > 1:
            classes = Classes(
                tuple(str(j) for j in range(reference.shape[1])),
                np.zeros(reference.shape[1], dtype=np.int64),
                np.zeros(1),
            )
            output = cls(spec.name, "argmax", classes)
        elif kind in "iub" and reference.ndim == 1:
            numeric = np.unique(reference)  # sorted: searched, not looked up per row
            labels = (*(str(v) for v in numeric), "other")
            index = {label: i for i, label in enumerate(labels[:-1])}
            classes = Classes(labels, np.zeros(len(labels), np.int64), np.zeros(1))
            output = cls(spec.name, "label", classes, index, numeric)
        elif kind == "O" and reference.ndim == 1:
            values = sorted({_label(v) for v in reference})
            index = {value: i for i, value in enumerate(values)}
            labels = (*values, "other")
            classes = Classes(labels, np.zeros(len(labels), np.int64), np.zeros(1))
            output = cls(spec.name, "label", classes, index)
        else:
            return None
        output.update(output.reference, reference)
        return output

    @property
    def key(self) -> str:
        """Its window's name, apart from the "inputs" and "outputs" feature windows."""
        return f"classes/{self.name}"

    def update(self, classes: Classes, array: np.ndarray) -> None:
        if self.kind == "argmax":
            # float32 or float64 only: the dtypes compiled at load (FP16 is widened).
            dtype = array.dtype if array.dtype in (np.float32, np.float64) else np.float64
            scores = np.ascontiguousarray(array, dtype=dtype)
            _kernels().update_argmax(scores, classes.counts, classes.confidence_sum)
            return
        _kernels().update_classes(self._indices(array), classes.counts)

    def _indices(self, array: np.ndarray) -> np.ndarray:
        """Each label's class; labels the reference never had go to "other" (last)."""
        other = len(self.index)
        if array.dtype.kind in "iub" and self.numeric is not None:
            found = np.searchsorted(self.numeric, array)
            clipped = np.minimum(found, other - 1)
            known = (found < other) & (self.numeric[clipped] == array)
            return np.where(known, clipped, other).astype(np.int64)
        return np.fromiter(
            (self.index.get(_label(v), other) for v in array), dtype=np.int64, count=len(array)
        )


def _label(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- statistics, computed when read ----------------------------------------------------------


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with an integer number of degrees of freedom: the
    regularised upper incomplete gamma function, in closed form for integer dof."""
    if x <= 0:
        return 1.0
    half = x / 2
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(half) / math.gamma(1.5)
    for i in range(1, (dof - 1) // 2 + 1):
        total += math.exp(-half) * term
        term *= half / (i + 0.5)
    return min(1.0, total)


def smoothed(counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(c + 0.5) / (total + B/2) per row: proportions with no empty bin."""
    bins = counts.shape[-1]
    return np.asarray((counts + 0.5) / (np.asarray(total)[..., None] + bins / 2))


def psi(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Population stability index of q against the reference p, per row."""
    return np.asarray(np.sum((q - p) * np.log(q / p), axis=-1))


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance, base 2 (in [0, 1]), per row."""
    m = (p + q) / 2
    divergence = 0.5 * np.sum(p * np.log2(p / m), axis=-1) + 0.5 * np.sum(
        q * np.log2(q / m), axis=-1
    )
    return np.asarray(np.sqrt(np.maximum(divergence, 0.0)))


def binned_ks(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """max |CDF_q - CDF_p| at the bin edges: a lower bound on the KS statistic."""
    return np.asarray(np.max(np.abs(np.cumsum(q - p, axis=-1)), axis=-1))


def _band(value: float, config: DriftConfig) -> str:
    if value < config.psi_warn:
        return "stable"
    return "moderate" if value <= config.psi_alert else "major"


def _gated(
    psi_value: float, p_value: float, rows: float, tests: int, bins: int, config: DriftConfig
) -> str:
    """The dual gate of docs/drift.md: significant (Bonferroni over `tests`) and large."""
    if rows < MIN_ROWS_PER_BIN * bins:
        return "insufficient_data"
    if p_value < config.alpha / tests and psi_value >= config.psi_warn:
        return "drift"
    return "no_drift"


def _safe(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def feature_report(
    profile: Profile, window: Window, config: DriftConfig, tests: int
) -> list[dict[str, object]]:
    """One row of statistics per feature of `window` against `profile`."""
    reference = profile.reference
    ref_rows = reference.counts.sum(axis=1).astype(np.float64)
    rows = window.counts.sum(axis=1).astype(np.float64)
    p = smoothed(reference.counts, ref_rows)
    q = smoothed(window.counts, rows)
    psis, js, ks = psi(p, q), js_distance(p, q), binned_ks(p, q)
    std = np.where(profile.std > 0, profile.std, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_shift = window.s1 / window.n / std
        variance = window.s2 / window.n - (window.s1 / window.n) ** 2
        variance_ratio = variance / std**2
        nan_rate = window.nonfinite / (window.n + window.nonfinite)
        out_of_range = (window.below + window.above) / window.n
    report = []
    for f, name in enumerate(profile.names):
        statistic = psis[f] * ref_rows[f] * rows[f] / max(ref_rows[f] + rows[f], 1.0)
        p_value = chi2_sf(float(statistic), profile.bins - 1)
        report.append(
            {
                "name": name,
                "rows": float(rows[f]),
                "psi": float(psis[f]),
                "band": _band(float(psis[f]), config),
                "js_distance": float(js[f]),
                "ks": float(ks[f]),
                "p_value": p_value,
                "mean_shift_sigma": _safe(mean_shift[f]),
                "z": _safe(mean_shift[f] * math.sqrt(max(float(window.n[f]), 0.0))),
                "variance_ratio": _safe(variance_ratio[f]),
                "nan_rate": _safe(nan_rate[f]),
                "out_of_range_rate": _safe(out_of_range[f]),
                "min": _safe(window.vmin[f]),
                "max": _safe(window.vmax[f]),
                "verdict": _gated(float(psis[f]), p_value, rows[f], tests, profile.bins, config),
                # What the statistics above compare, for a picture (the dashboard's):
                # the inner bin edges, and each bin's share of reference and window.
                "bins": {
                    "edges": profile.edges[f].tolist(),
                    "reference": (reference.counts[f] / max(ref_rows[f], 1.0)).tolist(),
                    "window": (window.counts[f] / max(rows[f], 1.0)).tolist(),
                },
            }
        )
    return report


def class_report(
    output: ClassOutput, classes: Classes, config: DriftConfig, tests: int
) -> dict[str, object]:
    """Class shares against the reference's: PSI, p-value and mean confidence."""
    reference = output.reference
    ref_rows, rows = float(reference.counts.sum()), float(classes.counts.sum())
    p = smoothed(reference.counts, np.array(ref_rows))
    q = smoothed(classes.counts, np.array(rows))
    value = float(psi(p, q))
    statistic = value * ref_rows * rows / max(ref_rows + rows, 1.0)
    p_value = chi2_sf(statistic, len(output.reference.labels) - 1)
    report: dict[str, object] = {
        "name": output.name,
        "rows": rows,
        "psi": value,
        "band": _band(value, config),
        "p_value": p_value,
        "shares": dict(
            zip(output.reference.labels, (classes.counts / max(rows, 1.0)).tolist(), strict=True)
        ),
        "reference_shares": dict(
            zip(
                output.reference.labels,
                (reference.counts / max(ref_rows, 1.0)).tolist(),
                strict=True,
            )
        ),
        "verdict": _gated(value, p_value, rows, tests, len(output.reference.labels), config),
    }
    if output.kind == "argmax":
        report["mean_confidence"] = _safe(float(classes.confidence_sum[0]) / rows) if rows else None
        report["reference_mean_confidence"] = float(reference.confidence_sum[0]) / max(
            ref_rows, 1.0
        )
    return report


# -- one model version's monitor ------------------------------------------------------------


class DriftMonitor:
    """Reference, epoch and decayed windows of one model version; not thread-safe
    (the observer serialises `observe`, `report` and `snapshot` with a lock)."""

    def __init__(
        self,
        config: DriftConfig,
        inputs: FeatureMap,
        outputs: FeatureMap,
        output_specs: tuple[TensorSpec, ...],
        now: float,
    ) -> None:
        self.config = config
        self.inputs = inputs
        self.outputs = outputs
        self._output_specs = output_specs
        self.source = "served"
        # Names the reference's bins: states merge (workers, replicas) only under one.
        self.reference_digest: str | None = None
        self.input_profile: Profile | None = None
        self.output_profile: Profile | None = None
        self.classes: list[ClassOutput] = []
        self._collected: list[tuple[np.ndarray | None, dict[str, np.ndarray]]] = []
        self._collected_rows = 0
        self._epoch: dict[str, Any] = {}
        self._decayed: dict[str, Any] = {}
        self._epoch_started = now
        self._epoch_rows = 0
        self.dropped = 0  # batches the observer could not take (counted by it)
        # Batches served but not yet observed, in input_names + output_names order:
        # filled by the request path, emptied by the observer's thread.
        self.input_names = tuple(spec.name for spec in inputs.specs)
        self.output_names = tuple(spec.name for spec in output_specs)
        self.pending = PendingBatches(len(self.input_names) + len(self.output_names))
        # Held by whoever updates or reads: the observer's thread and the report.
        self.lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.input_profile is not None or self.output_profile is not None

    def close(self) -> None:
        """Drops the served batches it holds, waiting or collected for the reference
        (blocking: takes the lock). Called when its version is unloaded: a model's
        outputs are onnxruntime's own buffers, and each one keeps the memory arena of
        the session that made it alive, session unloaded or not."""
        self.pending.take()
        with self.lock:
            self._collected.clear()
            self._collected_rows = 0

    def set_reference(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], source: str
    ) -> None:
        """Builds the profiles from reference batches of inputs and the model's outputs."""
        features = self.inputs.extract(inputs) if self.inputs.names else None
        self._set_profiles(features, outputs, source)

    def _set_profiles(
        self, features: np.ndarray | None, outputs: dict[str, np.ndarray], source: str
    ) -> None:
        bins = self.config.bins
        if features is not None:
            self.input_profile = Profile.from_matrix(self.inputs.names, features, bins)
        if self.outputs.names:
            self.output_profile = Profile.from_matrix(
                self.outputs.names, self.outputs.extract(outputs), bins
            )
        self.classes = [
            output
            for spec in self._output_specs
            if spec.name in outputs
            and (output := ClassOutput.for_output(spec, outputs[spec.name])) is not None
        ]
        self.source = source
        self.reference_digest = self._digest()
        self._collected.clear()
        self._epoch = self._empty_windows()
        self._decayed = self._empty_windows()

    def _digest(self) -> str:
        """A digest of the bin edges and class labels: equal references, equal digests."""
        digest = hashlib.sha256()
        for profile in (self.input_profile, self.output_profile):
            if profile is not None:
                digest.update(np.ascontiguousarray(profile.edges, dtype=np.float64).tobytes())
        for output in self.classes:
            digest.update(repr((output.key, output.reference.labels)).encode())
        return digest.hexdigest()[:16]

    def _empty_windows(self) -> dict[str, Any]:
        windows: dict[str, Any] = {}
        for key, profile in (("inputs", self.input_profile), ("outputs", self.output_profile)):
            if profile is not None:
                windows[key] = Window.empty(len(profile.names), profile.bins)
        for output in self.classes:
            windows[output.key] = output.reference.empty()
        return windows

    def observe(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], now: float
    ) -> None:
        """Adds one batch (a request's inputs and the model's outputs)."""
        if not self.ready:
            self._collect(inputs, outputs)
            return
        self.roll(now)
        rows = 0
        if self.input_profile is not None:
            matrix = self.inputs.extract(inputs)
            self.input_profile.update(self._epoch["inputs"], matrix)
            rows = len(matrix)
        if self.output_profile is not None:
            matrix = self.outputs.extract(outputs)
            self.output_profile.update(self._epoch["outputs"], matrix)
            rows = rows or len(matrix)
        for output in self.classes:
            output.update(self._epoch[output.key], outputs[output.name])
        self._epoch_rows += rows

    def _collect(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        # The input features, not the inputs: an image batch is kept as its channel means.
        features = self.inputs.extract(inputs) if self.inputs.names else None
        self._collected.append((features, outputs))
        self._collected_rows += len(next(iter(inputs.values())))
        if self._collected_rows >= self.config.reference_rows:
            joined = None
            if features is not None:
                joined = np.concatenate([batch[0] for batch in self._collected])
            joined_out = {n: np.concatenate([b[1][n] for b in self._collected]) for n in outputs}
            self._set_profiles(joined, joined_out, "served")

    def roll(self, now: float) -> None:
        """Closes the epoch if it is over: decay the window by the rows it saw, add it."""
        if now - self._epoch_started < EPOCH_SECONDS or not self.ready:
            return
        factor = 2.0 ** (-self._epoch_rows / self.config.half_life)
        self._decayed = {
            key: window.decayed(factor).merged(self._epoch[key])
            for key, window in self._decayed.items()
        }
        self._epoch = self._empty_windows()
        self._epoch_started = now
        self._epoch_rows = 0

    def windows(self, others: Sequence[Snapshot] = ()) -> dict[str, Any]:
        """The decayed windows plus the open epoch: what a report reads; plus `others`,
        other workers' snapshots of the same version, for the whole server's."""
        own = {key: window.merged(self._epoch[key]) for key, window in self._decayed.items()}
        return self._plus(own, others)

    def report(self, now: float, others: Sequence[Snapshot] = ()) -> dict[str, object]:
        """The version's drift report; with `others` (snapshots of the same version's
        monitors in other workers), over all of their traffic."""
        self.roll(now)
        if not self.ready:
            return {
                "state": "collecting_reference",
                "reference": {"source": "served", "rows": self._collected_rows},
                "reference_rows_needed": self.config.reference_rows,
            }
        windows = self.windows(others)
        tests = sum(len(p.names) for p in (self.input_profile, self.output_profile) if p) + len(
            self.classes
        )
        inputs = (
            feature_report(self.input_profile, windows["inputs"], self.config, tests)
            if self.input_profile
            else []
        )
        outputs = (
            feature_report(self.output_profile, windows["outputs"], self.config, tests)
            if self.output_profile
            else []
        )
        classes = [class_report(o, windows[o.key], self.config, tests) for o in self.classes]
        profile = self.input_profile or self.output_profile
        assert profile is not None
        return {
            "state": "ready",
            "reference": {
                "source": self.source,
                "rows": int(profile.reference.counts.sum(axis=1).max()),
            },
            "summary": _summary([*inputs, *outputs, *classes], self.config),
            "inputs": inputs,
            "outputs": outputs,
            "classes": classes,
        }

    def snapshot(self, others: Sequence[Snapshot] = ()) -> Snapshot:
        """The raw state (decayed window plus open epoch, plus `others`) as JSON-able
        lists, to be merged into another monitor of the same version (a worker or a
        replica)."""
        snapshot = {}
        for key, window in self.windows(others).items():
            fields = Classes.__slots__ if isinstance(window, Classes) else Window.__slots__
            snapshot[key] = {
                name: np.asarray(getattr(window, name)).tolist()
                for name in fields
                if name != "labels"
            }
        return snapshot

    def merge_snapshot(self, snapshot: Snapshot) -> None:
        """Adds another monitor's `snapshot` of the same model version to this one.

        Raises:
            ValueError: the snapshot's tensors or shapes do not match this version's.
        """
        self._decayed = self._plus(self._decayed, [snapshot])

    def _plus(self, windows: dict[str, Any], snapshots: Sequence[Snapshot]) -> dict[str, Any]:
        """`windows` with `snapshots` added; ValueError naming what does not match."""
        for snapshot in snapshots:
            if set(snapshot) != set(windows):
                raise ValueError(f"snapshot has {sorted(snapshot)}, expected {sorted(windows)}")
            merged = {}
            for key, window in windows.items():
                arrays = {name: _array(name, values) for name, values in snapshot[key].items()}
                if isinstance(window, Classes):
                    other: Any = Classes(window.labels, arrays["counts"], arrays["confidence_sum"])
                else:
                    other = Window.from_arrays(arrays)
                if np.shape(other.counts) != np.shape(window.counts):
                    raise ValueError(f"snapshot of {key!r} has another shape")
                merged[key] = window.merged(other)
            windows = merged
        return windows


# A window's range where it saw no value: JSON (the snapshot on the wire) has no
# infinities and writes null for them.
_NO_VALUE = {"vmin": np.inf, "vmax": -np.inf}


def _array(name: str, values: list[Any]) -> np.ndarray:
    """A snapshot field as an array, its nulls (see `_NO_VALUE`) made infinite again."""
    fill = _NO_VALUE.get(name)
    if fill is None:
        return np.asarray(values)
    return np.array([fill if value is None else value for value in values], dtype=float)


def _summary(rows: list[dict[str, Any]], config: DriftConfig) -> dict[str, object]:
    """Per version: the largest shift, what crossed the PSI bands, what drifted."""
    top = max(rows, key=lambda row: row["psi"], default=None)
    verdicts = {row["verdict"] for row in rows}
    if "drift" in verdicts:
        verdict = "drift"
    elif verdicts <= {"insufficient_data"}:
        verdict = "insufficient_data"
    else:
        verdict = "no_drift"
    return {
        "verdict": verdict,
        "window_rows": max((row["rows"] for row in rows), default=0.0),
        "max_psi": None if top is None else top["psi"],
        "max_psi_feature": None if top is None else top["name"],
        "over_warn": [row["name"] for row in rows if row["psi"] >= config.psi_warn],
        "over_alert": [row["name"] for row in rows if row["psi"] > config.psi_alert],
        "drifted": [row["name"] for row in rows if row["verdict"] == "drift"],
    }
