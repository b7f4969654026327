"""The inference hot path as a pure ASGI app: no router, Request or Response objects.

`InferRouter` sits in front of the Starlette application. `POST .../infer` is
recognised by splitting the path once and answered here; every other request
goes on to Starlette. Per request this does one body read, one decode, one run
(as part of a batch, see `Batcher`; routing and records: `serving`), one encode
and two ASGI sends.
"""

import logging
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from http import HTTPStatus
from typing import Any

import orjson

from tidegate import codec
from tidegate.canary import Traffic
from tidegate.errors import BadRequest, MethodNotAllowed, Overloaded, TidegateError, TooLarge
from tidegate.observer import DriftObserver
from tidegate.protocol import ascii_number
from tidegate.registry import Deployment, Registry
from tidegate.requestlog import RequestLog, timestamp
from tidegate.serving import InferenceCore, Served, Tensors

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
# What an infer request is answered through, whichever way it came (an ASGI cycle, or
# the connection itself: see `direct`): its raw body, read up to a limit in bytes, and
# the writer of its response (status, headers, body).
BodyReader = Callable[[int], Awaitable[bytes]]
Writer = Callable[[int, Headers, bytes], Awaitable[None]]

log = logging.getLogger("tidegate.infer")

JSON_TYPE = (b"content-type", b"application/json")
_BINARY_TYPE = (b"content-type", b"application/octet-stream")
# The request headers an infer request's answer reads.
_READ_HEADERS = frozenset(
    (
        b"content-length",
        b"content-encoding",
        b"inference-header-content-length",
        b"tidegate-routing-key",
    )
)
# gzip and zlib framing are both accepted for "deflate", as browsers and curl do.
_DECOMPRESSORS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": 32 + zlib.MAX_WBITS}


class ClientGone(Exception):
    """The client disconnected before its request body arrived: nobody to answer."""


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = _DECOMPRESSORS.get(encoding)
    if wbits is None:
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (use gzip or deflate)")
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data: {exc}") from exc
    if len(data) > limit:
        raise TooLarge(f"decompressed body is over the limit of {limit} bytes")
    if not decompressor.eof:
        raise BadRequest(f"body is truncated {encoding} data")
    return data


def body_too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body is over the limit of {limit} bytes")


async def read_body(
    read: BodyReader, content_length: str | None, content_encoding: str | None, limit: int
) -> bytes:
    """The request body, decompressed, refused with 413 as soon as it exceeds `limit`."""
    declared = None if content_length is None else ascii_number(content_length, 30)
    if declared is not None and declared > limit:
        raise TooLarge(f"request body of {content_length} bytes is over the limit of {limit} bytes")
    body = await read(limit)
    if content_encoding is not None:
        encoding = content_encoding.strip().lower()
        if encoding != "identity":
            body = _decompress(body, encoding, limit)
    return body


async def _receive_raw(receive: Receive, limit: int) -> bytes:
    """An ASGI request's body as it came, refused with 413 once over `limit` bytes."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def receive_body(
    receive: Receive, content_length: str | None, content_encoding: str | None, limit: int
) -> bytes:
    """An ASGI request's body, as `read_body`."""
    return await read_body(partial(_receive_raw, receive), content_length, content_encoding, limit)


def error_parts(exc: TidegateError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the V2 error response for `exc`."""
    headers = [JSON_TYPE]
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    return exc.status, headers, orjson.dumps({"error": exc.message})


async def respond(send: Send, status: int, headers: Headers, body: bytes) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _log_entry(
    target: tuple[str, str | None],
    started: int,
    served: "Served[tuple[bytes, int | None]] | None",
    status: int,
    error: str | None,
) -> dict[str, object]:
    """The request log's entry for one answered request (see `requestlog`)."""
    entry: dict[str, object] = {
        "time": timestamp(),
        "request_id": None if served is None else served.request_id,
        "model": target[0],
        "version": target[1] if served is None else served.deployment.version_label,
        "variant": None if served is None else served.variant.name,
        "latency_ms": (time.perf_counter_ns() - started) / 1e6,
        "status": status,
        "outcome": "success" if error is None and status == 200 else "error",
    }
    if error is not None:
        entry["error"] = error
    return entry


def _capturing(read: BodyReader, kept: list[bytes]) -> BodyReader:
    """`read`, keeping a copy of the raw body (for the request log's payload)."""

    async def capture(limit: int) -> bytes:
        body = await read(limit)
        kept.append(body)
        return body

    return capture


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) for `/v2/models/{m}[/versions/{v}]/infer`, else None."""
    parts = path.split("/")
    if parts[-1] != "infer" or parts[1:3] != ["v2", "models"]:
        return None
    if len(parts) == 5 and parts[3]:
        return parts[3], None
    if len(parts) == 7 and parts[3] and parts[4] == "versions" and parts[5]:
        return parts[3], parts[5]
    return None


class InferRouter:
    """Answers infer requests itself and passes everything else to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        registry: Registry,
        traffic: Traffic,
        observer: DriftObserver,
        max_body: int,
        request_log: RequestLog | None = None,
    ) -> None:
        self.app = app
        self.core = InferenceCore(registry, traffic, observer)
        self.max_body = max_body
        self.in_flight = 0  # infer requests being answered now
        self.request_log = request_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = infer_target(scope["path"]) if scope["type"] == "http" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        await self.answer(
            scope["method"],
            scope["path"],
            target,
            scope["headers"],
            partial(_receive_raw, receive),
            partial(respond, send),
        )

    async def answer(
        self,
        method: str,
        path: str,
        target: tuple[str, str | None],
        headers: Headers,
        read: BodyReader,
        write: Writer,
    ) -> None:
        """Answers one request to an infer endpoint, with its body from `read` and its
        response through `write`; then hands the batch to the drift statistics."""
        self.in_flight += 1
        try:
            served = None
            started = time.perf_counter_ns()
            sampled = self.request_log is not None and self.request_log.sampled()
            received: list[bytes] = []
            if sampled and self.request_log is not None and self.request_log.config.payload:
                read = _capturing(read, received)
            error = None
            try:
                if method != "POST":
                    raise MethodNotAllowed(f"{method} is not allowed on {path}")
                served = await self._infer(headers, read, *target)
                status, response_headers, body = 200, _headers(served), served.payload[0]
            except TidegateError as exc:
                status, response_headers, body = error_parts(exc)
                error = exc.message
                log.info(
                    "%s %s: %d %s",
                    method,
                    path,
                    status,
                    error,
                    extra={"model": target[0], "status": status},
                )
            except ClientGone:
                return
            except Exception as exc:  # a bug, not bad input: log it, answer in the V2 format
                log.exception("unexpected error on %s %s", method, path)
                status, response_headers = HTTPStatus.INTERNAL_SERVER_ERROR, [JSON_TYPE]
                body = orjson.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"})
            await write(status, response_headers, body)
            if served is not None:  # only now, with the answer handed back
                self.core.after(served)
            if sampled and self.request_log is not None:
                entry = _log_entry(target, started, served, int(status), error)
                if received:
                    entry["request"] = received[0]
                    entry["response"] = body
                self.request_log.record(entry)
        finally:
            self.in_flight -= 1

    async def _infer(
        self, headers: Headers, read: BodyReader, model: str, version: str | None
    ) -> "Served[tuple[bytes, int | None]]":
        started = time.perf_counter_ns()
        deployment = self.core.resolve(model, version)
        try:
            decoded, key, decode_ns = await self._decode(headers, read, deployment)
        except TidegateError:
            self.core.refused(deployment, started)
            raise

        def encode(answering: Deployment, outputs: Tensors) -> tuple[bytes, int | None]:
            return codec.encode_response(
                answering.name, answering.version_label, decoded, outputs, answering.model.meta
            )

        return await self.core.infer(deployment, version, decoded, key, started, decode_ns, encode)

    async def _decode(
        self, headers: Headers, read: BodyReader, deployment: Deployment
    ) -> tuple[codec.InferRequest, bytes | None, int]:
        """The request's body read and decoded; its routing-key header and the time
        decoding took."""
        content_length = content_encoding = header_length = key = None
        for name, value in headers:
            if name not in _READ_HEADERS:  # one lookup for the many headers read past
                continue
            if name == b"content-length":
                content_length = value.decode("latin-1")
            elif name == b"content-encoding":
                content_encoding = value.decode("latin-1")
            elif name == b"inference-header-content-length":
                header_length = ascii_number(value.decode("latin-1").strip())
                if header_length is None:
                    raise BadRequest(
                        f"Inference-Header-Content-Length {value.decode('latin-1')[:40]!r} "
                        "is not a byte count"
                    )
            elif name == b"tidegate-routing-key":
                key = value
        body = await read_body(read, content_length, content_encoding, self.max_body)
        decode_start = time.perf_counter_ns()
        decoded = codec.decode_request(
            body,
            header_length,
            deployment.model.meta,
            max_batch_size=deployment.max_batch_size,
            reject_nan=deployment.config.validation.reject_nan,
        )
        del body  # parsed: a JSON body (arrays from a binary one keep it) need not wait too
        return decoded, key, time.perf_counter_ns() - decode_start


def _headers(served: "Served[tuple[bytes, int | None]]") -> list[tuple[bytes, bytes]]:
    """The response headers: the type, the version and variant that answered, and for
    binary outputs the length of the JSON part."""
    json_length = served.payload[1]
    version = served.deployment.version_header
    if json_length is None:
        return [JSON_TYPE, version, served.variant.header]
    length = (b"inference-header-content-length", str(json_length).encode())
    return [_BINARY_TYPE, version, served.variant.header, length]
