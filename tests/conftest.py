"""Shared fixtures: copies of the shipped repository and real `tidegate serve` processes."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.shipped import ShippedVersion, json_request, reference_rows

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# The shipped models without a `.tidegate` state directory that `make serve` may have
# left: a test server must not restore someone's traffic policies or rollouts.
SHIPPED_ONLY = shutil.ignore_patterns(".*")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """A `tidegate serve` subprocess on a free loopback port, stopped by its PID."""

    def __init__(
        self,
        repository: Path,
        *extra: str,
        log_path: Path,
        probe_token: str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.url}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tidegate",
                "serve",
                str(repository),
                "--port",
                str(self.port),
                # gRPC off unless a test asks for it: servers of parallel tests would
                # otherwise all share Triton's default port.
                *([] if "--grpc-port" in extra else ["--grpc-port", "0"]),
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.client = httpx.Client(base_url=self.base, timeout=30)
        # With an auth file, health needs a reader's token; the client sends none itself.
        self._probe_headers = (
            {} if probe_token is None else {"Authorization": f"Bearer {probe_token}"}
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                ready = self.client.get("/v2/health/ready", headers=self._probe_headers)
                if ready.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready in 60 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful shutdown), then wait; returns the exit code."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


@contextlib.contextmanager
def serving_a_copy(root: Path) -> Iterator[LiveServer]:
    """A server on a private copy of the shipped models, made under `root`."""
    shutil.copytree(MODELS, root / "models", ignore=SHIPPED_ONLY)
    live = LiveServer(root / "models", log_path=root / "server.log")
    try:
        yield live
    finally:
        live.stop()


def answer_status(answer: httpx.Response | None) -> int:
    """An answer's status; 0 when there was none."""
    return 0 if answer is None else answer.status_code


@contextlib.contextmanager
def sending_wine(
    servers: Sequence[LiveServer],
    tally: Callable[[httpx.Response | None], object] = answer_status,
    rows: np.ndarray | None = None,
    headers: Mapping[str, str] | None = None,
) -> Iterator[dict[object, int]]:
    """Sends wine rows (its reference rows unless given), one unkeyed request each, to
    `servers` in turn from a thread until the block ends; yields the count of answers by
    `tally` (of each answer, None when a server did not answer): by status unless told."""
    if rows is None:
        rows = reference_rows(ShippedVersion("wine", 1), 1000)["input"]
    bodies = [json_request("input", "FP32", rows[i : i + 1]) for i in range(len(rows))]
    counts: dict[object, int] = {}
    stop = threading.Event()

    def send() -> None:
        clients = [
            httpx.Client(base_url=live.base, timeout=30, headers=headers) for live in servers
        ]
        sent = 0
        while not stop.is_set():
            body = bodies[sent % len(bodies)]
            answer: httpx.Response | None
            try:
                answer = clients[sent % len(clients)].post("/v2/models/wine/infer", json=body)
            except httpx.TransportError:
                answer = None
            key = tally(answer)
            counts[key] = counts.get(key, 0) + 1
            sent += 1
        for client in clients:
            client.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture(scope="session", autouse=True)
def _drift_kernels_built() -> None:
    """The drift kernels compiled ahead of time before any server starts: a first build
    takes 15-30 s, which a server's start-up (ready within 60 s) should not have to fit.
    Without a C compiler servers fall back to Numba's JIT, and the tests of the
    extension fail and say why. A no-op once the kernel cache holds this build."""
    from tidegate import kernel_backend

    with contextlib.suppress(kernel_backend.KernelBuildError):
        kernel_backend.build()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped repository that a test may change."""
    target = tmp_path / "models"
    shutil.copytree(MODELS, target, ignore=SHIPPED_ONLY)
    return target


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server on the shipped models for tests that change no state."""
    with serving_a_copy(tmp_path_factory.mktemp("shared")) as live:
        yield live


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[type[LiveServer]]:
    """Starts servers for one test (any options) and stops them after it."""
    started: list[LiveServer] = []

    def start(
        repository: Path,
        *extra: str,
        probe_token: str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> LiveServer:
        log_path = tmp_path / f"server{len(started)}.log"
        live = LiveServer(
            repository, *extra, log_path=log_path, probe_token=probe_token, env=env, port=port
        )
        started.append(live)
        return live

    yield start  # type: ignore[misc]
    for live in started:
        live.stop()
