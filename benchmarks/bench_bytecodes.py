"""How much Python one infer request runs in tidegate: bytecodes and calls, by function.

Time on this project's benchmark machine wanders by a third between minutes, so a
change that saves a few per cent of a request cannot be timed there. What the
interpreter executes can be counted exactly: this feeds one-row requests for the
tabular model (breast_cancer v1, V2 JSON) straight into the server's own HTTP/1.1
protocol (`connection.HttpProtocol`, the parser, the direct answer, the batcher, the
codec, statistics, the drift hand-over), with a transport that keeps what is written
instead of sending it, and counts every bytecode (`sys.settrace` opcode events) of
`--requests` requests per connection after a warm-up. Each connection sends its next
request as soon as its answer is written, as wrk does: with one connection that is
concurrency 1, with `--connections 32` requests arrive while others wait, and run in
batches. Runs are on the event loop. No network, no timing: the same code gives the
same count.

    python benchmarks/bench_bytecodes.py [--requests 200] [--connections 1] [--top 25]
"""

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
import uvloop
from uvicorn.server import ServerState

from bench_http import first_row, infer_request
from tidegate.app import create_app
from tidegate.config import ServerConfig
from tidegate.connection import protocol_class

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 300
DATE = (b"date", b"Sun, 06 Dec 2026 22:15:08 GMT")


class KeptTransport(asyncio.Transport):
    """Keeps each write, and says when one came; open until closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.wrote = asyncio.Event()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))
        self.wrote.set()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Counter:
    """A trace function counting opcodes and calls per (file, function)."""

    def __init__(self) -> None:
        self.opcodes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()

    def __call__(self, frame: FrameType, event: str, arg: object) -> "Counter | None":
        code = frame.f_code
        key = (_short(code.co_filename), code.co_name)
        if event == "call":
            if _harness(frame):
                return None
            self.calls[key] += 1
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            self.opcodes[key] += 1
        return self


def _harness(frame: FrameType | None) -> bool:
    """Whether `frame` is this benchmark's own work: a client, its transport's `write`
    and what that calls, or what a client calls other than the protocol's
    `data_received` (its waiting)."""
    while frame is not None:
        code = frame.f_code
        if code is KeptTransport.write.__code__ or code is _client.__code__:
            return True
        if frame.f_back is not None and frame.f_back.f_code is _client.__code__:
            return code.co_name != "data_received"
        frame = frame.f_back
    return False


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _repository(root: Path) -> Path:
    """breast_cancer v1 alone (the tabular model of bench_vs_mlserver), every run inline."""
    model = root / "breast_cancer"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(
        (ROOT / "models" / "breast_cancer" / "1" / "model.onnx").read_bytes()
    )
    (model / "config.toml").write_text(
        "[batching]\ndynamic = true\nmax_batch_size = 64\n"
        # Every run inline, as at concurrency 1 on a real machine (here, the tracing
        # slows runs past the inline budget).
        "[runtime]\ninline_below_us = 100000000\n"
    )
    return root


async def _client(
    protocol: asyncio.Protocol, transport: KeptTransport, request: bytes, requests: int
) -> None:
    """Sends `requests` requests in turn, each as soon as the answer before is written
    (as wrk does): with several connections, requests keep arriving while others
    wait for their batch, as under load."""
    for _ in range(requests):
        transport.wrote.clear()
        protocol.data_received(request)
        await transport.wrote.wait()  # the answer (at once, or once its task ran)


async def count(requests: int, connections: int, repository: Path) -> Counter:
    """Counts `requests` requests on each of `connections` connections."""
    app = create_app(ServerConfig(repository))
    await app.direct_infer.router.core.registry.load_all()
    config = uvicorn.Config(
        app.asgi,
        loop="uvloop",
        http=protocol_class(8192, 100, app.direct_infer, None),
        lifespan="off",
        server_header=False,
        proxy_headers=False,
        log_config=None,
    )
    config.load()
    state = ServerState()
    state.default_headers = [DATE]
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(connections):
        protocol = config.http_protocol_class(config, state, {}, loop)
        transport = KeptTransport()
        protocol.connection_made(transport)
        clients.append((protocol, transport))
    # To the model, not a version, as bench_vs_mlserver's wrk sends it.
    request = infer_request("breast_cancer", 1, first_row("breast_cancer", 1), binary=False)
    request = request.replace(b"/versions/1/infer", b"/infer", 1)
    counter = Counter()
    await asyncio.gather(*(_client(p, t, request, WARM_UP) for p, t in clients))
    sys.settrace(counter)
    await asyncio.gather(*(_client(p, t, request, requests) for p, t in clients))
    sys.settrace(None)
    for _, transport in clients:
        assert len(transport.written) == WARM_UP + requests
        answer = transport.written[-1]
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="counted requests")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="requests sent at once, one per connection (over 1: they run in batches)",
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        counter = uvloop.run(count(args.requests, args.connections, _repository(Path(root))))
    per = args.requests * args.connections
    opcodes, calls = counter.opcodes, counter.calls
    print(
        f"breast_cancer v1, V2 JSON, one row: {sum(opcodes.values()) / per:.0f} bytecodes and "
        f"{sum(calls.values()) / per:.1f} Python calls per request"
    )
    print("| function | bytecodes | calls |")
    print("|---|---:|---:|")
    for key, value in opcodes.most_common(args.top):
        print(f"| {key[1]} ({key[0]}) | {value / per:.0f} | {calls[key] / per:.1f} |")


if __name__ == "__main__":
    main()
