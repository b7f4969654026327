"""Busy polling after a response: the event loop stays awake for the window only after
a client came straight back, yields its CPU while it spins, stays responsive, and
stops; in a real server, over HTTP and gRPC, and off with `--busy-poll-us 0`."""

import asyncio
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import uvloop

from tests.conftest import MODELS, LiveServer, free_port
from tests.shipped import ShippedVersion, json_request, reference_rows
from tidegate.busy_poll import BusyPoll
from tidegate.proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

WINDOW = 0.2  # long enough to see a spin in CPU time, against an idle loop's ~nothing
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = LOOPS[kind]()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def cpu_while_waiting(seconds: float) -> float:
    """The CPU seconds this (the loop's) thread spends while the loop waits `seconds`."""
    start = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - start


def start_spin(window: float) -> BusyPoll:
    """A busy poll whose client came straight back: spinning on the running loop."""
    poll = BusyPoll(window)
    loop = asyncio.get_running_loop()
    poll.answered(loop)
    poll.request_arrived()
    poll.answered(loop)
    return poll


@pytest.fixture(params=sorted(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_client_coming_straight_back_keeps_the_loop_polling_for_the_window(loop_kind):
    async def main() -> None:
        poll = BusyPoll(WINDOW)
        loop = asyncio.get_running_loop()
        poll.answered(loop)  # a first response: nothing known of the client yet
        assert await cpu_while_waiting(WINDOW) < 0.05 * WINDOW
        poll.request_arrived()  # long after the last response: not worth a spin
        poll.answered(loop)
        assert await cpu_while_waiting(WINDOW) < 0.05 * WINDOW
        poll.answered(loop)
        poll.request_arrived()  # at once
        poll.answered(loop)
        spun = await cpu_while_waiting(2 * WINDOW)
        assert spun > 0.4 * WINDOW
        assert spun < 1.5 * WINDOW  # and it stopped
        assert await cpu_while_waiting(WINDOW) < 0.05 * WINDOW

    run_on(loop_kind, main)


def test_a_slow_client_turns_the_spin_off_until_one_comes_back_quickly(loop_kind):
    async def main() -> None:
        poll = BusyPoll(0.05)
        loop = asyncio.get_running_loop()
        poll.answered(loop)
        poll.request_arrived()
        poll.answered(loop)  # spins for 50 ms
        await asyncio.sleep(0.15)
        poll.request_arrived()  # 150 ms after the response: a slow client
        poll.answered(loop)
        assert await cpu_while_waiting(0.2) < 0.01
        poll.request_arrived()  # slow again, then one within the window
        poll.answered(loop)
        poll.request_arrived()
        poll.answered(loop)
        assert await cpu_while_waiting(0.2) > 0.02

    run_on(loop_kind, main)


def test_answers_during_a_spin_extend_it_with_one_spinner(loop_kind):
    async def main() -> None:
        poll = BusyPoll(WINDOW)
        loop = asyncio.get_running_loop()
        poll.answered(loop)
        for _ in range(50):  # a busy connection: each answer re-arms the window
            poll.request_arrived()
            poll.answered(loop)
        # One spinning callback, however many answers: the loop's ready queue holds it
        # once (asyncio's; uvloop keeps its queue to itself).
        ready = getattr(loop, "_ready", None)
        if ready is not None:
            assert sum("_spin" in repr(handle) for handle in ready) == 1
        await asyncio.sleep(WINDOW / 2)
        poll.request_arrived()
        poll.answered(loop)  # half-way: the spin runs a whole window from here
        spun = await cpu_while_waiting(2 * WINDOW)
        assert spun > 0.4 * WINDOW
        assert spun < 1.5 * WINDOW

    run_on(loop_kind, main)


def test_the_loop_stays_responsive_while_it_spins(loop_kind):
    async def main() -> None:
        start_spin(WINDOW)
        loop = asyncio.get_running_loop()
        lateness = []
        for _ in range(10):  # timers and other callbacks run on time during the spin
            due = loop.time() + 0.01
            fired = loop.create_future()
            loop.call_at(due, fired.set_result, None)
            await fired
            lateness.append(loop.time() - due)
        assert max(lateness) < 0.005

    run_on(loop_kind, main)


def test_a_spinning_loop_yields_its_cpu_to_whatever_else_runs_there(loop_kind):
    """A process busy on the loop's CPU gets it: the spin takes a sliver, not the half
    the scheduler would give each of two busy tasks."""
    cpu = min(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread: the loop's

        async def main() -> None:
            start_spin(WINDOW)
            assert await cpu_while_waiting(WINDOW) < 0.2 * WINDOW

        run_on(loop_kind, main)
    finally:
        os.sched_setaffinity(0, mask)
        busy.kill()
        busy.wait()


def test_a_window_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        BusyPoll(0)


# -- in a server --------------------------------------------------------------------


def loop_thread_cpu(server: LiveServer) -> float:
    """CPU seconds of the server's main thread, its event loop (schedstat: in ns)."""
    pid = server.process.pid
    with open(f"/proc/{pid}/task/{pid}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9


def loop_cpu_over(server: LiveServer, seconds: float) -> float:
    start = loop_thread_cpu(server)
    time.sleep(seconds)
    return loop_thread_cpu(server) - start


@pytest.fixture
def serve(start_server, tmp_path: Path) -> Callable[..., LiveServer]:
    def serve(*extra: str) -> LiveServer:
        return start_server(MODELS, "--state-dir", str(tmp_path / "state"), *extra)

    return serve


WINE_ROW = reference_rows(ShippedVersion("wine", 1), 1)["input"]


def wine_body() -> bytes:
    return orjson.dumps(json_request("input", "FP32", WINE_ROW))


def infer_over_http(connection: http.client.HTTPConnection, body: bytes) -> None:
    connection.request("POST", "/v2/models/wine/infer", body, {"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 200, answer.read()
    answer.read()


def test_an_http_server_spins_only_after_a_quick_comeback(serve):
    server = serve("--busy-poll-us", str(int(WINDOW * 1e6)))
    body = wine_body()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        infer_over_http(connection, body)
        infer_over_http(connection, body)  # straight back: the loop polls after it
        spun = loop_cpu_over(server, 2 * WINDOW)
        assert spun > 0.4 * WINDOW, server.log()
        assert spun < 1.5 * WINDOW
        time.sleep(WINDOW)
        infer_over_http(connection, body)  # after a pause: the loop sleeps after it
        assert loop_cpu_over(server, 2 * WINDOW) < 0.15 * WINDOW
    finally:
        connection.close()


def test_an_http_server_without_busy_polling_sleeps_after_every_response(serve):
    server = serve("--busy-poll-us", "0")
    body = wine_body()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for _ in range(3):
            infer_over_http(connection, body)
        assert loop_cpu_over(server, 2 * WINDOW) < 0.15 * WINDOW
    finally:
        connection.close()


def test_a_grpc_server_spins_only_after_a_quick_comeback(serve):
    grpc_port = free_port()
    server = serve("--grpc-port", str(grpc_port), "--busy-poll-us", str(int(WINDOW * 1e6)))
    request = pb.ModelInferRequest(model_name="wine")
    request.inputs.add(name="input", datatype="FP32", shape=list(WINE_ROW.shape))
    request.raw_input_contents.append(WINE_ROW.astype(np.float32).tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request, timeout=30)
        stub.ModelInfer(request, timeout=30)
        spun = loop_cpu_over(server, 2 * WINDOW)
        assert spun > 0.4 * WINDOW, server.log()
        time.sleep(WINDOW)
        stub.ModelInfer(request, timeout=30)
        assert loop_cpu_over(server, 2 * WINDOW) < 0.15 * WINDOW
