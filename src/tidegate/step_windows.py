"""What the judge compares within one rollout step: each side's window, the split's
counts and the shadow comparison. Additive, so that the windows of every worker of a
server, and of every replica of a fleet, merge into the windows of all their traffic
(`to_state`, `from_state`, `merged`)."""

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidegate.judge import ShadowWindow, VariantWindow


@dataclass(slots=True)
class StepWindows:
    """What the judge compares within one rollout step (reset when the step changes)."""

    stable: VariantWindow = field(default_factory=VariantWindow)
    canary: VariantWindow = field(default_factory=VariantWindow)
    split_stable: int = 0  # keyless requests the random draw kept on stable
    split_canary: int = 0  # ... and sent to the canary (or mirrored, in shadow mode)
    shadow: ShadowWindow | None = None
    # A regressor's predictions are counted in bins of its score: stable's reference
    # output quantiles (inner edges), where stable has a drift profile.
    score_edges: np.ndarray | None = None
    started: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, object]:
        def side(window: VariantWindow) -> dict[str, object]:
            latency = window.latency
            return {
                "requests": window.requests,
                "errors": window.errors,
                "latency_p50_ms": latency.percentile(50) / 1e6 if latency.count else None,
                "latency_p99_ms": latency.percentile(99) / 1e6 if latency.count else None,
                "predictions": dict(sorted(window.predictions.items())),
            }

        document: dict[str, object] = {
            "seconds": round(time.monotonic() - self.started, 3),
            "stable": side(self.stable),
            "canary": side(self.canary),
            "split": {"stable": self.split_stable, "canary": self.split_canary},
        }
        if self.shadow is not None:
            shadow = self.shadow
            document["shadow"] = {
                "mirrored": shadow.mirrored,
                "dropped": shadow.dropped,
                "rows": shadow.rows,
                "disagreeing": shadow.disagreeing,
            }
        return document

    def to_state(self) -> dict[str, Any]:
        """What another worker's windows merge with (`from_state`, `merged`): counts
        and histograms only; the score edges and the start are each worker's own."""
        return {
            "stable": self.stable.to_dict(),
            "canary": self.canary.to_dict(),
            "split": [self.split_stable, self.split_canary],
            "shadow": None if self.shadow is None else self.shadow.to_dict(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "StepWindows":
        """`to_state`'s windows; ValueError when malformed."""
        split_stable, split_canary = state["split"]
        shadow = state.get("shadow")
        return cls(
            VariantWindow.from_dict(state["stable"]),
            VariantWindow.from_dict(state["canary"]),
            int(split_stable),
            int(split_canary),
            None if shadow is None else ShadowWindow.from_dict(shadow),
        )

    def merged(self, other: "StepWindows") -> "StepWindows":
        """These windows plus `other` (another worker's), as new windows: this one's
        own are left as they are, since requests keep adding to them."""
        total = StepWindows.from_state(self.to_state())
        total.score_edges, total.started = self.score_edges, self.started
        total.stable.merge(other.stable)
        total.canary.merge(other.canary)
        total.split_stable += other.split_stable
        total.split_canary += other.split_canary
        if total.shadow is not None and other.shadow is not None:
            total.shadow.merge(other.shadow)
        return total
