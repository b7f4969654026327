"""A stand-in V2 server for load-generator tests: answers every POST at once, except
that every 100th request stalls the whole server for 200 ms (a blocking sleep, as a
GC pause or a stuck worker would). Run: python tests/stall_server.py PORT"""

import sys
import time

import uvicorn

EVERY = 100
STALL_S = 0.2
_seen = [0]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    _seen[0] += 1
    if _seen[0] % EVERY == 0:
        time.sleep(STALL_S)  # noqa: ASYNC251 - blocking the whole server is the point
    body = b'{"model_name":"m","outputs":[]}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
