"""A sampled log of inference requests, written to rotating JSON-lines files.

Theory of operation
-------------------
Serving must never wait for the log. The caller (the event loop) decides per
request whether to log it (`sampled()`, one random draw), builds a plain dict
and hands it to `record()`, which only appends it to a bounded deque: no
serialisation, no I/O and no lock on the caller's thread. When the deque is
full the entry is dropped and counted (`dropped_full`) rather than letting
memory grow or the caller wait.

One daemon thread owns the file. Every `FLUSH_INTERVAL` it drains whatever is
queued, serialises each entry to one line (orjson), and writes the batch with
plain `write()` calls on an unbuffered descriptor, starting a new file whenever
the next line would take the current one past `max_bytes` (requests.jsonl -> .1
-> .2 ..., the oldest beyond `backups` deleted), so no line is ever split across
files.

Any OSError (disk full, directory removed, a path that cannot be created) drops
the entries in hand, counted in `dropped_error`; it is logged at most once a
minute so a full disk does not flood the server log, and the file is opened
again for the next batch, so writing resumes by itself once the cause clears.

Payloads: `bytes` values in an entry (request and response bodies) are written
as a JSON string when they are valid UTF-8 (a V2 JSON body stays readable and
can be parsed again with one `json.loads`), and otherwise as an object
`{"base64": "..."}` (binary tensor data). Bodies are not parsed and embedded as
JSON objects: that would cost a parse per entry and a malformed body, exactly
what one troubleshoots, could not be logged. Unless the config enables
`payload`, "request" and "response" keys are left out of the file whatever the
caller put in the entry, so bodies cannot reach the disk by mistake.
"""

import base64
import collections
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("tidegate.requestlog")

FILENAME = "requests.jsonl"
PAYLOAD_KEYS = ("request", "response")
# Seconds between the writer's batches. Waking the writer for every entry cost a
# request at concurrency 1 a third of its throughput (the thread took the GIL each
# time: benchmarks/bench_governance.py); five batches a second cost next to nothing.
# The writer is also woken when a quarter of the queue is full, and by `close`.
FLUSH_INTERVAL = 0.2
# A full disk fails every batch; one line a minute says so without drowning the log.
ERROR_LOG_INTERVAL = 60.0
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_DUMPS_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


@dataclass(frozen=True, slots=True)
class RequestLogConfig:
    directory: Path
    sample: float = 1.0  # fraction of requests logged, 0 < sample <= 1
    payload: bool = False  # include request/response bodies
    max_bytes: int = 64 * 2**20  # rotate when the current file would exceed this
    backups: int = 5  # requests.jsonl.1 ... .N kept
    queue: int = 10_000  # entries waiting for the writer; beyond this, drops

    def __post_init__(self) -> None:
        if not 0 < self.sample <= 1:
            raise ValueError(f"request log sample must be in (0, 1], not {self.sample}")
        if self.max_bytes < 1 or self.backups < 0 or self.queue < 1:
            raise ValueError("request log max_bytes and queue must be >= 1, backups >= 0")


# The formatted second of the last timestamp: strftime costs microseconds, and
# requests in the same second only need their milliseconds appended.
_last_second: tuple[int, str] = (-1, "")


def timestamp(now: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds ("2024-05-01T12:00:00.123Z") for an entry's
    "time": the format the caller is expected to use, cheap enough for the hot path."""
    global _last_second
    millis = int((time.time() if now is None else now) * 1000)
    second, millis = divmod(millis, 1000)  # both from one rounding: they agree
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)  # one tuple: another thread sees old or new
    return f"{text}.{millis:03d}Z"


def _default(value: Any) -> Any:
    """orjson fallback: bodies as text or base64, anything else as its str(), so an
    odd value in an entry never costs the whole entry."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode("ascii")}
    return str(value)


def encode_entry(entry: dict[str, Any], payload: bool) -> bytes:
    """One entry as one JSON line (newline included); payload keys left out unless
    `payload`. Runs on the writer thread only."""
    if not payload and any(key in entry for key in PAYLOAD_KEYS):
        entry = {key: value for key, value in entry.items() if key not in PAYLOAD_KEYS}
    return orjson.dumps(entry, default=_default, option=_DUMPS_OPTIONS)


class _LogFile:
    """The current file and its rotation; used by the writer thread only.

    Lines reach the kernel with write() at the end of every batch, so they survive
    the server process crashing; no fsync: only a machine crash loses the page
    cache, and waiting for the disk after every batch would cost milliseconds per
    batch for sampled troubleshooting data that can afford to lose its last seconds.
    """

    def __init__(self, config: RequestLogConfig) -> None:
        self._config = config
        self.path = config.directory / FILENAME
        self._fd: int | None = None
        self._size = 0

    def write(self, lines: list[bytes]) -> tuple[int, OSError | None]:
        """Writes `lines` in order, rotating as needed: how many were written, and the
        error that stopped the rest (the file is then closed, to be reopened)."""
        done = 0
        try:
            self._ensure_open()
            while done < len(lines):
                end = self._fitting(lines, done)
                if end == done:
                    self._rotate()
                    continue
                self._write_all(b"".join(lines[done:end]))
                done = end
        except OSError as error:
            self.close()
            return done, error
        return done, None

    def _fitting(self, lines: list[bytes], start: int) -> int:
        """End of the run of lines from `start` that fits in the current file; an
        empty file takes at least one line, however long, so nothing is stuck."""
        size, end = self._size, start
        while end < len(lines) and (size + len(lines[end]) <= self._config.max_bytes or size == 0):
            size += len(lines[end])
            end += 1
        return end

    def _write_all(self, data: bytes) -> None:
        """One batch's bytes; on failure the file is cut back to where the batch
        began, so a half-written line does not corrupt the next one."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._truncate(self._size)
            raise
        self._size += len(data)

    def _truncate(self, size: int) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass  # a device or a vanished file: nothing more can be done for it

    def _ensure_open(self) -> None:
        """Opens the file unless the open one is still the one at `path`: a directory
        removed or a file moved away by hand is noticed and replaced."""
        if self._fd is not None and self._still_at_path(self._fd):
            return
        self.close()
        self._config.directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _still_at_path(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)

    def _rotate(self) -> None:
        """requests.jsonl -> .1 -> .2 ... -> .backups; the one beyond is overwritten."""
        self.close()
        for index in range(self._config.backups - 1, 0, -1):
            self._replace(self._backup(index), self._backup(index + 1))
        if self._config.backups > 0:
            self._replace(self.path, self._backup(1))
        else:
            self.path.unlink(missing_ok=True)
        self._ensure_open()

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{FILENAME}.{index}")

    @staticmethod
    def _replace(source: Path, target: Path) -> None:
        try:
            os.replace(source, target)
        except FileNotFoundError:
            pass  # fewer files than backups so far

    def try_open(self) -> None:
        """Opens the file now; errors are left for the first batch to count."""
        try:
            self._ensure_open()
        except OSError:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass  # nothing is buffered in the process: no data is lost here


class RequestLog:
    """The sampled request log: `record()` on the serving side, one writer thread.

    The caller must not change an entry after handing it to `record()`: it is
    serialised later, on the writer thread.
    """

    def __init__(self, config: RequestLogConfig) -> None:
        self.config = config
        self._sample = config.sample
        self._always = config.sample >= 1.0
        self._limit = config.queue
        self._wake_at = max(1, config.queue // 4)  # before then, the writer wakes on its own
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._drop_lock = threading.Lock()
        self._written = 0
        self._dropped_full = 0
        self._dropped_error = 0
        self._last_error_log: float | None = None
        self._file = _LogFile(config)
        self._thread = threading.Thread(target=self._run, name="tidegate-requestlog", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return self._written

    @property
    def dropped_full(self) -> int:
        return self._dropped_full

    @property
    def dropped_error(self) -> int:
        return self._dropped_error

    def sampled(self) -> bool:
        """Whether to log this request: one random draw, none at sample 1.0."""
        return self._always or random.random() < self._sample

    def record(self, entry: dict[str, Any]) -> None:
        """Queues `entry` for the writer, or counts it in `dropped_full` when the queue
        is full or the log closed. Never blocks, never raises. Called from several
        threads at once, the bound may be passed by a few entries."""
        if self._stopping or len(self._queue) >= self._limit:
            with self._drop_lock:  # drops only: `+=` from two threads could lose one
                self._dropped_full += 1
            return
        self._queue.append(entry)
        if len(self._queue) >= self._wake_at and not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stops accepting entries, lets the writer write what is queued (for up to
        `timeout` seconds) and stop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Opening at once surfaces a bad directory in the log at startup, not at the
        # first sampled request.
        self._file.try_open()
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            self._write_queued()
            if self._stopping and not self._queue:
                break
        self._file.close()

    def _write_queued(self) -> None:
        """Writes everything queued now, as one batch (more may arrive meanwhile)."""
        batch = [self._queue.popleft() for _ in range(len(self._queue))]
        if not batch:
            return
        try:
            self._write_batch(batch)
        except Exception as error:  # the writer thread must outlive any bad batch
            self._dropped_error += len(batch)
            self._report(error)

    def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        lines = self._encode(batch)
        written, error = self._file.write(lines)
        self._written += written
        if error is not None:
            self._dropped_error += len(lines) - written
            self._report(error)

    def _encode(self, batch: list[dict[str, Any]]) -> list[bytes]:
        """Serialised lines; an entry orjson cannot encode even with the fallback
        (an integer beyond 64 bits, a cycle) is counted in dropped_error."""
        lines: list[bytes] = []
        for entry in batch:
            try:
                lines.append(encode_entry(entry, self.config.payload))
            except (orjson.JSONEncodeError, TypeError) as error:
                self._dropped_error += 1
                self._report(error)
        return lines

    def _report(self, error: BaseException) -> None:
        """Logs a failure, at most once per ERROR_LOG_INTERVAL."""
        now = time.monotonic()
        if self._last_error_log is not None and now - self._last_error_log < ERROR_LOG_INTERVAL:
            return
        self._last_error_log = now
        log.warning(
            "request log %s: entries dropped (%s), %d so far; retrying at the next batch",
            self._file.path,
            error,
            self._dropped_error,
        )
