"""The floor of a Python gRPC server: a transport answering recorded bytes, nothing else.

bench_grpc.py starts it beside tidegate and MLServer to show how much of a gRPC
call's cost is the transport's own: ModelInfer and ModelMetadata answer, without
parsing the request, the serialized responses tidegate gave to the benchmark's
request (recorded by bench_grpc.py), so the load generator sees a correct answer and
every cost left is the transport's (HTTP/2, the call's lifecycle, its Python handler).

    python benchmarks/grpc_floor.py {asyncio|threads|tidegate} PORT METADATA_FILE INFER_FILE

`asyncio`: grpc.aio's server on uvloop (MLServer's transport, and tidegate's until
it had its own); `threads`: grpcio's synchronous server, handlers on a pool of 4
threads; `tidegate`: tidegate's own HTTP/2 and call layer (`tidegate.grpc_wire`) on
uvloop, the transport tidegate serves gRPC with.
"""

import argparse
import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import uvloop

from tidegate.grpc_wire import GrpcServer

SERVICE = "inference.GRPCInferenceService"


def handler(answers: dict[str, bytes], asynchronous: bool) -> grpc.GenericRpcHandler:
    """Each recorded method answering its recorded bytes, requests left unparsed."""

    def answering(answer: bytes) -> Callable[[bytes, object], object]:
        if asynchronous:

            async def reply(request: bytes, context: object) -> bytes:
                return answer

            return reply
        return lambda request, context: answer

    methods = {
        name: grpc.unary_unary_rpc_method_handler(answering(answer))
        for name, answer in answers.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def serve_asyncio(address: str, answers: dict[str, bytes]) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(answers, asynchronous=True),))
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def serve_tidegate(port: int, answers: dict[str, bytes]) -> None:
    server = GrpcServer(max_message_bytes=4 << 20, busy_poll=None)
    server.add_generic_rpc_handlers((handler(answers, asynchronous=True),))
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()  # until the benchmark stops the process


def serve_threads(address: str, answers: dict[str, bytes]) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler(answers, asynchronous=False),))
    server.add_insecure_port(address)
    server.start()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("asyncio", "threads", "tidegate"))
    parser.add_argument("port", type=int)
    parser.add_argument("metadata", type=Path)
    parser.add_argument("infer", type=Path)
    args = parser.parse_args()
    answers = {"ModelMetadata": args.metadata.read_bytes(), "ModelInfer": args.infer.read_bytes()}
    address = f"127.0.0.1:{args.port}"
    if args.mode == "asyncio":
        uvloop.run(serve_asyncio(address, answers))
    elif args.mode == "tidegate":
        uvloop.run(serve_tidegate(args.port, answers))
    else:
        serve_threads(address, answers)


if __name__ == "__main__":
    main()
