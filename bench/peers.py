"""The parties outside Postback, in a process of their own: an instant sync owner, a fast webhook
receiver that times each call from its POST to its webhook, and a sink for the raw-client
baseline. A process apart from the harness so its CPU is counted apart and it does not compete
with the harness's own event loop.

    python -m bench.peers --port 0      # prints "listening <port>" once it serves
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web


class Peers:
    def __init__(self) -> None:
        # (request id, webhook-id, arrival epoch ms, POST epoch ms stamped by the load generator)
        self.hooks: list[tuple[str, str, float, float | None]] = []
        self.owner_calls = 0
        self.sunk = 0

    async def owner(self, request: web.Request) -> web.Response:
        # Sync owner: the result is in the response, at once. Echoing the params carries the
        # load generator's send time through to the webhook.
        self.owner_calls += 1
        return web.Response(body=await request.read(), content_type="application/json")

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.time() * 1000
        data = json.loads(body).get("data", {})
        result = data.get("result")
        sent = result.get("t") if isinstance(result, dict) else None
        self.hooks.append(
            (
                str(data.get("request_id")),
                request.headers.get("webhook-id", ""),
                arrived,
                float(sent) if isinstance(sent, int | float) else None,
            )
        )
        return web.Response(status=204)

    async def sink(self, request: web.Request) -> web.Response:
        await request.read()
        self.sunk += 1
        return web.Response(status=204)

    async def stats(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        body: dict[str, Any] = {
            "hooks": self.hooks[since:],
            "total_hooks": len(self.hooks),
            "owner_calls": self.owner_calls,
            "sunk": self.sunk,
        }
        return web.json_response(body)


async def serve(port: int) -> None:
    peers = Peers()
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/owner", peers.owner)
    app.router.add_post("/hook", peers.hook)
    app.router.add_post("/sink", peers.sink)
    app.router.add_get("/stats", peers.stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening {bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
