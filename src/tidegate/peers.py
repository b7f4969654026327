"""The other worker processes of this server, reached over their private sockets.

Each worker of a `--workers N` server also listens on a Unix socket of its own in
the server's run directory (created by the supervisor, mode 0700: only the
server's user reaches it), named after its slot: `w0.sock`, `w1.sock`, ... Those
sockets answer the `/internal/...` endpoints, and only they do (see `app`): they
are how one worker tells the others to reconcile, and asks them for their share
of statistics. A socket nobody accepts on (a worker killed and not yet back, or
still starting) counts as no worker: it reconciles when it starts.
"""

import asyncio
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tidegate.supervisor import RUN_DIR_ENV, WORKER_ENV

# The sockets speak plain HTTP, but an httpx transport builds an SSL context, loading
# the CA bundle (20-35 ms of CPU), unless it is given one: this one, made once and never
# used.
_UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@dataclass(slots=True, frozen=True)
class Reply:
    worker: str
    status: int
    body: Any  # the JSON answer (an error's is {"error": ...})


class Peers:
    """The workers of this server other than this one (none in a one-process server)."""

    def __init__(self, run_dir: Path | None, me: str | None) -> None:
        self.run_dir = run_dir
        self.me = me

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    def socket(self, worker: str) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"{worker}.sock"

    def others(self) -> list[str]:
        if self.run_dir is None:
            return []
        names = sorted(path.stem for path in self.run_dir.glob("*.sock"))
        return [name for name in names if name != self.me]

    async def call(
        self, method: str, path: str, body: object | None = None, limit_s: float = 10.0
    ) -> list[Reply]:
        """`method path` on every other worker at once; the replies of those that
        answered (a worker that is not accepting is skipped, see the module doc)."""
        replies = await asyncio.gather(
            *(self._call(worker, method, path, body, limit_s) for worker in self.others())
        )
        return [reply for reply in replies if reply is not None]

    async def drift_states(self, model: str, version: str) -> list[dict[str, Any]]:
        """The other workers' drift states of a version (see `Deployment.drift_state`);
        a worker without one yet (its reference is not complete) is left out."""
        replies = await self.call("GET", f"/internal/drift/{model}/{version}")
        return [reply.body for reply in replies if reply.status == 200]

    async def _call(
        self, worker: str, method: str, path: str, body: object | None, limit_s: float
    ) -> Reply | None:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket(worker)), verify=_UNUSED_TLS)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://worker", timeout=limit_s, verify=_UNUSED_TLS
        ) as client:
            try:
                response = await client.request(method, path, json=body)
            except (httpx.ConnectError, FileNotFoundError):
                return None  # not accepting: killed, or still starting
            except httpx.HTTPError as exc:
                return Reply(worker, 0, {"error": f"{type(exc).__name__}: {exc}"})
        try:
            document = response.json()
        except ValueError:
            document = {"error": response.text[:200]}
        return Reply(worker, response.status_code, document)


def worker_peers() -> Peers:
    """The peers of this process: as the supervisor set them in the environment, or
    none for a one-process server."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    return Peers(None if run_dir is None else Path(run_dir), os.environ.get(WORKER_ENV))
