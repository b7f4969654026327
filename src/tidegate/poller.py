"""Polls the model repository and applies what changed, once the files are complete.

Theory of operation
-------------------
Every `interval` seconds the poller fingerprints each model directory (file
names, sizes and modification times of config.toml and of every version
directory; nothing is parsed). A model is acted on only when its fingerprint is
the same in two polls in a row, so a file still being copied, which grows or is
touched between polls, is left alone until it stops changing; and only when
that fingerprint differs from the one last acted on, so a model is not reloaded
over and over, and a broken file is tried once, not at every poll.

Acting means a policy reload through the registry that keeps every version
whose files did not change (`reuse_unchanged`): new versions load, changed ones
reload, versions gone from disk or from the policy stop serving. The reload
parses and warms the new files first; if they fail, the serving versions stay
and the error is logged. A model whose directory (or last model file) is gone
is unloaded.
"""

import asyncio
import logging

from tidegate.errors import NotFound, TidegateError
from tidegate.registry import Registry
from tidegate.repository import ModelFingerprint, fingerprints

log = logging.getLogger("tidegate.poller")


class RepositoryPoller:
    def __init__(self, registry: Registry, interval: float) -> None:
        self._registry = registry
        self._interval = interval
        self._previous: dict[str, ModelFingerprint] = {}
        self._acted: dict[str, ModelFingerprint | None] = {}

    async def prime(self) -> None:
        """Takes the repository as it is now as already applied (run before the
        initial load, so that a change racing with it is picked up by a poll)."""
        self._previous = await asyncio.to_thread(fingerprints, self._registry.root)
        self._acted = dict(self._previous)

    async def run(self) -> None:
        """Polls until cancelled; a failing poll is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except Exception:
                log.exception("polling the repository %s failed", self._registry.root)

    async def poll_once(self) -> None:
        current = await asyncio.to_thread(fingerprints, self._registry.root)
        for name in sorted(set(current) | set(self._previous) | set(self._acted)):
            now = current.get(name)
            if now != self._previous.get(name) or now == self._acted.get(name):
                continue  # still changing, or already applied
            self._acted[name] = now
            await self._apply(name, now is not None)
        self._previous = current

    async def _apply(self, name: str, on_disk: bool) -> None:
        try:
            if on_disk:
                deployments = await self._registry.load(name, reuse_unchanged=True)
                log.info("poll: model %s now serves %s", name, [d.version for d in deployments])
                return
        except NotFound:
            pass  # no version directory with a model file left: unload below
        except TidegateError as exc:
            log.error("poll: model %s not reloaded, serving versions unchanged: %s", name, exc)
            return
        if self._registry.is_loaded(name):
            await self._registry.unload(name)
            log.info("poll: model %s removed from the repository, unloaded", name)
