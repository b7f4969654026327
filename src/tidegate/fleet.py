"""A fleet: the replicas of one tidegate deployment, read and judged as one.

Theory of operation
-------------------
Replicas that share a state directory (a shared volume) share one desired state:
a change made through any replica is a new generation of `state.json`, and every
other replica applies it within its follow interval, exactly as the workers of one
server do. What the replicas count stays their own, and adds up: step windows
(`StepWindows.to_state`) and drift states merge by addition.

`Fleet` reaches every replica at once, from a list of URLs or a DNS name that
resolves to them (a Kubernetes headless Service), looked up again at every read so
that replicas coming and going are seen. A read of the fleet is all or nothing: a
replica that does not answer is named (`Incomplete`), never left out of a sum.

`FleetJudge` judges a rollout started with `"judge": "fleet"` (the servers' own
judges leave it alone) on the windows of every replica added up, with the same
`Rollout.look` a server's judge uses, and posts each decision to one replica: it is
applied and audited once, and the judge waits until every replica serves the
generation that holds it. While a replica does not answer, the judge pauses the
rollout, naming it, rather than judge part of the traffic; once every replica
answers again it resumes the rollout it paused (one paused by an operator stays so).
"""

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tidegate.client import ClientError, ControlClient, ServerError, Unreachable
from tidegate.rollout import FLEET, PAUSED, RUNNING, Rollout
from tidegate.step_windows import StepWindows

T = TypeVar("T")

INCOMPLETE = "the fleet is incomplete"  # how the judge's own pauses start (see FleetJudge)
CATCH_UP_S = 30.0  # how long every replica gets to apply a generation


class Incomplete(Exception):
    """Some replicas did not answer (or answered with an error): {url: why}."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = failures
        named = "; ".join(f"{url}: {why}" for url, why in sorted(failures.items()))
        super().__init__(f"{len(failures)} replica(s) did not answer: {named}")


def replica_urls(specs: Sequence[str]) -> list[str]:
    """The replicas' base URLs. A spec with a scheme (`http://host:port`) or an IP
    address is one replica; a DNS name (`name:port`) is every address it resolves to:
    its IPv4 addresses, or its IPv6 ones when it has none (a dual-stack pod has one of
    each, and must count once).

    Raises:
        ValueError: a spec without a port, or a name that does not resolve.
    """
    urls: list[str] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        parts = urlsplit(spec if "://" in spec else f"http://{spec}")
        host, port = parts.hostname, parts.port
        if not host or port is None:
            raise ValueError(f"replica {spec!r} needs a host and a port")
        if "://" in spec or _is_address(host):
            urls.append(f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}")
            continue
        for address in _resolve(host, port):
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            urls.append(f"http://{netloc}")
    return list(dict.fromkeys(urls))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> list[str]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"replica name {host!r} does not resolve: {exc.strerror}") from exc
    by_family: dict[int, list[str]] = {}
    for family, _, _, _, address in found:
        by_family.setdefault(family, []).append(str(address[0]))
    chosen = by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or []
    return sorted(set(chosen), key=ipaddress.ip_address)


class Fleet:
    """Every replica at once, through one `ControlClient` each."""

    def __init__(self, specs: Sequence[str], token: str | None = None, timeout: float = 30.0):
        self.specs = list(specs)
        self.token = token
        self.timeout = timeout

    def clients(self) -> list[ControlClient]:
        """One client per replica, the names resolved afresh."""
        return [
            ControlClient(url, timeout=self.timeout, token=self.token)
            for url in replica_urls(self.specs)
        ]

    def gather(self, call: Callable[[ControlClient], T]) -> tuple[dict[str, T], dict[str, str]]:
        """`call` on every replica at once: (answers, failures), each by replica URL."""
        clients = self.clients()
        if not clients:
            raise ValueError("no replicas: give their URLs, or a name that resolves to them")
        answers: dict[str, T] = {}
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(len(clients), 32)) as pool:
            futures = {client.url: pool.submit(call, client) for client in clients}
            for url, future in futures.items():
                try:
                    answers[url] = future.result()
                except ClientError as exc:
                    failures[url] = str(exc)
        return answers, failures

    def read(self, call: Callable[[ControlClient], T]) -> dict[str, T]:
        """`call` on every replica; Incomplete naming those that did not answer."""
        answers, failures = self.gather(call)
        if failures:
            raise Incomplete(failures)
        return answers

    def windows(self, model: str) -> tuple[dict[str, dict[str, Any]], StepWindows | None]:
        """Each replica's view of the model (`ControlClient.fleet_view`) and their step
        windows added up (None while the model has no canary)."""
        views = self.read(lambda client: client.fleet_view(model))
        return views, added_up(views)

    def drift(self, model: str, version: str) -> dict[str, Any]:
        """The version's drift report over every replica's traffic: the others' drift
        states, added to one replica's by that replica."""
        states = self.read(lambda client: client.drift_state(model, version))
        first = self.clients()[0]
        return first.merged_drift(
            model, version, [state for url, state in states.items() if url != first.url]
        )

    def wait_for(self, generation: int, limit_s: float = CATCH_UP_S) -> dict[str, str]:
        """Waits until every replica serves `generation` or a later one; returns those
        that do not ({url: why}, empty when all do): at once for a replica that does
        not answer, after `limit_s` for one that stays behind."""
        deadline = time.monotonic() + limit_s
        while True:
            answers, failures = self.gather(lambda client: client.applied_state()["generation"])
            behind = {
                url: f"serves generation {applied}, not yet {generation}"
                for url, applied in answers.items()
                if applied < generation
            }
            if failures or not behind or time.monotonic() >= deadline:
                return {**failures, **behind}
            time.sleep(0.1)


@dataclass(slots=True)
class Look:
    """What one look of the fleet judge saw and did."""

    status: str  # the rollout's status after the look
    action: str  # advance, rollback, pause, resume, hold, or wait (the fleet is not in step)
    reason: str
    rollout: dict[str, Any] | None = None  # where the rollout stands (see `_summary`)
    windows: StepWindows | None = None  # every replica's, added up

    @property
    def finished(self) -> bool:
        return self.status in ("promoted", "rolled_back")


class FleetJudge:
    """The judge of one model's fleet-judged rollout (see the module doc)."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self.fleet = fleet
        self.model = model
        # Ready looks per step, keyed by (step, transitions so far): the judge's own
        # count, as a server's judge keeps it in memory.
        self._ready_looks: dict[tuple[int, int], int] = {}

    def look(self) -> Look:
        views, failures = self.fleet.gather(lambda client: client.fleet_view(self.model))
        if failures:
            return self._pause_for(views, Incomplete(failures))
        windows = added_up(views)
        generations = {view["generation"] for view in views.values()}
        if len(generations) > 1:
            behind = ", ".join(f"{url} at {view['generation']}" for url, view in views.items())
            reason = f"replicas on different generations ({behind}): waiting for them"
            return Look("unknown", "wait", reason)
        document = next(iter(views.values()))["rollout"]
        if document is None:
            raise ValueError(f"model '{self.model}' has no rollout")
        rollout = Rollout.from_json(document)
        if rollout.judge != FLEET:
            raise ValueError(f"the rollout of model '{self.model}' is judged by its servers")
        if rollout.finished or rollout.status == PAUSED:
            if rollout.status == PAUSED and rollout.reason.startswith(INCOMPLETE):
                return self._decide(rollout, "resume", f"every replica answers ({len(views)})", [])
            return Look(rollout.status, "hold", rollout.reason, _summary(rollout), windows)
        assert windows is not None  # a running rollout routes a canary on every replica
        key = (rollout.step, len(rollout.history))
        rollout.ready_looks = self._ready_looks.get(key, 0)
        verdict = rollout.look(windows)
        self._ready_looks[key] = rollout.ready_looks
        if verdict.action == "hold":
            return Look(RUNNING, "hold", verdict.reason, _summary(rollout), windows)
        checks = [check.to_dict() for check in verdict.checks]
        return self._decide(rollout, verdict.action, verdict.reason, checks, windows)

    def _pause_for(self, views: dict[str, dict[str, Any]], incomplete: Incomplete) -> Look:
        """Pauses a running rollout (as the replicas that answered, `views`, hold it),
        naming the replicas that did not; a rollout already paused, or no replica
        answering, is left as it is."""
        reason = f"{INCOMPLETE}: {incomplete}"
        for view in views.values():
            document = view["rollout"]
            if document is None or document["status"] != RUNNING:
                return Look(document["status"] if document else "unknown", "wait", reason)
            return self._decide(Rollout.from_json(document), "pause", reason, [])
        return Look("unknown", "wait", reason)

    def _decide(
        self,
        rollout: Rollout,
        action: str,
        reason: str,
        checks: list[dict[str, Any]],
        windows: StepWindows | None = None,
    ) -> Look:
        """Posts the decision to the first replica that answers, then waits until every
        replica serves the generation that holds it, or one does not answer."""
        failures: dict[str, str] = {}
        for client in self.fleet.clients():
            try:
                status = client.judgement(self.model, rollout.step + 1, action, reason, checks)
                # The next look judges only once every replica serves the decision.
                self.fleet.wait_for(client.applied_state()["generation"])
            except Unreachable as exc:
                failures[client.url] = str(exc)
                continue  # the next one
            except ServerError as exc:
                if exc.status != 409:
                    raise
                # The rollout moved on since the look (an operator acted): look again.
                return Look(rollout.status, "wait", exc.message, _summary(rollout), windows)
            return Look(status["status"], action, reason, status, windows)
        why = f"no replica answers to take the decision ({action}): {Incomplete(failures)}"
        return Look(rollout.status, "wait", why, _summary(rollout), windows)


def added_up(views: dict[str, dict[str, Any]]) -> StepWindows | None:
    """The step windows of the replicas' views added up (None without a canary)."""
    states = [view["windows"] for view in views.values() if view["windows"] is not None]
    if not states:
        return None
    merged = StepWindows.from_state(states[0])
    for state in states[1:]:
        merged = merged.merged(StepWindows.from_state(state))
    return merged


def _summary(rollout: Rollout) -> dict[str, Any]:
    """Where the rollout stands, in the keys of a server's rollout status."""
    return {
        "model_name": rollout.model,
        "stable": str(rollout.stable),
        "canary": str(rollout.canary),
        "status": rollout.status,
        "step": rollout.step + 1,
        "steps": list(rollout.config.steps),
        "weight": rollout.weight,
        "reason": rollout.reason,
        "config": rollout.to_json()["config"],
    }
