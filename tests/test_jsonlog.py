"""Structured logs: every line one JSON object with the fields, uvicorn's included."""

import io
import json
import logging
import logging.config
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tidegate.jsonlog import JsonFormatter, configure_logging, uvicorn_log_config

ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing through JsonFormatter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tidegate.test_jsonlog")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines_of(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_line_with_the_fields(capture):
    logger, stream = capture
    logger.info("loaded %s version %d", "iris", 3)
    logger.warning("slow")
    first, second = lines_of(stream)
    assert ISO_MS_UTC.match(str(first["time"]))
    assert first["level"] == "INFO"
    assert first["logger"] == "tidegate.test_jsonlog"
    assert first["message"] == "loaded iris version 3"
    assert "exception" not in first
    assert second["level"] == "WARNING"


def test_extra_fields_appear_and_odd_values_become_text(capture):
    logger, stream = capture
    logger.info(
        "swap",
        extra={
            "model": "iris",
            "version": 3,
            "request_id": "r-1",
            "action": "load",
            "where": {1, 2},
            "ratio": float("nan"),
        },
    )
    [line] = lines_of(stream)
    assert line["model"] == "iris"
    assert line["version"] == 3
    assert line["request_id"] == "r-1"
    assert line["action"] == "load"
    assert line["where"] == "{1, 2}"
    assert line["ratio"] == "nan"
    assert "args" not in line
    assert "levelno" not in line


def test_an_extra_cannot_replace_a_standard_field(capture):
    logger, stream = capture
    logger.info("real", extra={"level": "fake", "time": "fake"})
    [line] = lines_of(stream)
    assert line["level"] == "INFO"
    assert line["time"] != "fake"


def test_an_exception_carries_its_traceback_on_the_same_line(capture):
    logger, stream = capture
    try:
        raise RuntimeError("model exploded")
    except RuntimeError:
        logger.exception("inference failed\nsecond line", extra={"request_id": "r-9"})
    assert stream.getvalue().count("\n") == 1
    [line] = lines_of(stream)
    assert line["message"] == "inference failed\nsecond line"
    assert line["request_id"] == "r-9"
    assert "Traceback (most recent call last)" in str(line["exception"])
    assert "RuntimeError: model exploded" in str(line["exception"])


def test_uvicorn_access_records_get_their_fields(capture):
    _, stream = capture
    logger = logging.getLogger("tidegate.test_jsonlog")
    record = logger.makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/v2/models/iris/infer", "1.1", 200),
        None,
    )
    logger.handle(record)
    [line] = lines_of(stream)
    assert line["message"] == '127.0.0.1:5000 - "POST /v2/models/iris/infer HTTP/1.1" 200'
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v2/models/iris/infer", 200)


def run_python(code: str) -> list[str]:
    """Runs `code` in a fresh interpreter (logging config is process-wide) and
    returns its stderr lines."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stderr.splitlines()


def test_configure_logging_makes_the_whole_stream_json():
    stderr = run_python(
        "import logging, logging.config\n"
        "import uvicorn.config\n"
        "from tidegate.jsonlog import configure_logging\n"
        # uvicorn's own handlers in place, as after a uvicorn.run without log_config=None
        "logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)\n"
        "configure_logging('info', json_lines=True)\n"
        "configure_logging('info', json_lines=True)\n"  # again: no doubled lines
        "logging.getLogger('tidegate.app').info('ready', extra={'model': 'iris'})\n"
        "logging.getLogger('uvicorn.error').info('Started server process [%d]', 42,"
        " extra={'color_message': 'coloured'})\n"
        "logging.getLogger('uvicorn.access').info('%s - \"%s %s HTTP/%s\" %d',"
        " 'c', 'GET', '/v2', '1.1', 200)\n"
        "logging.getLogger('tidegate.app').debug('hidden at info')\n"
    )
    lines = [json.loads(line) for line in stderr]
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("tidegate.app", "ready"),
        ("uvicorn.error", "Started server process [42]"),
        ("uvicorn.access", 'c - "GET /v2 HTTP/1.1" 200'),
    ]
    assert lines[0]["model"] == "iris"
    assert "color_message" not in lines[1]


def test_configure_logging_text_keeps_the_plain_format():
    stderr = run_python(
        "import logging\n"
        "from tidegate.jsonlog import configure_logging\n"
        "configure_logging('warning', json_lines=False)\n"
        "logging.getLogger('tidegate.app').warning('careful')\n"
        "logging.getLogger('tidegate.app').info('hidden')\n"
    )
    [line] = stderr
    assert line.endswith(" WARNING tidegate.app: careful")


def test_uvicorn_log_config_is_accepted_and_logs_json():
    stderr = run_python(
        "import logging, logging.config\n"
        "from tidegate.jsonlog import uvicorn_log_config\n"
        "logging.config.dictConfig(uvicorn_log_config('debug', json_lines=True))\n"
        "logging.getLogger('uvicorn.error').info('Application startup complete.')\n"
        "logging.getLogger('uvicorn.access').debug('%s', 'access line')\n"
        "logging.getLogger('tidegate.registry').error('boom', extra={'version': 2})\n"
    )
    lines = [json.loads(line) for line in stderr]
    assert [(line["logger"], line["level"], line["message"]) for line in lines] == [
        ("uvicorn.error", "INFO", "Application startup complete."),
        ("uvicorn.access", "DEBUG", "access line"),
        ("tidegate.registry", "ERROR", "boom"),
    ]
    assert lines[2]["version"] == 2


def test_uvicorn_runs_with_the_config():
    # uvicorn's own Config applies the dict (and its log_level) as uvicorn.run would.
    stderr = run_python(
        "import logging\n"
        "import uvicorn\n"
        "from tidegate.jsonlog import uvicorn_log_config\n"
        "async def app(scope, receive, send): pass\n"
        "uvicorn.Config(app, log_config=uvicorn_log_config('info', True), log_level='info',"
        " use_colors=False)\n"
        "logging.getLogger('uvicorn.error').info('Uvicorn running on %s', 'http://x')\n"
    )
    [line] = [json.loads(line) for line in stderr]
    assert line["message"] == "Uvicorn running on http://x"


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", json_lines=True)
    with pytest.raises(ValueError, match="level"):
        uvicorn_log_config("loud", json_lines=True)
