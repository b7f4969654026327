"""A small synchronous client for the V2 control plane: server metadata, the
repository index, loading and unloading models, and tidegate's own extensions
(drift reports, traffic policies, progressive rollouts, the audit log).

It is what the control commands (`tidegate status`, `load`, `canary`, `rollout`, ...)
talk through, so it is built on the standard library alone (`http.client`, `json`)
and imports nothing from the server side: it starts fast, and its repository calls
work against any server that implements Triton's model repository extension, not
only tidegate. With a `token`, every request carries `Authorization: Bearer <token>`.

Errors, drawn as httpx draws its own:

    ClientError
    ├── ServerError    the server answered, with an error status or a body that is not V2
    └── Unreachable    no answer: refused, unresolvable, reset or timed out

Lower-level errors (`OSError`, `http.client.HTTPException`, `json`) are
translated once, in `ControlClient._request`; callers catch these two.
"""

import http.client
import json
from typing import Any, Literal, NotRequired, TypedDict, cast, get_args
from urllib.parse import quote, urlencode, urlsplit

from tidegate import __version__

__all__ = [
    "ROLLOUT_ACTIONS",
    "ClientError",
    "ControlClient",
    "IndexRow",
    "ModelMetadata",
    "RolloutAction",
    "ServerError",
    "ServerMetadata",
    "Unreachable",
]


class ClientError(Exception):
    """Base of the errors a `ControlClient` raises."""


class ServerError(ClientError):
    """The server answered with an error (`status` >= 400) or with a body that is not V2.

    `message` is the server's own `{"error": ...}` text when it sent one, so it names
    the model or field the server complained about.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Unreachable(ClientError):
    """No answer from `url`: the connection failed, broke, or timed out; `reason` says which."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class ServerMetadata(TypedDict):
    name: str
    version: str
    extensions: list[str]


class IndexRow(TypedDict):
    """One row of `POST /v2/repository/index`. "version" is missing for a model whose
    directory is broken; servers may add keys (e.g. "memory_bytes"), kept as they come."""

    name: str
    version: NotRequired[str]
    state: str
    reason: str


class ModelMetadata(TypedDict):
    name: str
    versions: NotRequired[list[str]]
    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


RolloutAction = Literal["promote", "rollback", "pause", "resume"]
ROLLOUT_ACTIONS: tuple[RolloutAction, ...] = get_args(RolloutAction)


class ControlClient:
    """Calls one V2 server's control endpoints, one short-lived connection per call.

    A CLI command makes two or three calls, so a connection per call costs nothing
    that matters and leaves no keep-alive connection to go stale between them.

    Args:
        url: the server, as `http://host:port[/prefix]`, `https://...`, or just
            `host:port` (taken as http).
        timeout: seconds to wait for each answer. A load answers only once the model
            serves, so this must cover a model's load and warm-up.
        connect_timeout: seconds to wait for the connection itself, kept short so an
            address where nothing answers fails fast.
        token: a bearer token, sent as `Authorization: Bearer <token>` on every request
            (a server with access control answers 401 without one, 403 when its role
            may not do the call). Kept out of `repr` and of every error message.

    Raises:
        ValueError: `url` is not an http(s) URL with a host, or `token` is empty, not
            ASCII, or holds whitespace or control characters (not sendable as a header).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        token: str | None = None,
    ) -> None:
        if "://" not in url:
            url = f"http://{url}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"URL '{url}' must start with http:// or https://")
        try:
            port = parts.port  # reads the digits: a bad port raises here
        except ValueError as exc:
            raise ValueError(f"URL '{url}' has a bad port: {exc}") from exc
        if not parts.hostname:
            raise ValueError(f"URL '{url}' has no host")
        self._connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._host = parts.hostname
        self._port = port
        self._prefix = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{parts.netloc}{self._prefix}"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        if token is not None and (
            not token
            or not token.isascii()
            or not token.isprintable()
            or any(c.isspace() for c in token)
        ):
            # Never quote the token: it is a secret, and error messages end up in logs.
            raise ValueError(
                "the token must be non-empty ASCII, without spaces or control characters"
            )
        self._token = token

    # -- the V2 calls ---------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        """`GET /v2`: the server's name, version and protocol extensions."""
        return cast(ServerMetadata, self._request("GET", "/v2", expect=dict))

    def repository_index(self) -> list[IndexRow]:
        """`POST /v2/repository/index`: every model and version with its state."""
        return cast(list[IndexRow], self._request("POST", "/v2/repository/index", expect=list))

    def model_metadata(self, model: str) -> ModelMetadata:
        """`GET /v2/models/MODEL`: its serving versions, inputs and outputs.

        Raises:
            ServerError: with status 404 when no version of the model serves.
        """
        return cast(ModelMetadata, self._request("GET", f"/v2{_model_path(model)}", expect=dict))

    def drift(self, model: str, version: int | str | None = None) -> dict[str, Any]:
        """tidegate's drift report: `GET /v2/models/MODEL[/versions/N]/drift`. Without a
        version: `{"model_name", "versions": [one report per serving version]}`."""
        path = f"/v2{_model_path(model)}"
        if version is not None:
            path += f"/versions/{quote(str(version), safe='')}"
        return cast(dict[str, Any], self._request("GET", f"{path}/drift", expect=dict))

    def drift_state(self, model: str, version: int | str) -> dict[str, Any]:
        """tidegate's raw drift state of a version (`GET .../versions/N/drift/state`):
        additive counts, to merge with other replicas' (`merged_drift`).

        Raises:
            ServerError: 404 while the version has no reference yet.
        """
        path = f"/v2{_model_path(model)}/versions/{quote(str(version), safe='')}/drift/state"
        return cast(dict[str, Any], self._request("GET", path))

    def merged_drift(
        self, model: str, version: int | str, states: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The version's drift report over this server's traffic plus `states` (other
        replicas' `drift_state`s): `POST .../versions/N/drift`.

        Raises:
            ServerError: 400 naming a state counted against another reference.
        """
        path = f"/v2{_model_path(model)}/versions/{quote(str(version), safe='')}/drift"
        return cast(dict[str, Any], self._request("POST", path, {"states": states}))

    def load(self, model: str, version: int | str | None = None) -> None:
        """(Re)loads a model, or one version of it; returns once it serves."""
        self._request("POST", f"/v2/repository{_model_path(model)}/load", _options(version))

    def unload(self, model: str, version: int | str | None = None) -> str | None:
        """Stops serving a model, or one version of it. Unloading what is not loaded is
        no error: the server's message saying so is returned (None when it unloaded)."""
        document = self._request(
            "POST", f"/v2/repository{_model_path(model)}/unload", _options(version)
        )
        message = document.get("message") if isinstance(document, dict) else None
        return message if isinstance(message, str) else None

    # -- tidegate's traffic, rollout and audit extensions ------------------------------

    def traffic(self, model: str) -> dict[str, Any]:
        """`GET /v2/models/MODEL/traffic`: the model's policy (`stable`, `canary`, `weight`,
        `mode`) and, while it has a canary, the current `window` of each side."""
        return cast(dict[str, Any], self._request("GET", f"/v2{_model_path(model)}/traffic"))

    def set_traffic(self, model: str, **fields: Any) -> dict[str, Any]:
        """`PUT /v2/models/MODEL/traffic`: changes the fields given (`stable`, `canary`,
        `weight`, `mode`), keeping the others; `canary=None, weight=0` removes the
        canary. Returns the resulting policy, as `traffic` does.

        Raises:
            ServerError: 409 while a rollout of the model is running or paused.
        """
        return cast(
            dict[str, Any], self._request("PUT", f"/v2{_model_path(model)}/traffic", fields)
        )

    def start_rollout(self, model: str, version: int | str, **options: Any) -> dict[str, Any]:
        """`POST /v2/models/MODEL/rollout`: starts walking `version` through the steps as
        the canary. `options` override the model's `[rollout]` settings (`steps`, `mode`,
        `min_rows`, `min_dwell_s`, `max_dwell_s`, `epoch_s`, `alpha`, `error_margin`,
        `latency_p99_ratio`, `min_latency_samples`, `psi`, `disagreement`). Returns the
        rollout's status, as `rollout` does.

        Raises:
            ServerError: 409 when the model already has a rollout in progress.
        """
        body = {"version": str(version), **options}
        return cast(dict[str, Any], self._request("POST", f"/v2{_model_path(model)}/rollout", body))

    def rollout(self, model: str) -> dict[str, Any]:
        """`GET /v2/models/MODEL/rollout`: the model's latest rollout: `status` (running,
        paused, promoted, rolled_back), `step` (1-based) of `steps`, `weight`, the judge's
        last `judgement` with its checks, the `history`, and the `window` while it runs.

        Raises:
            ServerError: 404 when the model has never had a rollout.
        """
        return cast(dict[str, Any], self._request("GET", f"/v2{_model_path(model)}/rollout"))

    def applied_state(self) -> dict[str, Any]:
        """`GET /v2/state`: the desired state this server applied, with its `generation`."""
        return cast(dict[str, Any], self._request("GET", "/v2/state"))

    def fleet_view(self, model: str) -> dict[str, Any]:
        """`GET /v2/models/MODEL/traffic/state`: what a fleet judge reads of one replica:
        its `generation`, the model's `policy` and `rollout` (as the state file holds
        them), and its step `windows` as additive state (None without a canary)."""
        return cast(dict[str, Any], self._request("GET", f"/v2{_model_path(model)}/traffic/state"))

    def judgement(
        self, model: str, step: int, action: str, reason: str, checks: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """`POST /v2/models/MODEL/rollout/judgement`: a fleet judge's decision about the
        1-based `step` it judged (advance, rollback, pause or resume), applied once for
        every replica that shares the server's desired state. Returns the rollout's status.

        Raises:
            ServerError: 409 when the rollout is not fleet-judged, has finished, or is
                no longer at `step`.
        """
        body = {"step": step, "action": action, "reason": reason, "checks": checks}
        path = f"/v2{_model_path(model)}/rollout/judgement"
        return cast(dict[str, Any], self._request("POST", path, body))

    def rollout_action(self, model: str, action: RolloutAction) -> dict[str, Any]:
        """`POST /v2/models/MODEL/rollout/ACTION`: promote, roll back, pause or resume the
        model's rollout now. Returns the rollout's status after the action.

        Raises:
            ValueError: `action` is not one of `ROLLOUT_ACTIONS`.
            ServerError: 409 when the action does not fit the rollout's state (it has
                finished, or a resume of one that is not paused), 404 without a rollout.
        """
        if action not in ROLLOUT_ACTIONS:
            raise ValueError(f"unknown rollout action {action!r} (one of {ROLLOUT_ACTIONS})")
        path = f"/v2{_model_path(model)}/rollout/{action}"
        return cast(dict[str, Any], self._request("POST", path, {}))

    def audit(self, model: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """`GET /v2/audit`: `{"entries": [...], "unreadable_lines": n}`, the log's last
        `limit` entries (the server's default without it), of one model if given, oldest
        first. Each entry has `time`, `actor`, `action`, `model`, `reason`, `outcome`,
        and the action's details (`versions`, `step`, `weight`, `policy`, ...)."""
        query = {
            key: value for key, value in (("model", model), ("limit", limit)) if value is not None
        }
        path = "/v2/audit" + (f"?{urlencode(query)}" if query else "")
        return cast(dict[str, Any], self._request("GET", path))

    # -- the one place that does I/O ------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        expect: type[dict[str, Any]] | type[list[Any]] = dict,
    ) -> Any:
        """Sends one request and returns its decoded JSON body, of type `expect`."""
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": f"tidegate/{__version__}",
        }
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        connection = self._connection_class(self._host, self._port, timeout=self.connect_timeout)
        try:
            connection.connect()
            if connection.sock is not None:
                connection.sock.settimeout(self.timeout)  # from here on, wait for the work
            connection.request(method, self._prefix + path, payload, headers)
            response = connection.getresponse()
            status, data = response.status, response.read()
        except TimeoutError as exc:
            if connection.sock is None:
                reason = f"no connection within {self.connect_timeout:g} s"
            else:
                reason = f"no answer within {self.timeout:g} s (the server may still finish)"
            raise Unreachable(self.url, reason) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(self.url, _describe(exc)) from exc
        finally:
            connection.close()

        try:
            document = json.loads(data) if data.strip() else None
        except ValueError:
            document = None
        if status >= 400:
            raise ServerError(status, _error_message(status, response.reason, document, data))
        if not isinstance(document, expect):
            raise ServerError(
                status,
                f"{method} {path} answered {_snippet(data)!r}, not a JSON {expect.__name__}",
            )
        return document


def _model_path(model: str) -> str:
    # Quoted so that a name with '/' or '?' reaches the server as one (unknown) name.
    return f"/models/{quote(model, safe='')}"


def _options(version: int | str | None) -> dict[str, Any]:
    return {} if version is None else {"parameters": {"version": str(version)}}


def _error_message(status: int, reason: str, document: object, data: bytes) -> str:
    message = document.get("error") if isinstance(document, dict) else None
    if isinstance(message, str):
        return message
    # Not a V2 error body (a proxy's HTML page, say): keep what can be shown.
    text = _snippet(data)
    return f"HTTP {status} {reason}" + (f": {text}" if text else "")


def _snippet(data: bytes, limit: int = 200) -> str:
    text = " ".join(data.decode(errors="replace").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(exc: Exception) -> str:
    """`[Errno 111] Connection refused` -> `connection refused`."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__
