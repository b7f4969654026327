"""The canary judge: the statistics that decide a progressive rollout (see docs/rollouts.md,
"The canary judge"). Computed when read, on the merged state of the current step's
window, never on the hot path.

State
-----
`VariantWindow` holds one variant's (stable's or canary's) requests, errors, latency
histogram and predicted-class counts over the current step; `ShadowWindow` holds, in
shadow mode, the per-row comparison of the canary's answers with stable's on mirrored
requests. Both are integer sums: windows from workers, replicas or epochs merge by
addition and round-trip through JSON exactly.

Checks
------
`judge` runs each check, which gives "pass", "fail" or "continue" (not enough evidence
yet: no data is never a pass), with every number it rests on:

- validity (not critical): the random split's canary share against the weight, on the
  unkeyed requests (keyed requests are routed by hash and excluded). Looked at every
  epoch, so sequential: the mean of the two one-sided mixture likelihood ratios (the
  errors check's machinery, for a share above and below the weight) against
  1 / validity_p: the split is broken, "fail" (pause). The chi-square p-value (1 dof)
  is reported beside it for the reader. Fewer than MIN_EXPECTED_SPLIT expected in a
  cell: "continue", unless the cell expects none and got some (a stable request at
  weight 100 %), which is impossible: "fail".
- errors (critical): sequential non-inferiority, valid under continuous monitoring.
  Conditional on an error having occurred, it came from the canary with probability
  theta = pi pc / (pi pc + (1 - pi) ps), pi the canary's exposure share
  canary.requests / (canary.requests + stable.requests). The null hypothesis
  pc <= (1 + margin) ps is theta <= theta0 = pi (1 + m) / (pi (1 + m) + 1 - pi), and
  the rates' nuisance level drops out. With k canary errors out of n errors in all, the
  statistic is the mixture likelihood ratio
      LR = mean_j (theta_j / theta0)^k ((1 - theta_j) / (1 - theta0))^(n - k)
  over the fixed grid of alternatives whose odds are ODDS_RATIOS times theta0's
  (uniform weights, in log space with logsumexp). For any theta <= theta0 < theta_j,
  each component's expected factor per error is <= 1, so each component is a
  nonnegative supermartingale under H0, and so is their mean; Ville's inequality gives
  P(sup LR >= 1 / alpha_step) <= alpha_step, however often it is looked at. Hence
  "fail" when LR >= 1 / alpha_step; else "pass" once the step is `ready` (no evidence
  the canary is worse), "continue" before. Zero requests on either side: "continue".
  pi is the observed share (a plug-in): within a step the weight, hence pi, is fixed.
- latency (not critical): canary p99 / stable p99 from the log-bucket histograms of
  successful requests (each within 2**-SUB_BITS of exact); "fail" above the budget,
  judged only once both sides have min_latency_samples.
- predictions (critical): class-share PSI of canary against stable over the union of
  labels (a regressor's scores are counted as classes by the caller, see `canary`),
  with smoothed proportions (c + 0.5) / (M + K/2) as in docs/drift.md; p-value from
  PSI * N M / (N + M) ~ chi-square(K - 1). "fail" only when both p < alpha_step and
  PSI >= thresholds.psi (significant and large). A fixed-horizon test, so it is judged
  only when `ready`; a step held after that is looked at again, and the k-th such look
  tests at alpha_step / (k (k + 1)) (`judge`'s `ready_look`), which sums to alpha_step.
  Fewer than 5 K rows on a side: "continue". Neither side recorded any prediction
  although both served successful requests: the model has no class output, "pass"
  (not applicable); with no successful requests yet, "continue".
- disagreement (critical, shadow mode only): the same mixture likelihood ratio on a
  Bernoulli rate, k = disagreeing rows of n = compared rows, H0 rate <= budget.

Action
------
Any critical "fail": rollback. Else a validity "fail": pause. Else `ready` and every
check "pass": advance. Else `expired` (maximum dwell) with a non-critical "fail"
(latency): rollback. Else hold, saying which checks it waits for. `alpha_step` is the
caller's share of the rollout's alpha for this step (e.g. alpha / steps). At weight
100 % stable serves nothing, so nothing can be compared: reaching 100 % ends a rollout.

Pure: numpy and the standard library; no I/O, no clock.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidegate.drift import chi2_sf, psi, smoothed
from tidegate.histogram import LatencyHistogram

__all__ = [
    "DELTA_EDGES",
    "ODDS_RATIOS",
    "Check",
    "Judgement",
    "ShadowWindow",
    "Thresholds",
    "VariantWindow",
    "alternatives",
    "decide",
    "judge",
    "mixture_log_lr",
    "null_share",
]

# Upper edges of the |score delta| bins, one per decade: float32 scores agree to about
# 1e-7, so bin 0 (<= 1e-6) is "the same answer", 1e-6 ... 1e-3 numerical noise (another
# execution provider, another batch size), above 1e-2 a different model. The last bin
# counts deltas above 1.0 and NaN.
DELTA_EDGES = np.array([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])

# Alternatives of the mixture likelihood ratio, as odds ratios against the null's odds.
# Log-spaced so the mixture adapts to small effects (1.1: an error rate about 10 %
# above the margin) and to a canary that fails everything (1000) alike; 30 points keep
# neighbours 1.27x apart, so the best component is never far from the truth.
ODDS_RATIOS = np.geomspace(1.1, 1000.0, 30)

MIN_EXPECTED_SPLIT = 20  # chi-square approximation needs this many expected per cell
MIN_ROWS_PER_CLASS = 5  # as drift's MIN_ROWS_PER_BIN: fewer than 5 K rows, no verdict
P99 = 99.0

Number = float | int | None


# -- the sequential test -----------------------------------------------------------------


def null_share(exposure: Any, margin: float) -> Any:
    """theta0: the largest share of errors the canary may have under H0 (its rate at most
    (1 + margin) times stable's), given its share `exposure` of the requests."""
    tilted = np.asarray(exposure, dtype=np.float64) * (1.0 + margin)
    return tilted / (tilted + 1.0 - np.asarray(exposure, dtype=np.float64))


def alternatives(theta0: Any) -> np.ndarray:
    """The alternatives theta_j (last axis) of the mixture for null theta0: odds
    ODDS_RATIOS times theta0's, so all lie in (theta0, 1)."""
    odds = _odds(theta0)[..., None] * ODDS_RATIOS
    return np.asarray(odds / (1.0 + odds))


def mixture_log_lr(k: Any, n: Any, theta0: Any) -> np.ndarray:
    """log of the mixture likelihood ratio of k successes in n Bernoulli trials, the
    alternatives `alternatives(theta0)` against theta0, uniform weights. Broadcasts.

    In odds o: log theta = log o - log1p(o) and log(1 - theta) = -log1p(o), so the
    component log ratio is k log(o_j / o0) - n (log1p(o_j) - log1p(o0)): no cancellation
    near 0 or 1."""
    odds0 = _odds(theta0)[..., None]
    odds = odds0 * ODDS_RATIOS
    k = np.asarray(k, dtype=np.float64)[..., None]
    n = np.asarray(n, dtype=np.float64)[..., None]
    terms = k * np.log(ODDS_RATIOS) - n * (np.log1p(odds) - np.log1p(odds0))
    top = np.max(terms, axis=-1, keepdims=True)
    total = top + np.log(np.sum(np.exp(terms - top), axis=-1, keepdims=True))
    return np.asarray((total - math.log(len(ODDS_RATIOS)))[..., 0])


def _log_mean_exp(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log((math.exp(a - top) + math.exp(b - top)) / 2.0)


def _exp(log_value: float) -> float:
    """exp, saturating at infinity rather than raising (reported as None)."""
    return math.exp(log_value) if log_value < 700 else math.inf


def _odds(theta: Any) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64)
    if np.any((theta <= 0.0) | (theta >= 1.0)):
        raise ValueError("a null share must lie strictly between 0 and 1")
    return np.asarray(theta / (1.0 - theta))


# -- state -------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class VariantWindow:
    """One variant's (stable's or canary's) traffic within the current rollout step.
    Mergeable by addition."""

    requests: int = 0  # requests answered or failed after being routed to this variant
    errors: int = 0  # of those, failed
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # ns, successes
    predictions: dict[str, int] = field(default_factory=dict)  # class (or bin) -> rows

    def merge(self, other: "VariantWindow") -> None:
        """Add `other` (another worker's, replica's or epoch's window) into this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.latency.merge(other.latency)
        for label, rows in other.predictions.items():
            self.predictions[label] = self.predictions.get(label, 0) + rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot that `from_dict` restores exactly."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency": self.latency.to_dict(),
            "predictions": {label: self.predictions[label] for label in sorted(self.predictions)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VariantWindow":
        """Rebuild a window from `to_dict()` output; ValueError on malformed input."""
        latency = data.get("latency")
        if not isinstance(latency, Mapping):
            raise ValueError("window field 'latency' must be a histogram mapping")
        return cls(
            requests=_count(data, "requests"),
            errors=_count(data, "errors"),
            latency=LatencyHistogram.from_dict(latency),
            predictions=_label_counts(data.get("predictions")),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VariantWindow):
            return NotImplemented
        return self.to_dict() == other.to_dict()


def _empty_delta() -> np.ndarray:
    return np.zeros(len(DELTA_EDGES) + 1, dtype=np.int64)


@dataclass(slots=True, eq=False)
class ShadowWindow:
    """Shadow mode: the canary's answers on mirrored requests compared with stable's, per
    row. `rows` and `disagreeing` count rows whose labels were compared; `delta` counts
    rows whose scores were compared, by max |score delta| in DELTA_EDGES bins."""

    mirrored: int = 0  # requests copied to the canary
    dropped: int = 0  # mirror copies dropped because the mirror queue was full
    rows: int = 0  # rows compared
    disagreeing: int = 0  # rows whose predicted class differs
    delta: np.ndarray = field(default_factory=_empty_delta)

    def record(
        self,
        stable_labels: np.ndarray | None,
        canary_labels: np.ndarray | None,
        stable_scores: np.ndarray | None,
        canary_scores: np.ndarray | None,
    ) -> None:
        """Compare one mirrored request's answers. Labels: per-row predicted class (any
        dtype); scores: (rows, k) or (rows,), compared by the row's max |a - b|.
        Either pair may be None (the model has no such output)."""
        labels = _pair(stable_labels, canary_labels, "labels")
        scores = _pair(stable_scores, canary_scores, "scores")
        if labels is not None and scores is not None and len(labels[0]) != len(scores[0]):
            raise ValueError("labels and scores must have the same number of rows")
        if labels is not None:
            self.rows += len(labels[0])
            self.disagreeing += _disagreements(*labels)
        if scores is not None:
            bins = np.searchsorted(DELTA_EDGES, _max_abs_delta(*scores), side="left")
            self.delta += np.bincount(bins, minlength=len(DELTA_EDGES) + 1)

    def merge(self, other: "ShadowWindow") -> None:
        """Add `other` into this window."""
        self.mirrored += other.mirrored
        self.dropped += other.dropped
        self.rows += other.rows
        self.disagreeing += other.disagreeing
        self.delta += other.delta

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot that `from_dict` restores exactly."""
        return {
            "mirrored": self.mirrored,
            "dropped": self.dropped,
            "rows": self.rows,
            "disagreeing": self.disagreeing,
            "delta": [int(n) for n in self.delta],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShadowWindow":
        """Rebuild a window from `to_dict()` output; ValueError on malformed input."""
        delta = data.get("delta")
        if (
            not isinstance(delta, list)
            or len(delta) != len(DELTA_EDGES) + 1
            or not all(_is_count(n) for n in delta)
        ):
            raise ValueError(f"'delta' must be {len(DELTA_EDGES) + 1} counts >= 0")
        window = cls(
            mirrored=_count(data, "mirrored"),
            dropped=_count(data, "dropped"),
            rows=_count(data, "rows"),
            disagreeing=_count(data, "disagreeing"),
            delta=np.array(delta, dtype=np.int64),
        )
        if window.disagreeing > window.rows:
            raise ValueError("more disagreeing rows than rows")
        return window

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShadowWindow):
            return NotImplemented
        return self.to_dict() == other.to_dict()


def _pair(
    stable: np.ndarray | None, canary: np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both arrays as (rows, columns), or None when neither is given."""
    if stable is None and canary is None:
        return None
    if stable is None or canary is None:
        raise ValueError(f"{what}: give both stable's and canary's, or neither")
    a, b = _rows(np.asarray(stable)), _rows(np.asarray(canary))
    if a.shape != b.shape:
        raise ValueError(f"{what}: stable's shape {a.shape} differs from canary's {b.shape}")
    return a, b


def _rows(array: np.ndarray) -> np.ndarray:
    """`array` as (rows, columns): 1-D is one column per row, more dims are flattened."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    return array.reshape(array.shape[0], math.prod(array.shape[1:]))


def _disagreements(stable: np.ndarray, canary: np.ndarray) -> int:
    """Rows whose labels differ; labels of different kinds (int vs str) compare as
    Python objects, so they simply differ instead of failing to compare."""
    if stable.shape[1] != 1:
        raise ValueError(f"labels must be one per row, got {stable.shape[1]} columns")
    if stable.dtype.kind != canary.dtype.kind:
        stable, canary = stable.astype(object), canary.astype(object)
    return int(np.count_nonzero(stable != canary))


def _max_abs_delta(stable: np.ndarray, canary: np.ndarray) -> np.ndarray:
    """Per row max |a - b| (NaN if either side has a NaN: it lands in the last bin)."""
    diff = np.abs(stable.astype(np.float64) - canary.astype(np.float64))
    return np.asarray(np.max(diff, axis=1, initial=0.0))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"window field {name!r} must be an int >= 0, got {value!r}")
    return value


def _label_counts(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping) or not all(
        isinstance(label, str) and _is_count(n) for label, n in value.items()
    ):
        raise ValueError("window field 'predictions' must map labels to counts >= 0")
    return dict(value)


# -- thresholds and verdicts ---------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Thresholds:
    """What the rollout tolerates (see the module docstring for each check)."""

    alpha: float = 0.05  # false-rollback budget of the whole rollout
    error_margin: float = 0.1  # canary error rate <= stable rate * (1 + margin)
    latency_p99_ratio: float = 1.5
    min_latency_samples: int = 200  # per variant, before the latency check can decide
    psi: float = 0.1  # effect gate of the prediction check
    disagreement: float = 0.05  # shadow: budget for the disagreement rate
    validity_p: float = 0.001  # split broken below this p-value


@dataclass(slots=True, frozen=True)
class Check:
    """One check's verdict with every number it rests on, so an operator can see why."""

    name: str  # "validity" | "errors" | "latency" | "predictions" | "disagreement"
    verdict: str  # "pass" | "fail" | "continue"
    critical: bool  # a critical fail rolls back at once
    numbers: dict[str, Number]  # JSON-able, None for NaN / inf
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "name": self.name,
            "verdict": self.verdict,
            "critical": self.critical,
            "numbers": dict(self.numbers),
            "reason": self.reason,
        }


@dataclass(slots=True, frozen=True)
class Judgement:
    """The action for the rollout and the checks it was decided from."""

    action: str  # "rollback" | "advance" | "hold" | "pause"
    checks: tuple[Check, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "action": self.action,
            "reason": self.reason,
            "checks": [check.to_dict() for check in self.checks],
        }


def _num(value: float | int | None) -> Number:
    """A JSON-able number: plain int or float, None for NaN / inf."""
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _check(name: str, verdict: str, critical: bool, numbers: dict[str, Any], reason: str) -> Check:
    return Check(name, verdict, critical, {k: _num(v) for k, v in numbers.items()}, reason)


def _pct(rate: float) -> str:
    return f"{100 * rate:.2g} %" if rate < 0.01 else f"{100 * rate:.1f} %"


# -- the checks ----------------------------------------------------------------------------


def validity_check(
    split_stable: int, split_canary: int, weight: float, thresholds: Thresholds
) -> Check:
    """Whether the random split gives the canary its weight. Judged every epoch on a
    growing window, so the verdict is sequential, as the error check's: the mixture
    likelihood ratio of deviations on both sides (the average of the two one-sided
    mixtures, itself a test martingale) against 1 / validity_p. A fixed chi-square
    test looked at every epoch would pause a sound rollout now and then; its p-value
    is still reported, for the reader."""
    total = split_stable + split_canary
    expected_canary = total * weight / 100.0
    expected_stable = total - expected_canary
    numbers: dict[str, Any] = {
        "split_stable": split_stable,
        "split_canary": split_canary,
        "weight": weight,
        "expected_stable": expected_stable,
        "expected_canary": expected_canary,
        "chi2": None,
        "p_value": None,
        "validity_p": thresholds.validity_p,
    }
    observed = f"canary got {split_canary} of {total} unkeyed requests at weight {weight:g} %"
    if expected_stable <= 0.0 and split_stable > 0:
        numbers["p_value"] = 0.0
        return _check("validity", "fail", False, numbers, f"{observed}: stable got some")
    if min(expected_stable, expected_canary) < MIN_EXPECTED_SPLIT:
        reason = f"{observed}: fewer than {MIN_EXPECTED_SPLIT} expected on a side"
        return _check("validity", "continue", False, numbers, reason)
    chi2 = (split_canary - expected_canary) ** 2 / expected_canary + (
        split_stable - expected_stable
    ) ** 2 / expected_stable
    p_value = chi2_sf(chi2, 1)
    share0 = weight / 100.0
    log_lr = _log_mean_exp(
        float(mixture_log_lr(split_canary, total, share0)),
        float(mixture_log_lr(split_stable, total, 1.0 - share0)),
    )
    threshold = 1.0 / thresholds.validity_p
    numbers |= {
        "chi2": chi2,
        "p_value": p_value,
        "likelihood_ratio": _num(_exp(log_lr)),
        "threshold": threshold,
    }
    share = (
        f"{observed} ({_pct(split_canary / total)}; chi-square p {p_value:.3g}, "
        f"likelihood ratio {_exp(log_lr):.3g}"
    )
    if log_lr >= math.log(threshold):
        reason = f"{share} >= {threshold:g}): the split is broken"
        return _check("validity", "fail", False, numbers, reason)
    return _check("validity", "pass", False, numbers, f"{share} < {threshold:g})")


def errors_check(
    stable: VariantWindow,
    canary: VariantWindow,
    thresholds: Thresholds,
    alpha_step: float,
    ready: bool,
) -> Check:
    """Sequential non-inferiority of the canary's error rate (mixture likelihood ratio)."""
    numbers: dict[str, Any] = {
        "canary_requests": canary.requests,
        "canary_errors": canary.errors,
        "stable_requests": stable.requests,
        "stable_errors": stable.errors,
        "canary_error_rate": None,
        "stable_error_rate": None,
        "exposure": None,
        "theta0": None,
        "likelihood_ratio": None,
        "log_likelihood_ratio": None,
        "threshold": 1.0 / alpha_step,
        "margin": thresholds.error_margin,
    }
    if canary.requests <= 0 or stable.requests <= 0:
        reason = "no requests yet on " + ("the canary" if canary.requests <= 0 else "stable")
        return _check("errors", "continue", True, numbers, reason)
    exposure = canary.requests / (canary.requests + stable.requests)
    theta0 = float(null_share(exposure, thresholds.error_margin))
    log_lr = float(mixture_log_lr(canary.errors, canary.errors + stable.errors, theta0))
    canary_rate = canary.errors / canary.requests
    stable_rate = stable.errors / stable.requests
    numbers |= {
        "canary_error_rate": canary_rate,
        "stable_error_rate": stable_rate,
        "exposure": exposure,
        "theta0": theta0,
        "likelihood_ratio": _num(_exp(log_lr)),
        "log_likelihood_ratio": log_lr,
    }
    rates = f"canary error rate {_pct(canary_rate)} vs stable {_pct(stable_rate)}"
    ratio = f"likelihood ratio {_exp(log_lr):.3g}"
    if log_lr >= -math.log(alpha_step):
        reason = f"{rates} ({ratio} >= {1 / alpha_step:.3g})"
        return _check("errors", "fail", True, numbers, reason)
    within = f"{rates} ({ratio} < {1 / alpha_step:.3g})"
    if ready:
        reason = f"no evidence the canary errs more than stable + {_pct(thresholds.error_margin)}"
        return _check("errors", "pass", True, numbers, f"{reason}: {within}")
    return _check("errors", "continue", True, numbers, f"{within}; the step is not ready yet")


def latency_check(stable: VariantWindow, canary: VariantWindow, thresholds: Thresholds) -> Check:
    """Ratio of the p99 latencies of successful requests against the budget."""
    counts = (stable.latency.count, canary.latency.count)
    numbers: dict[str, Any] = {
        "stable_samples": counts[0],
        "canary_samples": counts[1],
        "min_samples": thresholds.min_latency_samples,
        "stable_p99_ns": None,
        "canary_p99_ns": None,
        "ratio": None,
        "budget": thresholds.latency_p99_ratio,
    }
    if min(counts) < thresholds.min_latency_samples or min(counts) == 0:
        reason = (
            f"{counts[1]} canary and {counts[0]} stable latency samples, "
            f"fewer than {thresholds.min_latency_samples} on a side"
        )
        return _check("latency", "continue", False, numbers, reason)
    stable_p99 = stable.latency.percentile(P99)
    canary_p99 = canary.latency.percentile(P99)
    ratio = canary_p99 / stable_p99 if stable_p99 else (1.0 if not canary_p99 else math.inf)
    numbers |= {"stable_p99_ns": stable_p99, "canary_p99_ns": canary_p99, "ratio": ratio}
    said = (
        f"canary p99 {canary_p99 / 1e6:.3g} ms vs stable {stable_p99 / 1e6:.3g} ms "
        f"(ratio {ratio:.3g}"
    )
    if ratio > thresholds.latency_p99_ratio:
        return _check(
            "latency", "fail", False, numbers, f"{said} > {thresholds.latency_p99_ratio:g})"
        )
    return _check("latency", "pass", False, numbers, f"{said} <= {thresholds.latency_p99_ratio:g})")


def predictions_check(
    stable: VariantWindow,
    canary: VariantWindow,
    thresholds: Thresholds,
    alpha_step: float,
    ready: bool,
) -> Check:
    """Class-share PSI of canary vs stable, gated by significance and size, once per step."""
    labels = sorted(set(stable.predictions) | set(canary.predictions))
    p_counts = np.array([stable.predictions.get(label, 0) for label in labels], dtype=np.float64)
    q_counts = np.array([canary.predictions.get(label, 0) for label in labels], dtype=np.float64)
    n, m = int(p_counts.sum()), int(q_counts.sum())
    numbers: dict[str, Any] = {
        "classes": len(labels),
        "stable_rows": n,
        "canary_rows": m,
        "psi": None,
        "statistic": None,
        "p_value": None,
        "psi_gate": thresholds.psi,
        "alpha": alpha_step,
    }
    if not ready:
        return _check("predictions", "continue", True, numbers, "judged once the step is ready")
    if n == 0 and m == 0:
        served = stable.requests > stable.errors and canary.requests > canary.errors
        if served:
            reason = "not applicable: neither variant reports a predicted class"
            return _check("predictions", "pass", True, numbers, reason)
        return _check("predictions", "continue", True, numbers, "no successful requests yet")
    if min(n, m) < MIN_ROWS_PER_CLASS * len(labels):
        reason = (
            f"{m} canary and {n} stable rows over {len(labels)} classes, "
            f"fewer than {MIN_ROWS_PER_CLASS} per class on a side"
        )
        return _check("predictions", "continue", True, numbers, reason)
    value = float(psi(smoothed(p_counts, np.asarray(n)), smoothed(q_counts, np.asarray(m))))
    statistic = value * n * m / (n + m)
    p_value = chi2_sf(statistic, len(labels) - 1) if len(labels) > 1 else 1.0
    numbers |= {"psi": value, "statistic": statistic, "p_value": p_value}
    said = f"class-share PSI {value:.3g} (gate {thresholds.psi:g}), p {p_value:.3g}"
    if p_value < alpha_step and value >= thresholds.psi:
        reason = f"canary's predictions differ from stable's: {said} < {alpha_step:.3g}"
        return _check("predictions", "fail", True, numbers, reason)
    return _check("predictions", "pass", True, numbers, f"{said}: no large, significant shift")


def disagreement_check(
    shadow: ShadowWindow, thresholds: Thresholds, alpha_step: float, ready: bool
) -> Check:
    """Sequential test that the shadow disagreement rate is within its budget."""
    numbers: dict[str, Any] = {
        "mirrored": shadow.mirrored,
        "dropped": shadow.dropped,
        "rows": shadow.rows,
        "disagreeing": shadow.disagreeing,
        "rate": None,
        "budget": thresholds.disagreement,
        "likelihood_ratio": None,
        "log_likelihood_ratio": None,
        "threshold": 1.0 / alpha_step,
    }
    if shadow.rows <= 0:
        return _check("disagreement", "continue", True, numbers, "no mirrored rows compared yet")
    rate = shadow.disagreeing / shadow.rows
    log_lr = float(mixture_log_lr(shadow.disagreeing, shadow.rows, thresholds.disagreement))
    numbers |= {
        "rate": rate,
        "likelihood_ratio": _num(_exp(log_lr)),
        "log_likelihood_ratio": log_lr,
    }
    said = (
        f"canary disagrees with stable on {_pct(rate)} of {shadow.rows} rows "
        f"(budget {_pct(thresholds.disagreement)}; "
        f"likelihood ratio {_exp(log_lr):.3g}"
    )
    if log_lr >= -math.log(alpha_step):
        return _check("disagreement", "fail", True, numbers, f"{said} >= {1 / alpha_step:.3g})")
    within = f"{said} < {1 / alpha_step:.3g})"
    if ready:
        return _check("disagreement", "pass", True, numbers, within)
    return _check("disagreement", "continue", True, numbers, f"{within}; step not ready yet")


# -- the decision --------------------------------------------------------------------------


def judge(
    stable: VariantWindow,
    canary: VariantWindow,
    *,
    split_stable: int,
    split_canary: int,
    weight: float,
    shadow: ShadowWindow | None,
    thresholds: Thresholds,
    alpha_step: float,
    ready: bool,
    expired: bool,
    ready_look: int = 1,
) -> Judgement:
    """Run every check on the current step's windows and decide the rollout's action.

    `split_*`: unkeyed requests the random split sent to each side (in shadow mode, the
    mirror sampling counts); `weight`: the canary's percent; `ready`: the step has its
    minimum rows and dwell; `expired`: its maximum dwell has passed; `ready_look`: how
    many looks (this one included) the step has had since it became ready.

    The predictions check is a fixed-horizon test. A step that stays after it becomes
    ready (held by another check) is looked at again, so the k-th ready look spends
    alpha_step / (k (k + 1)) of it: the sum over every look is alpha_step."""
    if not 0.0 < weight <= 100.0:
        raise ValueError(f"weight must be in (0, 100], got {weight}")
    if not 0.0 < alpha_step < 1.0:
        raise ValueError(f"alpha_step must be in (0, 1), got {alpha_step}")
    checks = [
        validity_check(split_stable, split_canary, weight, thresholds),
        errors_check(stable, canary, thresholds, alpha_step, ready),
        latency_check(stable, canary, thresholds),
        predictions_check(
            stable, canary, thresholds, alpha_step / (ready_look * (ready_look + 1)), ready
        ),
    ]
    if shadow is not None:
        checks.append(disagreement_check(shadow, thresholds, alpha_step, ready))
    return decide(tuple(checks), ready=ready, expired=expired)


def decide(checks: tuple[Check, ...], *, ready: bool, expired: bool) -> Judgement:
    """The action rules of the module docstring, in their order of precedence."""
    critical = [c for c in checks if c.critical and c.verdict == "fail"]
    if critical:
        return Judgement("rollback", checks, _named(critical))
    broken = [c for c in checks if c.name == "validity" and c.verdict == "fail"]
    if broken:
        return Judgement("pause", checks, _named(broken))
    if ready and all(c.verdict == "pass" for c in checks):
        return Judgement("advance", checks, "every check passes and the step is ready")
    failing = [c for c in checks if c.verdict == "fail"]
    if expired and failing:
        return Judgement("rollback", checks, f"maximum dwell reached with {_named(failing)}")
    return Judgement("hold", checks, _waiting(checks, ready=ready, expired=expired))


def _named(checks: list[Check]) -> str:
    return "; ".join(f"{c.name} fails: {c.reason}" for c in checks)


def _waiting(checks: tuple[Check, ...], *, ready: bool, expired: bool) -> str:
    """What a hold waits for: continuing checks, failing ones, the step's readiness."""
    parts = []
    pending = [c.name for c in checks if c.verdict == "continue"]
    if pending:
        parts.append("waiting for " + ", ".join(pending))
    failing = [c.name for c in checks if c.verdict == "fail"]
    if failing:
        parts.append(", ".join(failing) + " failing")
    if not ready:
        parts.append("the step is not ready")
    said = "; ".join(parts) or "no verdict"
    return f"maximum dwell reached without a verdict: {said}" if expired else said
