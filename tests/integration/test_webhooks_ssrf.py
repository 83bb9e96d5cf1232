"""The SSRF guard on every webhook request, with no network allowed but the public internet:
a name resolving to 127.0.0.1, IPv4-mapped IPv6 literals, loopback and metadata addresses are
refused at the socket (delivery, and ingress's test message) and, when literal, at creation."""

from __future__ import annotations

import asyncio

from aiohttp import web

from postback_delivery.app import build as delivery
from postback_ingress.app import build as ingress
from tests.helpers import (
    HttpServer,
    TopicReader,
    bearer,
    client,
    create_account,
    events_of,
    publish,
    running,
    uid,
)
from tests.integration.webhook_kit import completed_call, endpoint, subscribe


def closed_receiver() -> HttpServer:
    async def hook(request: web.Request) -> web.Response:
        return web.Response(status=200)

    return HttpServer({"/hook": hook})


async def test_delivery_refuses_private_destinations_without_the_allowlist(settings):
    settings = settings.model_copy(update={"allowed_networks": "", "retry_schedule": "0"})
    consumer = uid("acc")
    async with (
        closed_receiver() as target,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, delivery) as [svc],
    ):
        port = target.url.rsplit(":", 1)[1]
        urls = [
            f"http://localhost:{port}/hook",  # a name that resolves to 127.0.0.1
            f"http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped IPv6
            f"http://[::ffff:7f00:1]:{port}/hook",  # the same, in hex
            f"http://127.0.0.1:{port}/hook",
            f"http://[::1]:{port}/hook",
            "http://169.254.169.254/latest/meta-data/",  # cloud metadata
            "http://[fd00:ec2::254]/latest/meta-data/",  # the same over IPv6
        ]
        await subscribe(settings, svc, *(endpoint(u, consumer) for u in urls))
        await publish(settings, *completed_call(consumer))
        attempts = await events_of(deliveries, "delivery.attempted", n=len(urls))
        await asyncio.sleep(0.3)
        assert target.received == []
        by_url = {a.data["url"]: a.data for a in attempts}
        assert set(by_url) == set(urls)
        for url, a in by_url.items():
            assert a.get("error_class") == "blocked_address", (url, a)
            assert a.get("status_code") is None


PRIVATE_LITERALS = [
    "http://127.0.0.1/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::1]/hook",
    "http://169.254.169.254/",
    "http://10.1.2.3/",
    "http://[fc00::1]/",
    "http://0.0.0.0/",
]


async def test_ingress_refuses_private_literals_and_guards_the_test_message(settings):
    settings = settings.model_copy(update={"allowed_networks": ""})
    async with closed_receiver() as target, running(settings, ingress) as [svc]:
        http = client(svc)
        alice = await create_account(http, ["consumer"], "alice")
        for url in PRIVATE_LITERALS:
            r = await http.post("/v1/webhooks", headers=bearer(alice), json={"url": url})
            assert r.status_code == 422, (url, r.text)
            assert r.json()["type"] == "urn:postback:problem:url-not-allowed"
        port = target.url.rsplit(":", 1)[1]
        # A name passes creation (it may resolve elsewhere later) but not the socket.
        r = await http.post(
            "/v1/webhooks", headers=bearer(alice), json={"url": f"http://localhost:{port}/hook"}
        )
        assert r.status_code == 201, r.text
        ep = r.json()["endpoint_id"]
        outcome = (await http.post(f"/v1/webhooks/{ep}/test", headers=bearer(alice))).json()
        assert outcome["success"] is False
        assert outcome["error_class"] == "blocked_address"
        assert target.received == []
