"""The control plane: traffic policies, progressive rollouts, their state and audit.

Theory of operation
-------------------
Every change of who serves a model goes through `ControlPlane`, one at a time (an
asyncio lock): an operator's traffic change, a rollout's start, promote, rollback,
pause or resume, and the judge's own advances, promotions, rollbacks and pauses.
Each change is applied to the live routing (`Traffic`), written to the state file,
then appended to the audit log with its actor and reason, before it is answered.

The judge runs as a task on the event loop. Every `epoch_s` it compares a running
rollout's canary with stable on the current step's windows (`judge.judge`) and
acts on the verdict: a critical failure rolls back at once; a step that passes
with its minimum rows and dwell advances, and passing the step before 100 %
promotes: the canary becomes stable and the old stable is unloaded, its in-flight
requests finishing first. A step with no data holds: no data is never a pass.

At start, `restore` reads the state file back: versions a policy names are
loaded if the repository's version policy did not load them, and rollouts resume
at their step and weight. A corrupt file is set aside and reported; every model
then serves its stable version.
"""

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from tidegate.audit import AuditLog
from tidegate.canary import Traffic
from tidegate.config import parse_rollout
from tidegate.errors import BadRequest, Conflict, NotFound, TidegateError
from tidegate.judge import Judgement, judge
from tidegate.protocol import ascii_number
from tidegate.registry import Registry
from tidegate.rollout import PAUSED, PROMOTED, ROLLED_BACK, RUNNING, Rollout
from tidegate.state import StateFile
from tidegate.traffic import TrafficPolicy

log = logging.getLogger("tidegate.control")

JUDGE = "judge"  # the actor of the judge's own actions
TICK_S = 0.05  # how often the judge's task wakes to see whose epoch is due


class ControlPlane:
    def __init__(self, registry: Registry, traffic: Traffic, state_dir: Path) -> None:
        self.registry = registry
        self.traffic = traffic
        self.audit = AuditLog(state_dir / "audit.jsonl")
        self.state = StateFile(state_dir / "state.json")
        self.rollouts: dict[str, Rollout] = {}
        self._lock = asyncio.Lock()
        self._looked: dict[str, float] = {}  # model -> monotonic time of the judge's last look

    # -- reading ----------------------------------------------------------------------

    async def read_traffic(self, name: str) -> dict[str, Any]:
        """The traffic status, once any change in progress is on disk."""
        async with self._lock:
            return self.traffic_status(name)

    async def read_rollout(self, name: str) -> dict[str, Any]:
        """The rollout status, once any transition in progress is on disk."""
        async with self._lock:
            return self.rollout_status(name)

    def traffic_status(self, name: str) -> dict[str, Any]:
        deployment = self.registry.resolve(name)
        policy = self.traffic.policy(name)
        document: dict[str, Any] = {"model_name": name, **policy.to_json()}
        document["stable"] = deployment.version_label
        live = self.traffic.live(name)
        if live is not None:
            document["window"] = live.windows.to_json()
        return document

    def rollout_status(self, name: str) -> dict[str, Any]:
        rollout = self.rollouts.get(name)
        if rollout is None:
            raise NotFound(f"model '{name}' has no rollout")
        config = rollout.config
        document: dict[str, Any] = {
            "model_name": name,
            "stable": str(rollout.stable),
            "canary": str(rollout.canary),
            "status": rollout.status,
            "mode": config.mode,
            "step": rollout.step + 1,
            "steps": list(config.steps),
            "weight": rollout.weight,
            "seconds_in_step": round(rollout.seconds_in_step(), 3),
            "reason": rollout.reason,
            "judgement": rollout.judgement,
            "config": rollout.to_json()["config"],
            "history": rollout.history,
        }
        live = self.traffic.live(name)
        if live is not None and not rollout.finished:
            document["window"] = live.windows.to_json()
        return document

    # -- operator actions ---------------------------------------------------------------

    async def set_traffic(self, name: str, document: object, actor: str) -> dict[str, Any]:
        async with self._lock:
            rollout = self.rollouts.get(name)
            if rollout is not None and not rollout.finished:
                raise Conflict(
                    f"model '{name}' has a rollout {rollout.status}; promote or roll it back first"
                )
            current = self.registry.resolve(name)
            policy = TrafficPolicy.from_json(document, self.traffic.policy(name))
            if policy.stable is None and policy.canary is not None:
                # A canary is judged against a fixed stable: pin the one answering now.
                pinned = {**policy.to_json(), "stable": current.version_label}
                policy = TrafficPolicy.from_json(pinned, TrafficPolicy())
            self.traffic.check(name, policy)
            self.traffic.apply(name, policy)
            await self._commit(actor, "traffic", name, "applied", "", policy=policy.to_json())
            return self.traffic_status(name)

    async def start_rollout(self, name: str, document: object, actor: str) -> dict[str, Any]:
        if not isinstance(document, dict):
            raise BadRequest("the rollout request must be a JSON object")
        options = dict(document)
        version = options.pop("version", None)
        if isinstance(version, bool) or not isinstance(version, str | int):
            raise BadRequest("'version' (the canary's version number) is required")
        async with self._lock:
            current = self.rollouts.get(name)
            if current is not None and not current.finished:
                raise Conflict(f"model '{name}' already has a rollout {current.status}")
            stable = self.registry.resolve(name)
            config = parse_rollout("rollout request", options, stable.config.rollout)
            canary = str(version)
            number = ascii_number(canary)
            if number is None or number < 1:
                raise BadRequest(f"'version' must be a version number, not {version!r}")
            if number == stable.version:
                raise BadRequest(
                    f"version {canary!r} is not a candidate: version {stable.version} is stable"
                )
            loaded = self.registry.get(name, number) is None
            if loaded:
                await self.registry.load(name, canary)
                await self.record(
                    actor, "load", name, "done", "the rollout's canary", version=canary
                )
            rollout = Rollout(name, stable.version, number, config, loaded)
            rollout.note("start", actor, f"canary {canary} at {rollout.weight} % ({config.mode})")
            self.rollouts[name] = rollout
            self._route(rollout)
            await self._commit(
                actor, "rollout.start", name, "running", rollout.reason, **_versions(rollout)
            )
            return self.rollout_status(name)

    async def act(self, name: str, action: str, actor: str) -> dict[str, Any]:
        """An operator's promote, rollback, pause or resume."""
        async with self._lock:
            rollout = self.rollouts.get(name)
            if rollout is None:
                raise NotFound(f"model '{name}' has no rollout")
            if rollout.finished:
                raise Conflict(f"the rollout of model '{name}' is already {rollout.status}")
            reason = f"by {actor}"
            if action == "promote":
                await self._promote(rollout, actor, reason)
            elif action == "rollback":
                await self._roll_back(rollout, actor, reason)
            elif action == "pause":
                await self._pause(rollout, actor, reason)
            elif rollout.status == RUNNING:
                raise Conflict(f"the rollout of model '{name}' is running, not paused")
            else:
                self._route(rollout)
                self.traffic.new_window(name)  # what was seen while paused is not judged
                await self._transition(rollout, RUNNING, "resume", actor, reason)
            return self.rollout_status(name)

    # -- the judge ------------------------------------------------------------------

    async def run(self) -> None:
        """Looks at each running rollout once per its epoch, until cancelled."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for name, rollout in list(self.rollouts.items()):
                due = self._looked.get(name, 0.0) + rollout.config.epoch_s
                if rollout.status != RUNNING or now < due:
                    continue
                self._looked[name] = now
                try:
                    async with self._lock:
                        if rollout.status == RUNNING and self.rollouts.get(name) is rollout:
                            await self.look(rollout)
                except Exception:  # one model's failure must not stop the others' judging
                    log.exception("judging the rollout of %s failed", name)

    async def look(self, rollout: Rollout) -> Judgement | None:
        """One look of the judge at `rollout`, and the action it calls for. A rollout
        whose stable or canary was unloaded (by an operator, or a repository reload)
        cannot be judged: it pauses, saying which, rather than hold forever."""
        gone = [
            f"{role} version {version}"
            for role, version in (("stable", rollout.stable), ("canary", rollout.canary))
            if self.registry.get(rollout.model, version) is None
        ]
        if gone:
            reason = f"{' and '.join(gone)} is no longer loaded: load it, then resume"
            await self._pause(rollout, JUDGE, reason)
            return None
        live = self.traffic.live(rollout.model)
        assert live is not None  # a running rollout's canary is always routed
        windows = live.windows
        config = rollout.config
        dwell = rollout.seconds_in_step()
        ready = windows.canary.requests >= config.min_rows and dwell >= config.min_dwell_s
        if ready:
            rollout.ready_looks += 1
        verdict = judge(
            windows.stable,
            windows.canary,
            split_stable=windows.split_stable,
            split_canary=windows.split_canary,
            weight=rollout.weight,
            shadow=windows.shadow,
            thresholds=rollout.thresholds,
            alpha_step=rollout.alpha_step,
            ready=ready,
            expired=dwell >= config.max_dwell_s,
            ready_look=max(rollout.ready_looks, 1),
        )
        rollout.judgement = {
            "time": time.time(),
            "action": verdict.action,
            "reason": verdict.reason,
            "checks": [check.to_dict() for check in verdict.checks],
        }
        checks = rollout.judgement["checks"]
        if verdict.action == "rollback":
            await self._roll_back(rollout, JUDGE, verdict.reason, checks)
        elif verdict.action == "pause":
            await self._pause(rollout, JUDGE, verdict.reason, checks)
        elif verdict.action == "advance":
            await self._advance(rollout, verdict.reason, checks)
        return verdict

    # -- transitions (called with the lock held) -------------------------------------

    async def _transition(
        self,
        rollout: Rollout,
        status: str,
        action: str,
        actor: str,
        reason: str,
        checks: list[Any] | None = None,
    ) -> None:
        """Records a transition of `rollout`: its status and history, the state file
        and the audit log (with the judge's checks when it was the judge's)."""
        rollout.status = status
        rollout.note(action, actor, reason)
        details = _versions(rollout) if checks is None else {**_versions(rollout), "checks": checks}
        await self._commit(actor, f"rollout.{action}", rollout.model, status, reason, **details)

    async def _advance(self, rollout: Rollout, reason: str, checks: list[Any]) -> None:
        if rollout.step + 2 >= len(rollout.config.steps):
            await self._promote(rollout, JUDGE, reason, checks)
            return
        rollout.step += 1
        rollout.step_started = time.time()
        self._route(rollout)
        await self._transition(rollout, RUNNING, "advance", JUDGE, reason, checks)

    async def _promote(
        self, rollout: Rollout, actor: str, reason: str, checks: list[Any] | None = None
    ) -> None:
        rollout.step = len(rollout.config.steps) - 1
        self.traffic.apply(rollout.model, TrafficPolicy(rollout.canary))
        await self._transition(rollout, PROMOTED, "promote", actor, reason, checks)
        # Requests that hold the old stable's Deployment finish on it: the unload only
        # stops new ones from finding it.
        await self._unload(rollout.model, rollout.stable, actor)

    async def _roll_back(
        self, rollout: Rollout, actor: str, reason: str, checks: list[Any] | None = None
    ) -> None:
        self.traffic.apply(rollout.model, TrafficPolicy(rollout.stable))
        await self._transition(rollout, ROLLED_BACK, "rollback", actor, reason, checks)
        if rollout.loaded_canary:
            await self._unload(rollout.model, rollout.canary, actor)

    async def _pause(
        self, rollout: Rollout, actor: str, reason: str, checks: list[Any] | None = None
    ) -> None:
        if rollout.status == PAUSED:
            raise Conflict(f"the rollout of model '{rollout.model}' is already paused")
        await self._transition(rollout, PAUSED, "pause", actor, reason, checks)

    def _route(self, rollout: Rollout) -> None:
        """Applies the rollout's current step to the live routing."""
        policy = TrafficPolicy(rollout.stable, rollout.canary, rollout.weight, rollout.config.mode)
        self.traffic.apply(rollout.model, policy)

    async def _unload(self, name: str, version: int, actor: str) -> None:
        if await self.registry.unload(name, str(version)) is not None:
            return  # already gone
        await self.record(actor, "unload", name, "done", "after the rollout", version=str(version))

    # -- state and audit ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "traffic": {name: p.to_json() for name, p in self.traffic.policies().items()},
            "rollouts": {name: r.to_json() for name, r in self.rollouts.items()},
        }

    async def _commit(
        self, actor: str, action: str, model: str, outcome: str, reason: str, **details: Any
    ) -> None:
        """Persists the state, then records the action: on disk before it is answered."""
        snapshot = self.snapshot()
        await asyncio.to_thread(self.state.save, snapshot)
        await asyncio.to_thread(self.audit.append, actor, action, model, outcome, reason, **details)

    async def record(
        self,
        actor: str,
        action: str,
        model: str | None,
        outcome: str,
        reason: str = "",
        **details: Any,
    ) -> None:
        """Audits an action taken elsewhere (a load or unload through the repository API)."""
        await asyncio.to_thread(self.audit.append, actor, action, model, outcome, reason, **details)

    async def restore(self) -> None:
        """Re-applies the saved traffic policies and rollouts (see the module doc)."""
        restored = await asyncio.to_thread(self.state.load)
        if restored.problem is not None:
            log.error("state not restored: %s", restored.problem)
            await self.record("control", "restore", None, "failed", restored.problem)
            return
        state = restored.state
        for name, document in dict(state.get("rollouts", {})).items():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.rollouts[name] = Rollout.from_json(document)
                continue
            log.error("rollout of %s not restored: its saved state does not fit", name)
        for name, document in dict(state.get("traffic", {})).items():
            try:
                policy = TrafficPolicy.from_json(document, TrafficPolicy())
                for version in (policy.stable, policy.canary):
                    if version is not None and self.registry.get(name, version) is None:
                        await self.registry.load(name, str(version))
                self.traffic.check(name, policy)
                self.traffic.apply(name, policy)
            except TidegateError as exc:
                log.error("traffic policy of %s not restored: %s", name, exc.message)
                await self.record("control", "restore", name, "failed", exc.message)
                self.rollouts.pop(name, None)
        if state:
            await self.record("control", "restore", None, "done", f"{len(self.rollouts)} rollouts")


def _versions(rollout: Rollout) -> dict[str, Any]:
    return {
        "versions": {"stable": str(rollout.stable), "canary": str(rollout.canary)},
        "step": rollout.step + 1,
        "weight": rollout.weight,
    }
