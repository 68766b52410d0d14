"""An ASGI app for uvicorn, hypercorn and daphne behind nogap: answers with
the pid that served; /slow answers after 6 s (a request in progress when a
reload stops the worker)."""
import asyncio
import os
import sys

GENERATION = os.environ.get("NOGAP_GENERATION", "0")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/slow":
        print("slow request started pid %d" % os.getpid(), file=sys.stderr, flush=True)
        await asyncio.sleep(6)
    body = ("pid %d gen %s\n" % (os.getpid(), GENERATION)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-pid", str(os.getpid()).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
