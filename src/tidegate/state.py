"""The desired state (models and their versions, traffic policies, rollouts) in one
JSON file, numbered by a generation.

Every process that serves the repository (the workers of one server, later the
replicas of a fleet) reconciles to this file: a change is made by one of them
under `exclusive()` (an advisory lock on a file beside it), written with the next
generation, and applied by the others (see `control`).

Written atomically: the new content goes to a temporary file in the same
directory, is fsynced and renamed over the old one, and the directory is
fsynced, so a crash leaves either the old state or the new one, never a mix. A
file that cannot be read back (hand-edited, a disk fault) is reported; at start
it is moved aside with a timestamp, and the server starts from the defaults
rather than not at all (`load(set_aside=True)`).
"""

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 2  # the layout's version, written into the file
_READABLE = (1, 2)  # format 1 had no generation: it reads as generation 0


@dataclass(slots=True, frozen=True)
class Restored:
    state: dict[str, Any]  # empty when there was nothing (usable) to restore
    problem: str | None  # why the file could not be used (and where it went, if moved)
    generation: int = 0


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f"{path.name}.lock")

    def acquire(self) -> int:
        """Takes the lock that serialises changes across processes (blocking); returns
        what `release` takes. An advisory lock on an open file: the OS drops it when
        its holder dies, so a killed worker cannot leave it held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    @staticmethod
    def release(descriptor: int) -> None:
        os.close(descriptor)  # closing the last descriptor of the file drops its lock

    def load(self, *, set_aside: bool = False) -> Restored:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Restored({}, None)
        try:
            document = json.loads(raw)
            if not isinstance(document, dict) or document.get("format") not in _READABLE:
                raise ValueError(f"not a format-{FORMAT} tidegate state object")
            state = document["state"]
            generation = document.get("generation", 0)
            if not isinstance(state, dict):
                raise ValueError("'state' is not an object")
            if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
                raise ValueError("'generation' is not a whole number")
        except (ValueError, KeyError) as exc:
            if not set_aside:
                return Restored({}, f"{self.path} is unreadable ({exc})")
            aside = self.path.with_name(
                f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
            )
            os.replace(self.path, aside)
            return Restored({}, f"{self.path} is unreadable ({exc}); moved to {aside}")
        return Restored(state, None, generation)

    def save(self, state: dict[str, Any], generation: int) -> None:
        """Replaces the file's content atomically (blocking: two fsyncs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"format": FORMAT, "generation": generation, "state": state}
        body = json.dumps(document, indent=1, sort_keys=True).encode()
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
