"""uvicorn's httptools protocol, sending each response in one write.

Theory of operation: uvicorn writes a response's status line and headers as soon
as the application sends `http.response.start`, and its body when the application
sends `http.response.body`: two `send()` system calls and, with TCP_NODELAY, two
segments for every response. On loopback the first of them also runs the
receiver's network stack and wake-up, and the pair was the largest single cost of
a request at concurrency 1 (about 40 % of the event loop's busy samples in
py-spy).

`_OneWriteTransport` sits between uvicorn's request cycle and the real transport.
It holds back a response head that announces a `content-length` (the whole body is
known, so it follows at once) and writes it together with the next write, the
body. Anything else goes straight through: a chunked head (a streamed body may
take its time), `100 Continue`, and every write while nothing is held. What is
held is flushed when the response completes without a body write (HEAD) and
before the transport closes, so no byte is lost or reordered.
"""

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_PREFIX = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "
_SIZED = b"\r\ncontent-length: "


class _OneWriteTransport:
    """The connection's transport, joining a sized response head to its body."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif (
            data.startswith(_HEAD_PREFIX)
            and not data.startswith(_CONTINUE)
            and data.endswith(b"\r\n\r\n")
            and _SIZED in data
        ):
            self._held = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # Everything else (get_extra_info, pause_reading, set_protocol, ...) as is.
        return getattr(self._transport, name)


class TidegateHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a transport that writes a response at once."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWriteTransport(transport))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        self._flush()  # a HEAD response, or a body-less one, wrote no body
        super().on_response_complete()

    def _flush(self) -> None:
        transport = self.transport
        if isinstance(transport, _OneWriteTransport):
            transport.flush()
