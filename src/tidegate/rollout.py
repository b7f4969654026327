"""One progressive rollout: where it stands, and how it is written down and read back.

A rollout walks a canary through the weights of `RolloutConfig.steps`. Its status is
`running` (the judge looks every epoch), `paused` (the weight holds, nobody judges),
or one of the two ends, `promoted` and `rolled_back`. Everything here is plain
data, persisted in the state file, so that a restarted server resumes the rollout
at the same step and weight (`ControlPlane` does the acting).

Its judge is the server's own (`SERVER`: one process of the server looks at the
windows of all its workers) or a fleet's (`FLEET`: `tidegate fleet rollout` looks at
the windows of every replica sharing the desired state, and the servers leave it be).
Both decide with `Rollout.look`.
"""

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from tidegate.config import RolloutConfig
from tidegate.judge import Judgement, Thresholds, judge
from tidegate.step_windows import StepWindows

RUNNING, PAUSED, PROMOTED, ROLLED_BACK = "running", "paused", "promoted", "rolled_back"
STATUSES = (RUNNING, PAUSED, PROMOTED, ROLLED_BACK)
SERVER, FLEET = "server", "fleet"  # who judges the rollout (see the module doc)
JUDGES = (SERVER, FLEET)
HISTORY_LIMIT = 100  # transitions kept in the state (the audit log keeps them all)


@dataclass(slots=True)
class Rollout:
    model: str
    stable: int
    canary: int
    config: RolloutConfig
    loaded_canary: bool  # the rollout loaded the canary, so a rollback unloads it
    step: int = 0  # index into config.steps
    status: str = RUNNING
    reason: str = ""  # why it is where it is (the last transition's reason)
    started: float = field(default_factory=time.time)  # wall clock: survives restarts
    step_started: float = field(default_factory=time.time)
    ready_looks: int = 0  # looks of the judge since the current step became ready
    judgement: dict[str, Any] | None = None  # the judge's last look
    history: list[dict[str, Any]] = field(default_factory=list)
    judge: str = SERVER

    @property
    def weight(self) -> float:
        return self.config.steps[self.step]

    @property
    def finished(self) -> bool:
        return self.status in (PROMOTED, ROLLED_BACK)

    @property
    def alpha_step(self) -> float:
        """The false-rollback budget of one step: the rollout's alpha over the steps
        that are judged (all but the last, which is the promotion)."""
        return self.config.alpha / (len(self.config.steps) - 1)

    @property
    def thresholds(self) -> Thresholds:
        config = self.config
        return Thresholds(
            alpha=config.alpha,
            error_margin=config.error_margin,
            latency_p99_ratio=config.latency_p99_ratio,
            min_latency_samples=config.min_latency_samples,
            psi=config.psi,
            disagreement=config.disagreement,
        )

    def seconds_in_step(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.step_started)

    def note(self, action: str, actor: str, reason: str) -> None:
        """Records a transition in the history (and as the current reason); every
        transition starts the step's count of ready looks afresh."""
        self.reason = reason
        self.ready_looks = 0
        self.history.append(
            {
                "time": time.time(),
                "action": action,
                "actor": actor,
                "step": self.step + 1,
                "weight": self.weight,
                "reason": reason,
            }
        )
        del self.history[:-HISTORY_LIMIT]

    def look(self, windows: StepWindows, now: float | None = None) -> Judgement:
        """One look of the judge at the current step's `windows` (every worker's, or
        every replica's): the verdict, also kept as `judgement`. A look at a step that
        has its minimum rows and dwell counts as one of its ready looks."""
        config = self.config
        dwell = self.seconds_in_step(now)
        ready = windows.canary.requests >= config.min_rows and dwell >= config.min_dwell_s
        if ready:
            self.ready_looks += 1
        verdict = judge(
            windows.stable,
            windows.canary,
            split_stable=windows.split_stable,
            split_canary=windows.split_canary,
            weight=self.weight,
            shadow=windows.shadow,
            thresholds=self.thresholds,
            alpha_step=self.alpha_step,
            ready=ready,
            expired=dwell >= config.max_dwell_s,
            ready_look=max(self.ready_looks, 1),
        )
        self.judgement = {"time": time.time(), **verdict.to_dict()}
        return verdict

    def to_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["config"]["steps"] = list(self.config.steps)
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "Rollout":
        """Raises KeyError, TypeError or ValueError on a document that does not fit."""
        config = dict(document["config"])
        config["steps"] = tuple(float(w) for w in config["steps"])
        rollout = cls(**{**document, "config": RolloutConfig(**config)})
        if not 0 <= rollout.step < len(rollout.config.steps):
            raise ValueError(f"step {rollout.step} is not one of the rollout's steps")
        if rollout.status not in STATUSES:
            raise ValueError(f"unknown rollout status {rollout.status!r}")
        if rollout.judge not in JUDGES:
            raise ValueError(f"unknown judge {rollout.judge!r}")
        return rollout
