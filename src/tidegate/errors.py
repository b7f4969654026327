"""The error hierarchy every layer raises, and the HTTP status each maps to.

    TidegateError (500)
    ├── BadRequest (400)       a request or a model file the server cannot use
    │   └── ModelLoadError     a model version that failed to load (names the file)
    ├── ConfigError (400)      a config file with a bad or unknown key (names file and key)
    ├── Unauthorized (401)     no bearer token, or one the auth file does not know
    ├── Forbidden (403)        a known token without the role an endpoint needs
    ├── NotFound (404)         an unknown or unloaded model or version
    ├── MethodNotAllowed (405)
    ├── Conflict (409)         a control action the model's current state does not allow
    ├── TooLarge (413)         a body over the configured limit
    ├── UriTooLong (414)       a request target over the request head's limit
    ├── HeadersTooLarge (431)  request headers over the configured size or count
    └── Overloaded (503)       no room in a bounded queue; carries `retry_after` seconds

Lower-level errors (orjson, onnxruntime, tomllib) are translated into these where
they enter, so the HTTP edge needs one handler. Stdlib only: this module must not
import the web framework.
"""

from http import HTTPStatus


class TidegateError(Exception):
    """Base of every error tidegate reports to a client; `message` names the culprit."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(TidegateError):
    status = HTTPStatus.BAD_REQUEST


class ModelLoadError(BadRequest):
    """A model version could not be loaded; the message names the file and the reason."""


class ConfigError(BadRequest):
    """A config file is malformed or has an unknown key."""


class Unauthorized(TidegateError):
    status = HTTPStatus.UNAUTHORIZED


class Forbidden(TidegateError):
    status = HTTPStatus.FORBIDDEN


class Conflict(TidegateError):
    status = HTTPStatus.CONFLICT


class NotFound(TidegateError):
    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(TidegateError):
    status = HTTPStatus.METHOD_NOT_ALLOWED


class TooLarge(TidegateError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UriTooLong(TidegateError):
    status = HTTPStatus.REQUEST_URI_TOO_LONG


class HeadersTooLarge(TidegateError):
    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


class NotApplied(TidegateError):
    """A worker of this server could not apply a change of the desired state."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class Overloaded(TidegateError):
    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TimedOut(Overloaded):
    """A request's own `timeout` passed before it ran: 503 over HTTP (as Triton), and
    DEADLINE_EXCEEDED over gRPC."""
