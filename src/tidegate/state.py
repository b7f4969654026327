"""The server's durable state (traffic policies, rollouts) in one JSON file.

Written atomically: the new content goes to a temporary file in the same
directory, is fsynced and renamed over the old one, and the directory is
fsynced, so a crash leaves either the old state or the new one, never a mix. A
file that cannot be read back (hand-edited, a disk fault) is moved aside with a
timestamp, and the server starts from the defaults rather than not at all.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1  # the layout's version, written into the file


@dataclass(slots=True, frozen=True)
class Restored:
    state: dict[str, Any]  # empty when there was nothing (usable) to restore
    problem: str | None  # why a file was set aside, naming where it went


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Restored:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Restored({}, None)
        try:
            document = json.loads(raw)
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} tidegate state object")
            state = document["state"]
            if not isinstance(state, dict):
                raise ValueError("'state' is not an object")
        except (ValueError, KeyError) as exc:
            aside = self.path.with_name(
                f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
            )
            os.replace(self.path, aside)
            return Restored({}, f"{self.path} is unreadable ({exc}); moved to {aside}")
        return Restored(state, None)

    def save(self, state: dict[str, Any]) -> None:
        """Replaces the file's content atomically (blocking: two fsyncs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": FORMAT, "state": state}, indent=1, sort_keys=True).encode()
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
