"""Structured server logs: one JSON object per line on stderr.

Log collectors (Loki, CloudWatch, Elasticsearch) split a stream into records at
newlines and index fields, so each record is one line of JSON: time, level,
logger, message, the caller's `extra` fields (model, version, request_id,
action...) as fields of their own, and the formatted traceback under
"exception". uvicorn's loggers go through the same formatter, so nothing in the
stream is plain text.

The stdlib `json` module is enough here: a few lines per lifecycle event or
error, never per tensor.
"""

import json
import logging
import sys
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TRACE = 5  # uvicorn's level below DEBUG; registered by uvicorn only once it is imported

# Attributes every LogRecord has; anything else on a record came from `extra`.
# "message" and "asctime" are set by Formatter.format; "color_message" is uvicorn's
# ANSI-coloured copy of the message.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}
# uvicorn.access logs its fields as positional args: (client, method, path, http, status).
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


def utc_time(created: float) -> str:
    """ISO 8601 UTC with milliseconds: sorts as text and needs no time zone to read."""
    second, millis = divmod(int(created * 1000), 1000)  # one rounding for both parts
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{millis:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    fields = {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }
    if record.name == "uvicorn.access" and isinstance(record.args, tuple):
        if len(record.args) == len(_ACCESS_FIELDS):
            fields.update(zip(_ACCESS_FIELDS, record.args, strict=True))
    return fields


def _dumps(fields: dict[str, Any]) -> str:
    """One line of JSON whatever the values: json.dumps escapes newlines inside
    strings, and a value it cannot encode (a NaN, a cycle, a dict with keys of an
    odd type) is written as its str(), the other fields as they are."""
    try:
        return json.dumps(fields, default=str, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps({key: _encodable(value) for key, value in fields.items()}, default=str)


def _encodable(value: Any) -> Any:
    try:
        json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line.

    The standard fields win over `extra` fields of the same name, so that "time",
    "level", "logger" and "message" always mean the same thing to a collector.
    """

    def __init__(self, use_colors: bool | None = None) -> None:
        # `use_colors` is accepted and ignored: uvicorn.run(use_colors=...) sets it on
        # the formatters of a dict log config.
        super().__init__()

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": utc_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            fields.setdefault(key, value)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return _dumps(fields)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installs, so that calling it again
    replaces it instead of doubling every line (and leaves other handlers be)."""


def level_number(level: str) -> int:
    """A level name as the CLI spells it ("info", "trace"...) to its number."""
    name = level.upper()
    if name == "TRACE":
        return TRACE
    levels = logging.getLevelNamesMapping()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    return levels[name]


def _formatter(json_lines: bool) -> logging.Formatter:
    return JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, json_lines: bool) -> None:
    """Logs everything to stderr through one handler on the root logger, uvicorn's
    loggers included (they propagate to it). uvicorn must then be run with
    `log_config=None` (or `uvicorn_log_config(...)`), or it installs its own."""
    numeric = level_number(level)  # before touching anything: a bad name changes nothing
    handler = _Handler(sys.stderr)
    handler.setFormatter(_formatter(json_lines))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # httpx logs each request at INFO: the workers' calls to each other are not news.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


def uvicorn_log_config(level: str, json_lines: bool) -> dict[str, Any]:
    """A dictConfig for uvicorn.run(log_config=...) with the output configure_logging
    gives: one stderr handler on the root logger, uvicorn's loggers propagating to
    it. The formatters keep uvicorn's names ("default", "access") because uvicorn
    edits those two when given `use_colors`."""
    formatter: dict[str, Any] = {"()": JsonFormatter} if json_lines else {"format": TEXT_FORMAT}
    numeric = level_number(level)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": dict(formatter), "access": dict(formatter)},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            name: {"handlers": [], "level": numeric, "propagate": True} for name in UVICORN_LOGGERS
        },
        "root": {"handlers": ["default"], "level": numeric},
    }
