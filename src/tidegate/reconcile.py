"""Brings one process to a desired state: its models' versions, traffic policies and
rollouts (the document `ControlPlane.snapshot` writes, see `state`).

Theory of operation
-------------------
A desired state names, per model, the versions to serve and the revision each was
built at (the generation of the change that built it); per model, a traffic
policy; per model, a rollout. Applying it is a diff against what this process
serves, in an order that never routes a request to a version that is not there:
first every version that is missing, or at another revision, is built beside
what serves; then traffic policies and rollouts are switched; last, versions the
state no longer names stop serving (their in-flight requests finish on them). A
model the state does not name is left as this process loaded it at start.

If a build fails, nothing after it is applied and the error goes back to whoever
asked: the versions already built serve beside the old ones, and routing is
unchanged, so clients see the last good state until a later generation (the
undo of the change, see `ControlPlane`) brings the process back.
"""

from typing import Any

from tidegate.canary import Traffic
from tidegate.errors import BadRequest
from tidegate.registry import Registry
from tidegate.rollout import Rollout
from tidegate.traffic import TrafficPolicy


def models_of(state: dict[str, Any]) -> dict[str, dict[int, int]]:
    """The state's models: name -> {version: revision}. BadRequest when malformed."""
    raw = state.get("models", {})
    if not isinstance(raw, dict):
        raise BadRequest("the desired state's 'models' is not an object")
    models: dict[str, dict[int, int]] = {}
    for name, versions in raw.items():
        if not isinstance(versions, dict):
            raise BadRequest(f"the desired state's versions of model '{name}' are not an object")
        try:
            models[name] = {int(version): int(revision) for version, revision in versions.items()}
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"the desired state's model '{name}' is malformed: {exc}") from exc
    return models


def encode_models(revisions: dict[str, dict[int, int]]) -> dict[str, dict[str, int]]:
    """`models_of`'s inverse: JSON object keys are strings."""
    return {
        name: {str(version): revision for version, revision in sorted(versions.items())}
        for name, versions in sorted(revisions.items())
    }


class Reconciler:
    """Applies desired states to this process's registry, traffic and rollouts."""

    def __init__(self, registry: Registry, traffic: Traffic, rollouts: dict[str, Rollout]) -> None:
        self.registry = registry
        self.traffic = traffic
        self.rollouts = rollouts  # the control plane's, changed in place
        self.generation = 0  # the last generation applied here

    async def apply(self, state: dict[str, Any], generation: int) -> None:
        """Makes `state` what this process serves (see the module doc).

        Raises:
            BadRequest, NotFound: a version would not build, or the state is malformed.
        """
        models = models_of(state)
        policies = {
            name: TrafficPolicy.from_json(document, TrafficPolicy())
            for name, document in dict(state.get("traffic", {})).items()
        }
        rollouts = {
            name: Rollout.from_json(document)
            for name, document in dict(state.get("rollouts", {})).items()
        }
        for name, target in sorted(models.items()):
            await self.registry.reconcile(name, target, retire=False)
        for name in sorted(set(policies) | set(self.traffic.policies())):
            policy = policies.get(name, TrafficPolicy())
            if policy != self.traffic.policy(name):
                self.traffic.check(name, policy)
                self.traffic.apply(name, policy)
        self._replace_rollouts(rollouts)
        for name, target in sorted(models.items()):
            await self.registry.reconcile(name, target, retire=True)
        self.generation = generation

    def _replace_rollouts(self, wanted: dict[str, Rollout]) -> None:
        for name in set(self.rollouts) - set(wanted):
            del self.rollouts[name]
        for name, rollout in wanted.items():
            current = self.rollouts.get(name)
            if current is not None and current.to_json() == rollout.to_json():
                continue  # the same rollout: keep the object (the judge may hold it)
            if current is not None and (current.status, current.step) != (
                rollout.status,
                rollout.step,
            ):
                # A new step, or a resume: the windows start afresh, as where it changed.
                self.traffic.new_window(name)
            self.rollouts[name] = rollout
