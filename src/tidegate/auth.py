"""Bearer-token access control: who a request comes from, and whether it may do what it asks.

The auth file is TOML, one table per named token::

    # tidegate auth file
    [tokens.ci-deployer]
    sha256 = "<hex sha256 of the token>"
    roles = ["operator", "reader"]

    [tokens.checkout-service]
    sha256 = "..."
    roles = ["inference", "reader"]

- A token's name matches ``[A-Za-z0-9_.-]+`` (a name with a dot must be quoted in TOML:
  ``[tokens."svc.v2"]``). It is what messages and logs call the token, so a client can be
  told who it was taken for without the secret ever being written anywhere.
- ``sha256`` is the hex sha256 of the token (64 hex digits, either case): the file holds
  no secrets, so it can be read by more people than the tokens' owners. ``hash_token``
  computes it; ``new_token`` makes a token worth hashing.
- ``roles`` lists at least one of ``reader`` (health, metadata, metrics), ``inference``
  (infer), ``operator`` (load, unload, traffic, rollout) and ``admin`` (all of them).
- An unknown key, an unknown role, a malformed hash, two tokens with the same hash, or a
  file with no tokens is a ``ConfigError`` naming the file and the key. A file with no
  tokens is refused because it is far more often a file caught half-written (an editor
  truncating before it writes) than a wish to lock every client out.

Clients send ``Authorization: Bearer <token>``. A missing, malformed or unknown token is
``Unauthorized`` (401); a known token without the role an endpoint needs is ``Forbidden``
(403). No message or log line contains a token, nor the header it came in (a client that
forgets the scheme would otherwise have its token echoed as "the scheme").

``AuthFile`` re-reads the file when it changes, so rotating a key needs no restart: write
the new file (preferably to a temporary name, then rename it over the old one), and within
``check_interval`` seconds the old token stops working and the new one starts. A rewrite
that does not parse, or a deleted file, leaves the previous tokens in force.
"""

import hashlib
import logging
import os
import secrets
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from tidegate.errors import ConfigError, Forbidden, Unauthorized

log = logging.getLogger("tidegate.auth")

_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_HEX_CHARS = frozenset("0123456789abcdef")
_SHA256_HEX_LEN = 64
_TOKEN_KEYS = frozenset({"sha256", "roles"})
_HOW_TO_SEND = "send 'Authorization: Bearer <token>'"

# (st_mtime_ns, st_size, st_ino) of the auth file, or None while it cannot be stat'ed.
# The inode is there for the rename-over rewrite, which may keep size and even mtime.
_Signature = tuple[int, int, int] | None


class Role(Enum):
    """What a token may do; each endpoint needs one role."""

    READER = "reader"  # health, metadata, metrics
    INFERENCE = "inference"  # infer
    OPERATOR = "operator"  # load, unload, traffic, rollout
    ADMIN = "admin"  # everything: implies every other role


_ROLE_NAMES = ", ".join(role.value for role in Role)


@dataclass(frozen=True, slots=True)
class Principal:
    """The named token a request was authenticated as, and the roles it was given."""

    name: str
    roles: frozenset[Role]

    def has(self, role: Role) -> bool:
        """Whether this token may act in `role`; admin may act in every role."""
        return role in self.roles or Role.ADMIN in self.roles


def _role_list(roles: frozenset[Role]) -> str:
    """Roles comma-separated in declaration order, so messages read the same every time."""
    return ", ".join(role.value for role in Role if role in roles) or "none"


def valid_token_name(name: str) -> bool:
    return bool(name) and set(name) <= _NAME_CHARS


def new_token() -> str:
    """A fresh random token: 32 bytes from the OS's CSPRNG, URL-safe base64 (43 chars).

    32 bytes put guessing out of reach, which is also why one unsalted sha256 is enough to
    store it: salts and slow hashes defend low-entropy passwords, not random keys."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex sha256 of `token` (UTF-8), the form the auth file stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_auth_file(path: Path) -> dict[str, Principal]:
    """Reads and checks an auth file; the principals keyed by lowercase hex sha256.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or breaks a rule of the
            format (see the module docstring); the message names the file and the key.
    """
    data = _read_toml(path)
    unknown = sorted(set(data) - {"tokens"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (only [tokens.<name>] tables)")
    tokens = data.get("tokens", {})
    if not isinstance(tokens, dict):
        raise ConfigError(f"{path}: tokens must be tables: [tokens.<name>]")
    if not tokens:
        raise ConfigError(f"{path}: no tokens: add a [tokens.<name>] table")
    by_hash: dict[str, Principal] = {}
    names_by_hash: dict[str, str] = {}
    for name, entry in tokens.items():
        digest, principal = _parse_token(path, name, entry)
        if digest in names_by_hash:
            raise ConfigError(
                f"{path}: tokens.{name}.sha256 is the same as tokens.{names_by_hash[digest]}"
                ".sha256: two names for one token"
            )
        names_by_hash[digest] = name
        by_hash[digest] = principal
    return by_hash


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML table, with read and syntax errors turned into ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the auth file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _parse_token(path: Path, name: str, entry: object) -> tuple[str, Principal]:
    """One [tokens.<name>] table: its hash and the principal it stands for."""
    if not valid_token_name(name):
        raise ConfigError(f"{path}: tokens.{name!r}: a token name must match [A-Za-z0-9_.-]+")
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: tokens.{name} must be a table with sha256 and roles")
    unknown = sorted(set(entry) - _TOKEN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key tokens.{name}.{unknown[0]} (sha256, roles)")
    missing = sorted(_TOKEN_KEYS - set(entry))
    if missing:
        raise ConfigError(f"{path}: tokens.{name}.{missing[0]} is missing")
    digest = _parse_sha256(path, name, entry["sha256"])
    roles = _parse_roles(path, name, entry["roles"])
    return digest, Principal(name, roles)


def _parse_sha256(path: Path, name: str, value: object) -> str:
    """The hash, lowercased. The value is never echoed: it may be a token pasted by mistake."""
    if not isinstance(value, str):
        raise ConfigError(f"{path}: tokens.{name}.sha256 must be a string of 64 hex digits")
    digest = value.strip().lower()
    if len(digest) != _SHA256_HEX_LEN or not set(digest) <= _HEX_CHARS:
        raise ConfigError(
            f"{path}: tokens.{name}.sha256 must be 64 hex digits, the sha256 of the token "
            f"(got {len(value)} characters; the token itself does not belong in this file)"
        )
    return digest


def _parse_roles(path: Path, name: str, value: object) -> frozenset[Role]:
    """A non-empty list of known role names."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: tokens.{name}.roles must list roles ({_ROLE_NAMES})")
    roles: set[Role] = set()
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{path}: tokens.{name}.roles must be role names ({_ROLE_NAMES})")
        try:
            roles.add(Role(item))
        except ValueError:
            raise ConfigError(
                f"{path}: tokens.{name}.roles: unknown role {item!r} (known: {_ROLE_NAMES})"
            ) from None
    return frozenset(roles)


def _bearer_token(authorization: str | None) -> str:
    """The token out of an Authorization header value: 'Bearer <token>', scheme any case.

    The messages describe the shape of the header, never its content."""
    if authorization is None or not authorization.strip():
        raise Unauthorized(f"no bearer token: {_HOW_TO_SEND}")
    parts = authorization.split()
    if parts[0].lower() != "bearer":
        raise Unauthorized(
            f"the Authorization header does not use the Bearer scheme: {_HOW_TO_SEND}"
        )
    if len(parts) == 1:
        raise Unauthorized(f"the Authorization header has no token after 'Bearer': {_HOW_TO_SEND}")
    if len(parts) > 2:
        raise Unauthorized(
            f"the Authorization header has more than one word after 'Bearer': {_HOW_TO_SEND}"
        )
    return parts[1]


def _signature(path: Path) -> _Signature:
    """What tells a changed file from an unchanged one without reading it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class AuthFile:
    """The tokens of one auth file, re-read when the file changes.

    Why the check is constant-time with respect to the secret: the presented token is
    hashed first, and only its sha256 digest is looked up, in a dict keyed by the stored
    digests. Nothing ever compares the token itself with anything, so a timing difference
    can only be about digests. Even that is small: the dict compares bytes only after the
    (per-process, randomly keyed) string hashes match, so what a lookup's time depends on
    is a keyed hash of the digest, which an attacker can neither choose nor read. And a
    leaked digest, or part of one, would not help anyone find a token that has it (sha256
    is preimage-resistant). That is the property `hmac.compare_digest` provides, at the
    cost of one lookup instead of one comparison per stored token; a compare_digest after
    the lookup would compare a digest with an equal one, so there is none.

    The hot path, when the file has not changed, is: split the header, one sha256, one
    monotonic clock read, one dict lookup. At most once per `check_interval` seconds the
    file is stat'ed, and re-parsed if its (mtime_ns, size, inode) changed. The new tokens
    replace the old in one reference assignment under a lock, so a thread sees either the
    old set or the new one. A reload that fails (the file is gone, or does not parse) keeps
    the old tokens and logs an error once, until the file changes again.

    `on_reload(ok, detail)` is called after every reload attempt, not after the first load:
    `(True, "N tokens")` or `(False, reason)`. It runs on the thread of the request that
    noticed the change; an exception from it is logged, not raised into that request.
    """

    def __init__(
        self,
        path: Path,
        check_interval: float = 1.0,
        on_reload: Callable[[bool, str], None] | None = None,
    ) -> None:
        """Loads the file at once: a server must not start with auth it cannot read.

        Raises:
            ConfigError: the first load failed.
            ValueError: `check_interval` is negative.
        """
        if check_interval < 0:
            raise ValueError(f"check_interval must be >= 0, got {check_interval}")
        self._path = Path(path)
        self._check_interval = check_interval
        self._on_reload = on_reload
        self._lock = threading.Lock()
        # Stat before reading: a write landing in between is then seen as a change next time.
        self._signature = _signature(self._path)
        self._by_hash = parse_auth_file(self._path)
        self._next_check = time.monotonic() + check_interval

    @property
    def path(self) -> Path:
        """The auth file this reads."""
        return self._path

    @property
    def tokens(self) -> int:
        """How many tokens are in force."""
        return len(self._by_hash)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal an Authorization header value belongs to.

        Raises:
            Unauthorized: the header is missing, is not 'Bearer <token>', or the token is
                not in the auth file.
        """
        token = _bearer_token(authorization)
        self._maybe_reload()
        principal = self._by_hash.get(hash_token(token))
        if principal is None:
            raise Unauthorized("unknown bearer token: no token in the auth file has its sha256")
        return principal

    def authorize(self, authorization: str | None, role: Role, action: str) -> Principal:
        """`authenticate`, then check the principal has `role`; `action` names the endpoint.

        Raises:
            Unauthorized: as `authenticate`.
            Forbidden: the token is known but lacks `role` (and is not admin).
        """
        principal = self.authenticate(authorization)
        if not principal.has(role):
            raise Forbidden(
                f"token {principal.name!r} lacks role {role.value!r} (needed for {action}); "
                f"it has: {_role_list(principal.roles)}"
            )
        return principal

    def _maybe_reload(self) -> None:
        """Re-reads the file if it is time to look and it changed.

        A thread that finds another one already checking goes on with the current tokens
        rather than wait for a file read."""
        now = time.monotonic()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return
        try:
            if now < self._next_check:  # another thread checked while we reached the lock
                return
            self._next_check = now + self._check_interval
            outcome = self._reload_if_changed()
        finally:
            self._lock.release()
        if outcome is not None:
            self._report(*outcome)

    def _reload_if_changed(self) -> tuple[bool, str] | None:
        """Swaps in the file's tokens if it changed; None if it did not, else (ok, detail)."""
        signature = _signature(self._path)
        if signature == self._signature:
            return None
        self._signature = signature  # a broken version is reported once, not every interval
        try:
            by_hash = parse_auth_file(self._path)
        except ConfigError as exc:
            log.error(
                "auth file not reloaded, keeping the previous %d tokens: %s",
                len(self._by_hash),
                exc.message,
            )
            return False, exc.message
        self._by_hash = by_hash
        log.info("auth file %s reloaded: %d tokens", self._path, len(by_hash))
        return True, f"{len(by_hash)} tokens"

    def _report(self, ok: bool, detail: str) -> None:
        """Calls on_reload outside the lock; its failure must not fail a request."""
        if self._on_reload is None:
            return
        try:
            self._on_reload(ok, detail)
        except Exception:
            log.exception("auth file on_reload callback failed")
