"""Where one inference request's time goes inside tidegate, without the network.

Calls the application's answer to an infer request in-process (as the HTTP
connection does, with the body already read) for one row of each shipped model, and
times its parts: the codec's decode
and encode, the model run, and the whole application. The ratio column compares
each with onnxruntime's own `session.run` on the same row, measured in the same
run. Complements bench_http.py, whose figures add the HTTP stack and the client.

    python benchmarks/bench_hotpath.py [--requests 3000]
"""

import argparse
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench_http import first_row, infer_request, raw_session, shipped_versions
from tidegate import codec
from tidegate.app import create_app
from tidegate.config import ServerConfig
from tidegate.errors import NotFound

MODELS = Path(__file__).resolve().parent.parent / "models"


def per_call_us(fn: Callable[[], object], count: int) -> float:
    for _ in range(count // 10):
        fn()
    started = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - started) / count * 1e6


async def per_await_us(fn: Callable[[], Awaitable[object]], count: int) -> float:
    for _ in range(count // 10):
        await fn()
    started = time.perf_counter()
    for _ in range(count):
        await fn()
    return (time.perf_counter() - started) / count * 1e6


async def main(count: int) -> None:
    router = create_app(ServerConfig(MODELS)).direct_infer.router
    registry = router.core.registry
    await registry.load_all()
    print("| model | raw onnxruntime us | decode us | run us | encode us | whole app us | vs raw |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, version in shipped_versions(None):
        try:
            deployment = registry.resolve(model, str(version))
        except NotFound:  # a version its config does not serve (wine's rollout candidates)
            continue
        feeds = first_row(model, version)
        session = raw_session(model, version)
        names = [o.name for o in session.get_outputs()]
        raw = per_call_us(lambda: session.run(names, feeds), count)  # noqa: B023

        request = infer_request(model, version, feeds, binary=False)
        head, body = request.split(b"\r\n\r\n", 1)
        path = head.split(b" ")[1].decode()
        meta = deployment.model.meta
        decoded = codec.decode_request(body, None, meta, max_batch_size=256)
        outputs = deployment.model.run(decoded.inputs)
        decode = per_call_us(lambda: codec.decode_request(body, None, meta), count)  # noqa: B023
        run = per_call_us(lambda: deployment.model.run(decoded.inputs), count)  # noqa: B023
        encode = per_call_us(
            lambda: codec.encode_response(model, "1", decoded, outputs, meta),  # noqa: B023
            count,
        )

        headers = [(b"content-length", str(len(body)).encode())]
        target = (model, str(version))

        async def read(limit: int) -> bytes:
            return body  # noqa: B023

        async def write(status: int, headers: list[tuple[bytes, bytes]], answer: bytes) -> None:
            assert status == 200, answer

        whole = await per_await_us(
            lambda: router.answer("POST", path, target, headers, read, write),  # noqa: B023
            count,
        )
        print(
            f"| {model} v{version} | {raw:.1f} | {decode:.1f} | {run:.1f} | {encode:.1f} | "
            f"{whole:.1f} | {whole / raw:.1f}x |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="timed calls per cell")
    uvloop.run(main(parser.parse_args().requests))
