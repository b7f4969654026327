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
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.audit import AuditLog
from tidegate.canary import Traffic
from tidegate.config import parse_rollout
from tidegate.errors import BadRequest, Conflict, NotApplied, NotFound, TidegateError
from tidegate.judge import Judgement
from tidegate.peers import Peers
from tidegate.protocol import ascii_number
from tidegate.reconcile import Reconciler, encode_models, models_of
from tidegate.registry import Registry
from tidegate.rollout import FLEET, JUDGES, PAUSED, PROMOTED, ROLLED_BACK, RUNNING, Rollout
from tidegate.state import StateFile
from tidegate.step_windows import StepWindows
from tidegate.traffic import TrafficPolicy

log = logging.getLogger("tidegate.control")

JUDGE = "judge"  # the actor of the judge's own actions
FLEET_JUDGE = "fleet judge"  # ... and of a fleet judge's, with the name of its token
FLEET_ACTIONS = ("advance", "rollback", "pause", "resume")  # what a fleet judge may decide
TICK_S = 0.05  # how often the judge's task wakes to see whose epoch is due
FOLLOW_S = 0.5  # how often a worker looks for a generation it was not told about
RECONCILE_TIMEOUT_S = 300.0  # a worker's builds for one generation (large models load slowly)


class ControlPlane:
    def __init__(
        self, registry: Registry, traffic: Traffic, state_dir: Path, peers: Peers | None = None
    ) -> None:
        self.registry = registry
        self.traffic = traffic
        self.audit = AuditLog(state_dir / "audit.jsonl")
        self.state = StateFile(state_dir / "state.json")
        self.peers = peers or Peers(None, None)
        self.rollouts: dict[str, Rollout] = {}
        self.reconciler = Reconciler(registry, traffic, self.rollouts)
        self._lock = asyncio.Lock()
        self._looked: dict[str, float] = {}  # model -> monotonic time of the judge's last look
        self._judge_lock = state_dir / "judge.lock"
        self._judging: int | None = None  # the judge lock's descriptor, once this process judges
        self._before: dict[str, Any] = {}  # the state a change in progress started from
        self._file_generation = 0  # the desired state file's, as last read or written

    # -- reading ----------------------------------------------------------------------

    async def read_traffic(self, name: str) -> dict[str, Any]:
        """The traffic status, once any change in progress is on disk; its window
        counts every worker's requests."""
        async with self._lock:
            return self.traffic_status(name, await self._whole_windows(name))

    async def read_rollout(self, name: str) -> dict[str, Any]:
        """The rollout status, once any transition in progress is on disk; its window
        counts every worker's requests."""
        async with self._lock:
            return self.rollout_status(name, await self._whole_windows(name))

    async def _whole_windows(self, name: str) -> StepWindows | None:
        live = self.traffic.live(name)
        return None if live is None else await self._merged_windows(name, live.windows)

    def traffic_status(self, name: str, windows: StepWindows | None = None) -> dict[str, Any]:
        """The model's policy, the version answering as stable, and the step windows
        (`windows`, else this process's own)."""
        deployment = self.registry.resolve(name)
        policy = self.traffic.policy(name)
        document: dict[str, Any] = {"model_name": name, **policy.to_json()}
        document["stable"] = deployment.version_label
        live = self.traffic.live(name)
        if live is not None:
            document["window"] = (windows or live.windows).to_json()
        return document

    def rollout_status(self, name: str, windows: StepWindows | None = None) -> dict[str, Any]:
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
            document["window"] = (windows or live.windows).to_json()
        return document

    # -- operator actions ---------------------------------------------------------------

    async def set_traffic(self, name: str, document: object, actor: str) -> dict[str, Any]:
        async with self.change():
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
        judged_by = options.pop("judge", "server")
        if judged_by not in JUDGES:
            raise BadRequest(f"'judge' must be one of {', '.join(JUDGES)}, not {judged_by!r}")
        async with self.change():
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
                await self.registry.load(name, canary, revision=self._next_generation())
                await self._publish()
                await self.record(
                    actor, "load", name, "done", "the rollout's canary", version=canary
                )
            rollout = Rollout(name, stable.version, number, config, loaded, judge=judged_by)
            rollout.note("start", actor, f"canary {canary} at {rollout.weight} % ({config.mode})")
            self.rollouts[name] = rollout
            self._route(rollout)
            await self._commit(
                actor, "rollout.start", name, "running", rollout.reason, **_versions(rollout)
            )
            return self.rollout_status(name)

    async def act(self, name: str, action: str, actor: str) -> dict[str, Any]:
        """An operator's promote, rollback, pause or resume."""
        async with self.change():
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
                await self._resume(rollout, actor, reason)
            return self.rollout_status(name)

    async def load(self, name: str, version: str | None, actor: str) -> None:
        """The repository API's load (either transport), on every worker (see
        `Registry.load`), audited."""
        async with self._audited(actor, "load", name, version):
            async with self.change():
                await self.registry.load(name, version, revision=self._next_generation())
                await self._publish()

    async def unload(self, name: str, version: str | None, actor: str) -> str | None:
        """The repository API's unload (either transport), on every worker (see
        `Registry.unload`), audited: as a no-op, with why, when nothing was loaded."""
        async with self._audited(actor, "unload", name, version) as outcome:
            async with self.change():
                nothing_done = await self.registry.unload(name, version)
                if nothing_done is None:
                    await self._publish()
            if nothing_done is not None:
                outcome.no_op(nothing_done)
        return nothing_done

    @contextlib.asynccontextmanager
    async def _audited(
        self, actor: str, action: str, name: str, version: str | None
    ) -> AsyncIterator["_Outcome"]:
        """Appends the action to the audit log: done, a no-op (with why) or failed (with
        the error)."""
        outcome = _Outcome()
        try:
            yield outcome
        except TidegateError as exc:
            await self.record(actor, action, name, "failed", exc.message, version=version)
            raise
        await self.record(actor, action, name, outcome.outcome, outcome.reason, version=version)

    # -- the judge ------------------------------------------------------------------

    async def run(self) -> None:
        """Looks at each running rollout once per its epoch, until cancelled. Of the
        workers of one server, one judges: the one holding the judge lock (a worker
        that dies drops it, and another takes it at its next tick)."""
        while True:
            await asyncio.sleep(TICK_S)
            if not self._judge():
                continue
            now = time.monotonic()
            for name, rollout in list(self.rollouts.items()):
                due = self._looked.get(name, 0.0) + rollout.config.epoch_s
                if rollout.status != RUNNING or rollout.judge == FLEET or now < due:
                    continue
                self._looked[name] = now
                try:
                    async with self.change():
                        current = self.rollouts.get(name)  # as the latest generation says
                        if current is not None and current.status == RUNNING:
                            await self.look(current)
                except Exception:  # one model's failure must not stop the others' judging
                    log.exception("judging the rollout of %s failed", name)

    def _judge(self) -> bool:
        """Whether this process is the judge: takes the judge lock if it is free."""
        if self._judging is None:
            descriptor = os.open(self._judge_lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                return False
            self._judging = descriptor
        return True

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
        verdict = rollout.look(await self._merged_windows(rollout.model, live.windows))
        await self._carry_out(rollout, verdict.action, JUDGE, verdict.reason)
        return verdict

    async def apply_judgement(self, name: str, document: object, actor: str) -> dict[str, Any]:
        """A fleet judge's decision on a rollout it judges (see `fleet`): `step` (the
        1-based step it judged, so that a decision about a step the rollout has left is
        refused), `action` (advance, rollback, pause or resume), `reason` and `checks`.
        Applied and audited here once; the other replicas follow the desired state."""
        step, action, reason, checks = _judgement(document)
        async with self.change():
            rollout = self.rollouts.get(name)
            if rollout is None:
                raise NotFound(f"model '{name}' has no rollout")
            if rollout.judge != FLEET:
                raise Conflict(f"the rollout of model '{name}' is judged by its server")
            if rollout.finished:
                raise Conflict(f"the rollout of model '{name}' is already {rollout.status}")
            if step != rollout.step + 1:
                raise Conflict(
                    f"the judgement is of step {step}; the rollout of model '{name}' "
                    f"is at step {rollout.step + 1}"
                )
            if (action == "resume") != (rollout.status == PAUSED):
                raise Conflict(f"the rollout of model '{name}' is {rollout.status}: no {action}")
            rollout.judgement = {
                "time": time.time(),
                "action": action,
                "reason": reason,
                "checks": checks,
            }
            await self._carry_out(rollout, action, f"{FLEET_JUDGE} ({actor})", reason)
            return self.rollout_status(name)

    async def fleet_view(self, name: str) -> dict[str, Any]:
        """What a fleet judge reads of this replica each look: the generation it serves,
        the model's policy and rollout, and its step windows (all workers', as additive
        state: see `StepWindows.to_state`)."""
        self.registry.resolve(name)  # NotFound for a model that does not serve
        async with self._lock:
            rollout = self.rollouts.get(name)
            windows = await self._whole_windows(name)
            return {
                "model_name": name,
                "generation": self.reconciler.generation,
                "policy": self.traffic.policy(name).to_json(),
                "rollout": None if rollout is None else rollout.to_json(),
                "windows": None if windows is None else windows.to_state(),
            }

    def applied_state(self) -> dict[str, Any]:
        """The desired state as this process applied it, with its generation."""
        return {"generation": self.reconciler.generation, "state": self.snapshot()}

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

    async def _carry_out(self, rollout: Rollout, action: str, actor: str, reason: str) -> None:
        """A judge's action (a hold changes nothing), audited with its checks."""
        assert rollout.judgement is not None
        checks = rollout.judgement["checks"]
        if action == "rollback":
            await self._roll_back(rollout, actor, reason, checks)
        elif action == "pause":
            await self._pause(rollout, actor, reason, checks)
        elif action == "advance":
            await self._advance(rollout, actor, reason, checks)
        elif action == "resume":
            await self._resume(rollout, actor, reason)

    async def _advance(self, rollout: Rollout, actor: str, reason: str, checks: list[Any]) -> None:
        if rollout.step + 2 >= len(rollout.config.steps):
            await self._promote(rollout, actor, reason, checks)
            return
        rollout.step += 1
        rollout.step_started = time.time()
        self._route(rollout)
        await self._transition(rollout, RUNNING, "advance", actor, reason, checks)

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

    async def _resume(self, rollout: Rollout, actor: str, reason: str) -> None:
        self._route(rollout)
        self.traffic.new_window(rollout.model)  # what was seen while paused is not judged
        await self._transition(rollout, RUNNING, "resume", actor, reason)

    def _route(self, rollout: Rollout) -> None:
        """Applies the rollout's current step to the live routing."""
        policy = TrafficPolicy(rollout.stable, rollout.canary, rollout.weight, rollout.config.mode)
        self.traffic.apply(rollout.model, policy)

    async def _unload(self, name: str, version: int, actor: str) -> None:
        if await self.registry.unload(name, str(version)) is not None:
            return  # already gone
        await self._publish()
        await self.record(actor, "unload", name, "done", "after the rollout", version=str(version))

    # -- state and audit ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's state, as the desired state writes it (see `reconcile`)."""
        return {
            "models": encode_models(self.registry.revisions()),
            "traffic": {name: p.to_json() for name, p in self.traffic.policies().items()},
            "rollouts": {name: r.to_json() for name, r in self.rollouts.items()},
        }

    async def _commit(
        self, actor: str, action: str, model: str, outcome: str, reason: str, **details: Any
    ) -> None:
        """Publishes the state, then records the action: on disk and applied by every
        worker before it is answered."""
        await self._publish()
        await asyncio.to_thread(self.audit.append, actor, action, model, outcome, reason, **details)

    # -- the desired state, shared with the other workers ----------------------------

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """One change of the desired state, made here: holds the lock every worker's
        changes take (first, so that a worker waiting for it can still apply another's
        change), brings this process to the latest generation, and remembers the state
        it started from, to undo a change that another worker cannot apply."""
        descriptor = await asyncio.to_thread(self.state.acquire)
        try:
            async with self._lock:
                restored = await asyncio.to_thread(self.state.load, set_aside=True)
                if restored.problem is not None:
                    # This process serves the last good state: the change starts from it.
                    log.error("desired state: %s", restored.problem)
                    await self.record("control", "state", None, "failed", restored.problem)
                elif restored.generation > self.reconciler.generation:
                    await self.reconciler.apply(restored.state, restored.generation)
                self._file_generation = restored.generation
                self._before = self.snapshot()
                yield
        finally:
            self.state.release(descriptor)

    def _next_generation(self) -> int:
        """The generation the change in progress publishes (a revision for its builds)."""
        return max(self._file_generation, self.reconciler.generation) + 1

    async def _publish(self) -> None:
        """Writes this process's state as the next generation and waits until every
        other worker has applied it. If one cannot, the change is undone everywhere
        (the state it started from, as one more generation) and NotApplied says which
        worker failed and why."""
        generation = self._next_generation()
        await asyncio.to_thread(self.state.save, self.snapshot(), generation)
        self._file_generation = self.reconciler.generation = generation
        failed = await self._tell_workers(generation)
        if not failed:
            return
        undo = self._next_generation()
        await self.reconciler.apply(self._before, undo)
        await asyncio.to_thread(self.state.save, self._before, undo)
        self._file_generation = undo
        still = await self._tell_workers(undo)
        detail = "; ".join(f"worker {worker}: {error}" for worker, error in failed)
        if still:
            log.error("undoing generation %d failed on %s", generation, still)
        raise NotApplied(f"the change was undone: {detail}")

    async def _tell_workers(self, generation: int) -> list[tuple[str, str]]:
        """Has every other worker apply `generation`; (worker, error) for those that
        could not."""
        replies = await self.peers.call(
            "POST", "/internal/reconcile", {"generation": generation}, RECONCILE_TIMEOUT_S
        )
        return [
            (reply.worker, str(reply.body.get("error", reply.body)))
            for reply in replies
            if reply.status != 200
        ]

    async def follow(self, generation: int | None = None) -> int:
        """Applies the desired state if it is newer than what this process serves (told
        by the worker that changed it, or found by `follow_forever`). Returns the
        generation applied.

        Raises:
            NotApplied: the file is unreadable or older than what this process serves,
                or a version would not build; this process serves what it served.
        """
        async with self._lock:
            restored = await asyncio.to_thread(self.state.load)
            if restored.problem is not None:
                raise NotApplied(restored.problem)
            if restored.generation < self.reconciler.generation:
                raise NotApplied(
                    f"{self.state.path} is at generation {restored.generation}, older than "
                    f"the {self.reconciler.generation} this worker serves: a stale file"
                )
            if restored.generation > self.reconciler.generation:
                try:
                    await self.reconciler.apply(restored.state, restored.generation)
                except TidegateError as exc:
                    raise NotApplied(f"generation {restored.generation}: {exc.message}") from exc
            if generation is not None and self.reconciler.generation < generation:
                raise NotApplied(
                    f"generation {generation} is not on disk (it has {restored.generation})"
                )
            return self.reconciler.generation

    async def follow_forever(self) -> None:
        """Catches up with changes nobody told this process about (made by a replica
        sharing the state directory, or by a worker while this one was starting, or a
        lost call), until cancelled."""
        seen: tuple[int, int, int] | None = None
        while True:
            await asyncio.sleep(FOLLOW_S)
            # A stat per look: the file is read again only once it changed since it was
            # applied (one that was refused is tried, and reported, at every look).
            try:
                info = os.stat(self.state.path)
            except FileNotFoundError:
                continue
            signature = (info.st_ino, info.st_mtime_ns, info.st_size)
            if signature == seen:
                continue
            try:
                await self.follow()
            except NotApplied as exc:
                log.error("desired state not applied: %s", exc.message)
                continue
            seen = signature

    async def _merged_windows(self, name: str, local: StepWindows) -> StepWindows:
        """The model's step windows summed over every worker (this one's alone without
        others): the judge decides on the whole server's traffic."""
        replies = await self.peers.call("GET", f"/internal/windows/{name}")
        merged = local
        for reply in replies:
            if reply.status == 200 and reply.body is not None:
                merged = merged.merged(StepWindows.from_state(reply.body))
        return merged

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
        """Re-applies the saved models, traffic policies and rollouts (see the module
        doc). Under the lock of changes: of workers starting together, one sets a
        corrupt file aside and the others find none."""
        descriptor = await asyncio.to_thread(self.state.acquire)
        try:
            restored = await asyncio.to_thread(self.state.load, set_aside=True)
        finally:
            self.state.release(descriptor)
        if restored.problem is not None:
            log.error("state not restored: %s", restored.problem)
            await self.record("control", "restore", None, "failed", restored.problem)
            return
        state = restored.state
        self.reconciler.generation = self._file_generation = restored.generation
        await self._restore_models(state)
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
        if state.get("traffic") or state.get("rollouts"):  # models alone: nothing to say
            await self.record("control", "restore", None, "done", f"{len(self.rollouts)} rollouts")

    async def _restore_models(self, state: dict[str, Any]) -> None:
        """Serves the versions the state names. A version this process built at start
        counts as built at the state's revision: it was read from the same files."""
        try:
            models = models_of(state)
        except BadRequest as exc:
            log.error("models not restored: %s", exc.message)
            return
        for name, target in models.items():
            for version, revision in target.items():
                deployment = self.registry.get(name, version)
                if deployment is not None and deployment.revision == 0:
                    deployment.revision = revision
            try:
                await self.registry.reconcile(name, target, retire=True)
            except TidegateError as exc:
                log.error("model %s not restored: %s", name, exc.message)
                await self.record("control", "restore", name, "failed", exc.message)


def _judgement(document: object) -> tuple[int, str, str, list[Any]]:
    """A fleet judge's decision: (step, action, reason, checks); BadRequest naming the
    field that is missing or wrong."""
    if not isinstance(document, dict):
        raise BadRequest("the judgement must be a JSON object")
    step, action = document.get("step"), document.get("action")
    reason, checks = document.get("reason", ""), document.get("checks", [])
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise BadRequest("'step' (the 1-based step judged) must be a whole number from 1")
    if action not in FLEET_ACTIONS:
        raise BadRequest(f"'action' must be one of {', '.join(FLEET_ACTIONS)}, not {action!r}")
    if not isinstance(reason, str):
        raise BadRequest("'reason' must be a string")
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise BadRequest("'checks' must be a list of objects")
    return step, action, reason, checks


def _versions(rollout: Rollout) -> dict[str, Any]:
    return {
        "versions": {"stable": str(rollout.stable), "canary": str(rollout.canary)},
        "step": rollout.step + 1,
        "weight": rollout.weight,
    }


@dataclass(slots=True)
class _Outcome:
    """How an audited action ended, when it did not fail."""

    outcome: str = "done"
    reason: str = ""

    def no_op(self, reason: str) -> None:
        self.outcome, self.reason = "no-op", reason
