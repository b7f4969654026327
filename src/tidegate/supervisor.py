"""`tidegate serve --workers N`: N worker processes on one port, and their supervisor.

Theory of operation
-------------------
Each worker is a whole tidegate server (`python -m tidegate.worker`): its own
event loop, batchers, sessions and drift state. Every worker binds the port with
SO_REUSEPORT, so the kernel spreads connections over the workers that listen;
a worker listens only once its models are loaded. The supervisor (this process)
holds a socket bound to the port too, but never listening: it reserves the port
(and turns port 0 into a concrete one) without taking connections.

The supervisor also creates the run directory (private: mode 0700) where each
worker opens its Unix socket (see `peers`). Workers agree on what to serve
through the desired state (see `control`), not through the supervisor, which
only starts and restarts them: a worker that dies is started again after a
back-off that doubles with each death in a row; if one slot dies
`CRASH_LIMIT` times within `CRASH_WINDOW_S`, the server stops and exits 1.
SIGTERM or SIGINT is passed on to every worker, which drains its requests as a
one-process server does; the supervisor exits once they have.

The supervisor keeps `supervisor.json` in the run directory up to date (at start
and after each death): the worker count and each slot's restarts, which any
worker's `/metrics` exposes (see `metrics.WorkersCollector`).
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tidegate.config import GRPC_GRACE_S, ServerConfig

log = logging.getLogger("tidegate.supervisor")

RUN_DIR_ENV = "TIDEGATE_RUN_DIR"  # where the workers' private sockets are (see `peers`)
WORKER_ENV = "TIDEGATE_WORKER"  # the worker's slot name, e.g. "w0"
CONFIG_ENV = "TIDEGATE_WORKER_CONFIG"  # the worker's ServerConfig, as JSON
OPTIONS_ENV = "TIDEGATE_WORKER_OPTIONS"  # the rest of `serve`'s keyword arguments
CRASH_LIMIT = 5  # deaths of one slot within CRASH_WINDOW_S that stop the server
CRASH_WINDOW_S = 60.0
BACKOFF_S = 0.5  # the first restart's delay, doubled per death in the window, up to:
BACKOFF_MAX_S = 10.0
POLL_S = 0.1
STATUS_FILE = "supervisor.json"  # in the run directory: {"workers": N, "restarts": {...}}


def config_to_env(config: ServerConfig) -> str:
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()})


def config_from_env(text: str) -> ServerConfig:
    fields: dict[str, Any] = json.loads(text)
    for name in ("repository", "state_dir", "auth_file", "request_log_dir"):
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    return ServerConfig(**fields)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and not listening: the port is
    the workers' alone, and port 0 becomes the one the OS picked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def write_status(run_dir: Path, workers: int, restarts: dict[str, int]) -> None:
    """Replaces `STATUS_FILE` atomically: a reader sees the old file or the new one."""
    temporary = run_dir / f".{STATUS_FILE}.tmp"
    temporary.write_text(json.dumps({"workers": workers, "restarts": restarts}))
    os.replace(temporary, run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> tuple[int, dict[str, int]] | None:
    """The worker count and restarts per slot in `STATUS_FILE`; None if unreadable."""
    try:
        document = json.loads((run_dir / STATUS_FILE).read_text())
        restarts = {str(slot): int(count) for slot, count in document["restarts"].items()}
        return int(document["workers"]), restarts
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


@dataclass(slots=True)
class _Slot:
    name: str
    process: subprocess.Popen[bytes] | None = None
    deaths: list[float] = field(default_factory=list)  # monotonic times, within the window
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, config: ServerConfig, workers: int, **serve_options: Any) -> None:
        self.workers = workers
        self._reserved = reserve_port(config.host, config.port)
        port = self._reserved.getsockname()[1]
        self.config = ServerConfig(**{**asdict(config), "port": port})
        self._options = serve_options
        self.run_dir = Path(tempfile.mkdtemp(prefix="tidegate-"))  # mode 0700
        self._slots = [_Slot(f"w{index}") for index in range(workers)]
        self._stopping = False

    def run(self) -> int:
        """Runs the workers until a signal stops them (0) or one keeps dying (1)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        log.info(
            "serving on http://%s:%d with %d workers (supervisor pid %d)",
            self.config.host,
            self.config.port,
            self.workers,
            os.getpid(),
        )
        try:
            self._write_status()
            for slot in self._slots:
                self._start(slot)
            return self._watch()
        finally:
            self._terminate()
            self._reserved.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _watch(self) -> int:
        while not self._stopping:
            now = time.monotonic()
            for slot in self._slots:
                process = slot.process
                if process is not None and process.poll() is not None:
                    if self._died(slot, process, now):
                        return 1
                elif process is None and now >= slot.restart_at:
                    self._start(slot)
            time.sleep(POLL_S)
        return 0

    def _died(self, slot: _Slot, process: "subprocess.Popen[bytes]", now: float) -> bool:
        """Schedules the slot's restart; True when it keeps dying (stop the server)."""
        slot.process = None
        slot.deaths = [t for t in slot.deaths if now - t < CRASH_WINDOW_S] + [now]
        code = process.returncode
        if len(slot.deaths) >= CRASH_LIMIT:
            log.critical(
                "worker %s died %d times in %.0f s (last exit status %s): stopping the server",
                slot.name,
                len(slot.deaths),
                CRASH_WINDOW_S,
                code,
            )
            return True
        delay = min(BACKOFF_S * 2 ** (len(slot.deaths) - 1), BACKOFF_MAX_S)
        slot.restart_at = now + delay
        slot.restarts += 1
        self._write_status()
        log.error(
            "worker %s (pid %d) exited with status %s; restarting it in %.1f s (restart %d)",
            slot.name,
            process.pid,
            code,
            delay,
            slot.restarts,
        )
        return False

    def _write_status(self) -> None:
        try:
            write_status(self.run_dir, self.workers, {s.name: s.restarts for s in self._slots})
        except OSError as exc:  # only the metrics miss it: serving goes on
            log.error("cannot write %s: %s", self.run_dir / STATUS_FILE, exc)

    def _start(self, slot: _Slot) -> None:
        # A killed worker's socket file stays until its successor binds in its place
        # (`server._worker_sockets`); until then, calls to it are refused and skipped.
        env = {
            **os.environ,
            CONFIG_ENV: config_to_env(self.config),
            RUN_DIR_ENV: str(self.run_dir),
            WORKER_ENV: slot.name,
            OPTIONS_ENV: json.dumps(self._options),
        }
        slot.process = subprocess.Popen([sys.executable, "-m", "tidegate.worker"], env=env)
        log.info("worker %s started (pid %d)", slot.name, slot.process.pid)

    def drain_limit_s(self) -> float:
        """How long a worker may take to stop once told: HTTP's drain, then gRPC's
        when it serves gRPC, and 10 s more for its shutdown."""
        grpc = GRPC_GRACE_S if self.config.grpc_port else 0.0
        return float(self._options.get("graceful_timeout", 30)) + grpc + 10.0

    def _terminate(self) -> None:
        """SIGTERM to every worker, then waits for their drain (SIGKILL past it)."""
        running = [slot.process for slot in self._slots if slot.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_limit_s()
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time: killing it", process.pid)
                process.kill()
                process.wait()
