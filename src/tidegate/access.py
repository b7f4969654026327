"""The access gate: a pure ASGI app in front of everything, checking bearer tokens.

Which role an endpoint needs (see `auth.Role`):
- `inference`: `POST .../infer`;
- `operator`: loading and unloading (`POST /v2/repository/models/...`), changing a
  model's traffic (`PUT .../traffic`) and every rollout action (`POST .../rollout...`);
- `admin`: the audit log (`GET /v2/audit`);
- `reader`: everything else: health, server and model metadata, configuration,
  statistics, drift, the repository index, traffic and rollout status, `/metrics`.
  Unknown paths too, so that a caller without a token learns nothing about routes.

The dashboard's page and its scripts (`GET /dashboard`, `/dashboard/static/...`)
need no token: they hold no data, and a browser opening the page cannot send one. The
page asks for a token, and its reads (`/dashboard/api/...`) need the reader role.

A request that passes carries its token's name in its scope (`ACTOR_KEY`): the actor
of the audit log's entries. One that does not gets 401 (no token, or an unknown one,
with `WWW-Authenticate: Bearer`) or 403 (a token without the role), in the V2 error
format, before its body is read.
"""

from tidegate.auth import AuthFile, Role
from tidegate.errors import TidegateError
from tidegate.infer import ASGIApp, Headers, Receive, Scope, Send, error_parts, respond
from tidegate.v2 import ACTOR_KEY

_CHANGES = ("POST", "PUT", "PATCH", "DELETE")
_DASHBOARD_FILES = ("/dashboard", "/dashboard/")


def public(method: str, path: str) -> bool:
    """The dashboard's page and static files: no data, no token needed."""
    if method not in ("GET", "HEAD"):
        return False
    return path in _DASHBOARD_FILES or path.startswith("/dashboard/static/")


def required_role(method: str, path: str) -> Role:
    parts = path.split("/")
    if parts[1:2] != ["v2"]:
        return Role.READER  # /metrics, and unknown paths
    if parts[2:3] == ["audit"]:
        return Role.ADMIN
    if parts[2:4] == ["repository", "models"]:
        return Role.OPERATOR
    if parts[2:3] == ["models"] and len(parts) >= 5:
        if parts[-1] == "infer" and method == "POST":
            return Role.INFERENCE
        if parts[4] in ("traffic", "rollout") and method in _CHANGES:
            return Role.OPERATOR
    return Role.READER


def bearer(headers: Headers) -> str | None:
    """The request's Authorization header, if it sent one."""
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def denial(exc: TidegateError) -> tuple[int, Headers, bytes]:
    """The response refusing a request its token does not allow (401 or 403)."""
    status, headers, body = error_parts(exc)
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="tidegate"'))
    return status, headers, body


class AccessGate:
    def __init__(self, app: ASGIApp, auth: AuthFile) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if public(method, path):
            await self.app(scope, receive, send)
            return
        try:
            principal = self.auth.authorize(
                bearer(scope["headers"]), required_role(method, path), f"{method} {path}"
            )
        except TidegateError as exc:
            await respond(send, *denial(exc))
            return
        scope[ACTOR_KEY] = principal.name
        await self.app(scope, receive, send)
