"""The audit log: one JSON line per control action, appended and fsynced.

Each line says when, who (the actor: a token's name, or `judge` for the rollout
judge's own actions), what (action, model, versions), why (reason, with the
numbers behind an automatic action) and how it ended (outcome). A line is on disk
before the action's response is sent. A crash can leave a partial last line: the
log is opened so that the next entry starts on a line of its own, and readers skip
lines that do not parse, so such a tail never stops the server from starting or
appending.

The workers of one server append to the same file: each entry is one write to a
descriptor opened for appending, under an advisory lock on the file, so lines of
any length never interleave.
"""

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True, frozen=True)
class AuditEntries:
    entries: list[dict[str, Any]]
    unreadable: int  # lines that did not parse (a crash's partial last line)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Held open for the server's life: one append and fsync per action.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with self._locked():
            if os.fstat(self._fd).st_size and not _ends_with_newline(path):
                self._write(b"\n")

    def append(
        self,
        actor: str,
        action: str,
        model: str | None,
        outcome: str,
        reason: str = "",
        **details: Any,
    ) -> dict[str, Any]:
        """Writes one entry and returns it once it is on disk (blocking: fsync)."""
        entry: dict[str, Any] = {
            "time": _now(),
            "actor": actor,
            "action": action,
            "model": model,
            **details,
            "reason": reason,
            "outcome": outcome,
        }
        line = json.dumps(entry, separators=(",", ":"), default=str).encode() + b"\n"
        with self._locked():
            self._write(line)
        return entry

    def read(self, model: str | None = None, limit: int | None = None) -> AuditEntries:
        """The entries (of one model), oldest first; the last `limit` of them."""
        entries: list[dict[str, Any]] = []
        unreadable = 0
        with open(self.path, "rb") as log:
            for line in log:
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    unreadable += 1
                    continue
                if isinstance(entry, dict) and (model is None or entry.get("model") == model):
                    entries.append(entry)
        if limit is not None:
            entries = entries[-limit:] if limit else []
        return AuditEntries(entries, unreadable)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads, then the other processes appending to the file."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write(self, data: bytes) -> None:
        """All of `data`, then fsync (called with the lock held)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as log:
        log.seek(-1, os.SEEK_END)
        return log.read(1) == b"\n"


def _now() -> str:
    """UTC, ISO 8601, milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
