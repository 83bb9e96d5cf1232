"""The whole call flow, every service in-process, over the real broker and database."""

from __future__ import annotations

import asyncio
import json

from standardwebhooks.webhooks import Webhook

from postback_libs.events import CloudEvent
from tests.helpers import (
    EVERY_SERVICE,
    OPERATOR,
    TopicReader,
    bearer,
    client,
    create_account,
    events_of,
    eventually,
    owner_server,
    receiver,
    running,
)

PRICE = 10


async def register_api(http, owner, slug, endpoint, **extra):
    r = await http.post(
        "/v1/apis",
        headers=bearer(owner),
        json={"slug": slug, "name": slug, "endpoint": endpoint, "price": PRICE, **extra},
    )
    assert r.status_code == 201, r.text
    return r.json()


async def balance(http, account, role="consumer"):
    r = await http.get("/v1/accounts/me", headers=bearer(account))
    return r.json()["balances"].get(role, {}).get("balance", 0)


async def test_calls_are_routed_settled_and_delivered_signed(settings):
    async with (
        owner_server() as owner_http,
        receiver() as hooks,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"], "owner")
        consumer = await create_account(http, ["consumer"], "consumer")
        poor = await create_account(http, ["consumer"], "poor")
        sync = await register_api(http, owner, "sync-api", f"{owner_http.url}/sync")
        async_ = await register_api(
            http, owner, "async-api", f"{owner_http.url}/async", delivery_mode="async"
        )
        api_ids = {"sync-api": sync["api"]["api_id"], "async-api": async_["api"]["api_id"]}
        r = await http.post(
            f"/v1/accounts/{consumer['account_id']}/credits",
            json={"amount": 1000},
            headers=OPERATOR,
        )
        assert r.status_code == 202
        await eventually(lambda: _has(http, consumer, 1000), what="credit applied")

        hook = f"{hooks.url}/hook"
        calls = {}
        for i in range(20):
            api = "sync-api" if i % 2 else "async-api"
            r = await http.post(
                "/v1/calls",
                headers=bearer(consumer),
                json={"api": api, "params": {"n": i}, "webhook_url": hook, "max_price": PRICE},
            )
            assert r.status_code == 202, r.text
            assert r.headers["Location"] == f"/v1/calls/{r.json()['request_id']}"
            assert r.headers["Retry-After"]
            calls[r.json()["request_id"]] = ("completed", i)
        r = await http.post(
            "/v1/calls", headers=bearer(consumer), json={"api": "no-such-api", "webhook_url": hook}
        )
        calls[r.json()["request_id"]] = ("rejected", "unknown_api")
        r = await http.post(
            "/v1/calls", headers=bearer(poor), json={"api": "sync-api", "webhook_url": hook}
        )
        calls[r.json()["request_id"]] = ("rejected", "insufficient_funds")

        await eventually(
            lambda: len(hooks.received) >= len(calls), timeout=60, what="every webhook"
        )
        await asyncio.sleep(0.5)  # a duplicate delivery would show up here
        assert len(hooks.received) == len(calls)
        by_request = {}
        for _, headers, body in hooks.received:
            payload = json.loads(body)
            request_id = payload["data"]["request_id"]
            secret = (
                poor["webhook_secret"]
                if calls[request_id][1] == "insufficient_funds"
                else consumer["webhook_secret"]
            )
            # A verifier nobody here wrote.
            Webhook(secret).verify(body, headers)
            by_request[request_id] = payload
        assert set(by_request) == set(calls)
        for request_id, (status, detail) in calls.items():
            data = by_request[request_id]["data"]
            assert data["status"] == status
            if status == "completed":
                assert data["result"]["echo"] == {"n": detail}
                assert data["cost"] == PRICE
                # The API as named (it may be renamed) and the API for good.
                assert data["api_id"] == api_ids[data["api"]]
            else:
                assert by_request[request_id]["type"] == "call.rejected"
                assert data["error"]["reason"] == detail
                if detail == "insufficient_funds":  # refused once the API was known
                    assert data["api_id"] == api_ids["sync-api"]
                else:
                    assert "api_id" not in data

        async def all_delivered():
            for request_id in calls:
                r = await http.get(
                    f"/v1/calls/{request_id}",
                    headers=bearer(
                        poor if calls[request_id][1] == "insufficient_funds" else consumer
                    ),
                )
                if r.json()["status"] != "delivered":
                    return False
            return True

        await eventually(all_delivered, what="read model shows every call delivered")
        some = next(iter(calls))
        view = (await http.get(f"/v1/calls/{some}", headers=bearer(consumer))).json()
        types = [step["type"] for step in view["timeline"]]
        assert types[0] == "call.requested" and types[-1] == "call.delivered"
        assert "call.settled" in types
        # Where the owner's API runs and the platform's fee are the owner's to see.
        assert not any(
            {"upstream_url", "fee_bps", "fee"} & set(step["data"]) for step in view["timeline"]
        )
        owners_view = (await http.get(f"/v1/calls/{some}", headers=bearer(owner))).json()
        routed = next(s for s in owners_view["timeline"] if s["type"] == "call.routed")
        assert routed["data"]["upstream_url"].startswith("http")
        # And where the consumer's webhooks go (a URL that may carry its token) and the most
        # it would pay are its own.
        requested = [s["data"] for s in view["timeline"] if s["type"] == "call.requested"]
        assert requested[0]["webhook_url"].startswith("http")
        assert requested[0]["max_price"] == PRICE
        assert not any(
            {"webhook_url", "max_price"} & set(step["data"]) for step in owners_view["timeline"]
        )
        # 20 completed calls at PRICE each; the default fee is 10 %.
        await eventually(lambda: _has(http, consumer, 1000 - 20 * PRICE), what="debits")
        assert await balance(http, owner, "owner") == 20 * (PRICE - PRICE // 10)
        assert await balance(http, poor) == 0


async def _has(http, account, amount):
    return await balance(http, account) == amount


async def test_one_call_is_one_trace_from_the_request_to_its_webhook(settings):
    """Each event of a call, in every service, continues the caller's trace; so do the request
    forwarded to the owner, the owner's callback, the ledger's transfers and the webhook."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    async with (
        owner_server() as owner_http,
        receiver() as hooks,
        TopicReader(settings, "postback.calls") as calls,
        TopicReader(settings, "postback.ledger") as ledger,
        TopicReader(settings, "postback.deliveries") as deliveries,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"], "owner")
        consumer = await create_account(http, ["consumer"], "consumer")
        await register_api(http, owner, "sync-api", f"{owner_http.url}/sync")
        await register_api(
            http, owner, "async-api", f"{owner_http.url}/async", delivery_mode="async"
        )
        await http.post(
            f"/v1/accounts/{consumer['account_id']}/credits",
            json={"amount": 1000},
            headers=OPERATOR,
        )
        await eventually(lambda: _has(http, consumer, 1000), what="credit applied")
        rids = []
        for api in ("sync-api", "async-api"):
            r = await http.post(
                "/v1/calls",
                headers={**bearer(consumer), **caller},
                json={"api": api, "webhook_url": f"{hooks.url}/hook"},
            )
            rids.append(r.json()["request_id"])

        def of_call(reader: TopicReader, type_: str, rid: str) -> list[CloudEvent]:
            return [e for e in reader.of_type(type_) if e.data.get("request_id") == rid]

        for rid in rids:
            await events_of(calls, "call.delivered", rid, timeout=60)
            await eventually(lambda: of_call(deliveries, "delivery.succeeded", rid))  # noqa: B023
            await eventually(lambda: of_call(ledger, "transfer.posted", rid))  # noqa: B023

        def trace_of(traceparent: str | None) -> str | None:
            return traceparent.split("-")[1] if traceparent else None

        for rid in rids:
            story = [e for e in calls.events if e.subject == rid]
            assert {e.type for e in story} >= {
                "call.requested",
                "call.routed",
                "call.authorized",
                "call.dispatched",
                "call.completed",
                "call.settled",
                "call.delivered",
            }
            assert {e.type: trace_of(e.traceparent) for e in story} == {
                e.type: trace_of(caller["traceparent"]) for e in story
            }
            transfers = [e for e in ledger.events if e.data.get("request_id") == rid]
            assert transfers and {trace_of(e.traceparent) for e in transfers} == {trace_id}
            attempts = [e for e in deliveries.events if e.data.get("request_id") == rid]
            assert attempts and {trace_of(e.traceparent) for e in attempts} == {trace_id}
        # The owner and the webhook receiver can continue it too.
        assert {trace_of(h.get("traceparent")) for _, h, _ in owner_http.received} == {trace_id}
        assert {trace_of(h.get("traceparent")) for _, h, _ in hooks.received} == {trace_id}
