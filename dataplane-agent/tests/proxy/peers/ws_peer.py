"""A real WebSocket peer (Python websockets, asyncio API) for the proxy's tests.

server NAME: serves WebSocket on 127.0.0.1 (a free port, printed as
"port N"); names itself in the handshake's x-backend header, greets every
connection with "hello from NAME", then echoes every message. Prints
"hit" for every connection and "closed CODE" when one ends.

client URL CONNECTIONS BIG: opens CONNECTIONS connections one after the
other; on each it reads the greeting, sends a text message and a random
binary message of BIG bytes and checks both echoes, then closes. Prints
one JSON object per connection.
"""

import asyncio
import json
import os
import sys
import time

try:
    import websockets
except ImportError:
    sys.stderr.write("{} cannot import websockets\n".format(sys.executable))
    sys.exit(97)

LIMIT = 8 * 1024 * 1024


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(name):
    async def echo(ws, _path=None):
        say("hit")
        await ws.send("hello from " + name)
        async for message in ws:
            await ws.send(message)
        say("closed %s" % ws.close_code)

    async with websockets.serve(
        echo, "127.0.0.1", 0, max_size=LIMIT, extra_headers={"x-backend": name}
    ) as server:
        say("port %d" % server.sockets[0].getsockname()[1])
        await asyncio.Future()


async def one(url, index, big):
    result = {"backend": None, "error": None}
    try:
        async with websockets.connect(
            url, max_size=LIMIT, open_timeout=10, close_timeout=5
        ) as ws:
            result["backend"] = ws.response_headers.get("x-backend")
            greeting = await asyncio.wait_for(ws.recv(), 10)
            result["greeting"] = greeting
            text = "ping %d" % index
            await ws.send(text)
            result["text_echoed"] = await asyncio.wait_for(ws.recv(), 10) == text
            payload = os.urandom(big)
            await ws.send(payload)
            echoed = await asyncio.wait_for(ws.recv(), 10)
            result["binary_bytes"] = len(echoed)
            result["binary_echoed"] = echoed == payload
            started = time.monotonic()
            await ws.close()
            result["close_seconds"] = time.monotonic() - started
            result["close_code"] = ws.close_code
    except websockets.exceptions.InvalidStatusCode as err:
        reason = err.headers.get("x-dataplane-error", "-")
        result["error"] = "handshake status %d (%s)" % (err.status_code, reason)
    except Exception as err:  # reported, judged by the test
        result["error"] = "%s: %s" % (type(err).__name__, err)
    return result


async def client(url, connections, big):
    for index in range(connections):
        say(json.dumps(await one(url, index, big)))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2]))
    else:
        asyncio.run(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
