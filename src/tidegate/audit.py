"""The audit log: one JSON line per control action, appended and fsynced.

Each line says when, who (the actor: a token's name, or `judge` for the rollout
judge's own actions), what (action, model, versions), why (reason, with the
numbers behind an automatic action) and how it ended (outcome). A line is on disk
before the action's response is sent. A crash can leave a partial last line: the
log is opened so that the next entry starts on a line of its own, and readers skip
lines that do not parse, so such a tail never stops the server from starting or
appending.
"""

import json
import os
import threading
import time
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
        self._file = open(path, "ab")
        if self._file.tell() and not _ends_with_newline(path):
            self._file.write(b"\n")
            self._flush()

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
        with self._lock:
            self._file.write(line)
            self._flush()
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
            self._file.close()

    def _flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as log:
        log.seek(-1, os.SEEK_END)
        return log.read(1) == b"\n"


def _now() -> str:
    """UTC, ISO 8601, milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
