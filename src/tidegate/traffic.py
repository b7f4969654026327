"""A model's traffic policy, and which side of the split a request falls on.

A routing key is hashed (BLAKE2b, 64 bits) to a point in [0, 100); the request goes
to the canary when the point lies below the canary's weight. The hash is the same in
every process and on every restart, so a key always sees the same version at a given
weight, and raising the weight only moves keys from stable to canary, never back. A
request without a key draws its point at random, so the keyless share is the weight.
"""

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

from tidegate.errors import BadRequest
from tidegate.protocol import ascii_number

MODES = ("split", "shadow")
_SCALE = 100.0 / 2.0**64


def key_point(key: bytes) -> float:
    """Where `key` falls in [0, 100): stable across processes and restarts."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") * _SCALE


def random_point() -> float:
    return random.random() * 100.0


@dataclass(slots=True, frozen=True)
class TrafficPolicy:
    """Which version is stable, and what share of traffic (if any) the canary sees."""

    stable: int | None = None  # None: the highest loaded version
    canary: int | None = None
    weight: float = 0.0  # percent of requests (split) or of mirrored copies (shadow)
    mode: str = "split"

    @property
    def has_canary(self) -> bool:
        return self.canary is not None and self.weight > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "stable": None if self.stable is None else str(self.stable),
            "canary": None if self.canary is None else str(self.canary),
            "weight": self.weight,
            "mode": self.mode,
        }

    @classmethod
    def from_json(cls, document: object, base: "TrafficPolicy") -> "TrafficPolicy":
        """`base` with the fields `document` sets; BadRequest naming a bad field."""
        if not isinstance(document, dict):
            raise BadRequest("the traffic policy must be a JSON object")
        unknown = sorted(set(document) - {"stable", "canary", "weight", "mode"})
        if unknown:
            raise BadRequest(f"unknown traffic field '{unknown[0]}'")
        stable = _version(document, "stable", base.stable)
        canary = _version(document, "canary", base.canary)
        weight = document.get("weight", base.weight)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise BadRequest(f"'weight' must be a number of percent, not {weight!r}")
        if not (math.isfinite(weight) and 0 <= weight <= 100):
            raise BadRequest(f"'weight' must be between 0 and 100, not {weight}")
        mode = document.get("mode", base.mode)
        if mode not in MODES:
            raise BadRequest(f"'mode' must be one of {list(MODES)}, not {mode!r}")
        if canary is not None and canary == stable:
            raise BadRequest(f"version {canary} cannot be both stable and canary")
        return cls(stable, canary, float(weight), mode)


def _version(document: dict[str, Any], field: str, default: int | None) -> int | None:
    if field not in document:
        return default
    value = document[field]
    if value is None:
        return None
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    number = ascii_number(text)
    if number is None or number < 1:
        raise BadRequest(f"'{field}' must be a version number, not {value!r}")
    return number
